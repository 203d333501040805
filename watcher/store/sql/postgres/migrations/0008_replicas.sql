-- Replicas alive on this database: each holds the session-level advisory lock
-- (LIVENESS_LOCK_CLASS, lock_key) on a connection of its own for as long as it lives, and
-- server_started says under which run of the server it took it (pg_postmaster_start_time()).
-- A row whose lock is not held although the server has run on since it was taken is a replica
-- whose session ended: it died (or was cut off), and its leases may be taken over at once.
-- After a server restart or a failover every session ended together; those leases wait for
-- their expiry instead, while the replicas come back and take their locks again.
CREATE SEQUENCE replica_keys AS integer CYCLE;

CREATE TABLE replicas (
    owner          text PRIMARY KEY,
    lock_key       integer NOT NULL,
    server_started timestamptz NOT NULL,
    seen_at        double precision NOT NULL
);

-- The leases in flight, by holder: a dead replica's are found without a scan.
CREATE INDEX projects_leased ON projects (lease_owner)
    WHERE lease_owner IS NOT NULL AND state IN ('polling', 'downloading', 'deleting');
