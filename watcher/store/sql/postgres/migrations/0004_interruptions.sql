-- How many times in a row a project's lease ran out while held: a replica died or stalled on
-- it. Progress resets it; the daemon quarantines a project whose work keeps being interrupted.
ALTER TABLE projects ADD COLUMN interruptions integer NOT NULL DEFAULT 0;
