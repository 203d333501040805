-- When a downloading project's current run of failures without progress began (NULL while it
-- is making progress): the daemon gives up on lack of progress sustained this long, never on a
-- total count of failures.
ALTER TABLE projects ADD COLUMN stalled_since double precision;
