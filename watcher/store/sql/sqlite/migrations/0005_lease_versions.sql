-- Fencing versions come from one counter, so no version is ever issued twice: not even to a
-- project untracked and tracked again, whose new row would otherwise count from 0 again and
-- accept the writes of a task still holding a lease on the old row. Starts above every version
-- already issued.
CREATE TABLE lease_versions (last INTEGER NOT NULL);
INSERT INTO lease_versions (last) SELECT coalesce(max(lease_version), 0) FROM projects;
