-- Fencing versions come from one sequence, so no version is ever issued twice: not even to a
-- project untracked and tracked again, whose new row would otherwise count from 0 again and
-- accept the writes of a replica still holding a lease on the old row. Starts above every
-- version already issued.
CREATE SEQUENCE lease_versions;
SELECT setval('lease_versions', (SELECT coalesce(max(lease_version), 0) + 1 FROM projects), false);
