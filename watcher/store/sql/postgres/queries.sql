-- Named queries of the PostgreSQL store. Parameters are named, in psycopg's pyformat style.
-- {active} is the list of active states (watcher/store/sql/__init__.py fills it in). Changes of a
-- claimed project are computed in watcher/store/transitions.py and written by write_project.
-- Parameters that may be NULL are cast, so the server knows their type.

-- name: lock_migrations
-- Held until the migrating transaction ends: replicas starting together migrate one at a time.
SELECT pg_advisory_xact_lock(%(key)s)

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: schema_version
SELECT coalesce(max(version), 0) AS version FROM schema_migrations

-- name: record_migration
INSERT INTO schema_migrations (version) VALUES (%(version)s)

-- name: ping
SELECT 1 AS ok

-- name: insert_projects
-- One statement for the whole list; RETURNING names the ids that were new.
INSERT INTO projects (id, kind, state, delete_after_download, due_at, tracked_at, updated_at)
SELECT id, kind, 'polling', %(delete_after_download)s, %(now)s, %(now)s, %(now)s
FROM unnest(%(ids)s::text[], %(kinds)s::text[]) WITH ORDINALITY AS new (id, kind, n)
ORDER BY n
ON CONFLICT (id) DO NOTHING
RETURNING id

-- name: revive_projects
-- Tracked again from scratch: what the 404 left (note, counters, times) is cleared.
UPDATE projects AS p
SET state = 'polling', remote_status = NULL, delete_after_download = %(delete_after_download)s,
    due_at = %(now)s, attempt = 0, polls = 0, tracked_at = %(now)s, updated_at = %(now)s,
    terminal_at = NULL, finished_at = NULL, error_code = NULL, error_message = NULL,
    failure = NULL, failures = 0, lease_owner = NULL, interruptions = 0, stalled_since = NULL
FROM unnest(%(ids)s::text[], %(kinds)s::text[]) AS r (id, kind)
WHERE p.id = r.id AND p.kind = r.kind AND p.state = 'not_found'
RETURNING p.id

-- name: delete_project
DELETE FROM projects WHERE id = %(id)s

-- name: get_project
SELECT * FROM projects WHERE id = %(id)s

-- name: list_projects
SELECT * FROM projects
WHERE (%(state)s::text IS NULL OR state = %(state)s)
  AND (%(cursor)s::text IS NULL OR id > %(cursor)s)
ORDER BY id
LIMIT %(limit)s

-- name: count_by_state
SELECT state, count(*) AS n FROM projects GROUP BY state

-- name: claim_due
-- Locks the earliest due active projects through projects_due, skipping rows another replica
-- is claiming right now, and leases them in the same statement.
WITH due AS (
    SELECT id, due_at FROM projects
    WHERE state IN {active} AND due_at <= %(now)s
    ORDER BY due_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE projects AS p
    SET due_at = %(until)s, lease_owner = %(owner)s, lease_version = nextval('lease_versions'),
        interruptions = p.interruptions + (p.lease_owner IS NOT NULL)::integer
    FROM due
    WHERE p.id = due.id
    RETURNING p.*, due.due_at AS was_due
)
SELECT * FROM leased ORDER BY was_due, id

-- name: render_durations
SELECT terminal_at - tracked_at AS seconds FROM projects
WHERE kind = %(kind)s AND terminal_at IS NOT NULL AND polls >= 2
ORDER BY terminal_at DESC
LIMIT %(limit)s

-- name: next_due_at
SELECT min(due_at) AS due_at FROM projects
WHERE state IN {active}

-- name: release_leases
UPDATE projects
SET lease_owner = NULL, due_at = least(due_at, %(now)s)
WHERE lease_owner IS NOT NULL AND (%(owner)s::text IS NULL OR lease_owner = %(owner)s)
  AND state IN {active}

-- name: renew
UPDATE projects SET due_at = %(until)s
WHERE id = %(id)s AND lease_version = %(version)s AND lease_owner IS NOT NULL

-- name: expedite
UPDATE projects SET due_at = least(due_at, %(now)s)
WHERE id = %(id)s AND state IN {active} AND lease_owner IS NULL

-- name: is_active
SELECT 1 AS active FROM projects
WHERE id = %(id)s AND state IN {active}

-- name: fenced_project
-- The claimed project's row, read to compute a transition (watcher/store/transitions.py).
SELECT * FROM projects WHERE id = %(id)s AND lease_version = %(version)s FOR UPDATE

-- name: write_project
-- A transition's result: every column a transition may change, fenced by the lease (the
-- parameters are named as the columns).
UPDATE projects
SET (state, remote_status, due_at, attempt, polls, updated_at, terminal_at, finished_at,
     error_code, error_message, failure, failures, lease_owner, interruptions, stalled_since) = (
    %(state)s, %(remote_status)s, %(due_at)s, %(attempt)s, %(polls)s, %(updated_at)s,
    %(terminal_at)s, %(finished_at)s, %(error_code)s, %(error_message)s, %(failure)s,
    %(failures)s, %(lease_owner)s, %(interruptions)s, %(stalled_since)s)
WHERE id = %(id)s AND lease_version = %(version)s

-- name: upsert_output
INSERT INTO outputs (project_id, idx, url, expires_at, path, state)
VALUES (%(project_id)s, %(idx)s, %(url)s, %(expires_at)s, %(path)s, 'pending')
ON CONFLICT (project_id, idx) DO UPDATE
SET url = excluded.url, expires_at = excluded.expires_at
WHERE outputs.state = 'pending'

-- name: outputs
SELECT * FROM outputs WHERE project_id = %(project_id)s ORDER BY idx

-- name: note_active
UPDATE projects SET failure = %(failure)s, updated_at = %(now)s
WHERE state IN {active}

-- name: outputs_of
SELECT * FROM outputs WHERE project_id = ANY(%(ids)s) ORDER BY project_id, idx

-- name: output_verified
UPDATE outputs SET state = 'verified', bytes = %(bytes)s, sha256 = %(sha256)s
WHERE project_id = %(project_id)s AND idx = %(idx)s

-- name: output_uploading
UPDATE outputs SET upload_key = %(upload_key)s
WHERE project_id = %(project_id)s AND idx = %(idx)s

-- name: output_saved
UPDATE outputs SET state = 'saved', saved_at = %(now)s, upload_key = NULL
WHERE project_id = %(project_id)s AND idx = %(idx)s

-- name: reset_output
UPDATE outputs
SET state = 'pending', bytes = NULL, sha256 = NULL, saved_at = NULL, upload_key = NULL
WHERE project_id = %(project_id)s AND idx = %(idx)s

-- name: enqueue_notification
INSERT INTO notifications (project_id, body, created_at, due_at)
VALUES (%(project_id)s, %(body)s, %(now)s, %(now)s)

-- name: claim_notifications
-- Like claim_due: rows another replica is claiming are skipped, not waited for.
WITH due AS (
    SELECT id, due_at FROM notifications
    WHERE sent_at IS NULL AND due_at <= %(now)s
    ORDER BY due_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE notifications AS n
    SET due_at = %(until)s
    FROM due
    WHERE n.id = due.id
    RETURNING n.*, due.due_at AS was_due
)
SELECT * FROM leased ORDER BY was_due, id

-- name: notification_sent
UPDATE notifications SET sent_at = %(now)s WHERE id = %(id)s

-- name: notification_failed
UPDATE notifications
SET due_at = %(due_at)s, attempts = attempts + 1, last_error = %(error)s
WHERE id = %(id)s

-- name: ensure_rate_bucket
INSERT INTO rate_budget (name, tokens, updated_at) VALUES (%(name)s, %(burst)s, %(now)s)
ON CONFLICT (name) DO NOTHING

-- name: lock_rate_bucket
SELECT tokens, updated_at FROM rate_budget WHERE name = %(name)s FOR UPDATE

-- name: update_rate_bucket
UPDATE rate_budget SET tokens = %(tokens)s, updated_at = %(updated_at)s WHERE name = %(name)s

-- name: announce_due
-- In the transaction of a write that makes work due (tracked, revived, expedited, released):
-- delivered at commit to every replica LISTENing, which looks for due work at once.
SELECT pg_notify('watcher_due', '')

-- name: listen_due
LISTEN watcher_due

-- name: next_replica_key
SELECT nextval('replica_keys')::integer AS lock_key

-- name: take_liveness_lock
-- Session-level: held until the connection that took it closes (a replica that dies frees it).
-- Taken before the replica's row is written, in the same transaction: no other replica ever
-- sees the row of a live replica without its lock.
SELECT pg_advisory_lock(%(class)s::integer, %(key)s::integer)

-- name: register_replica
-- Also the heartbeat, from the session that holds the lock: while it succeeds, the row names
-- the key held and the server it is held under.
INSERT INTO replicas (owner, lock_key, server_started, seen_at)
VALUES (%(owner)s, %(key)s, pg_postmaster_start_time(), extract(epoch FROM now()))
ON CONFLICT (owner) DO UPDATE
SET lock_key = excluded.lock_key, server_started = excluded.server_started,
    seen_at = excluded.seen_at

-- name: forget_replicas
-- Rows of replicas not heard of for an hour and whose lock is not held: long gone.
DELETE FROM replicas AS r
WHERE r.seen_at < extract(epoch FROM now()) - 3600
  AND NOT EXISTS (
    SELECT 1 FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.classid = %(class)s::bigint::oid AND l.objid = r.lock_key::bigint::oid
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))

-- name: expire_dead_leases
-- The leases of replicas whose session ended while the server ran on (their lock is free):
-- due now, lease owner kept, so the next claim counts the interruption as a lease expiry does.
-- Rows being claimed or written right now are skipped, not waited for.
WITH held AS (
    SELECT l.objid::bigint AS lock_key FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.classid = %(class)s::bigint::oid
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
), dead AS (
    SELECT r.owner FROM replicas AS r
    WHERE r.server_started = pg_postmaster_start_time()
      AND NOT EXISTS (SELECT 1 FROM held WHERE held.lock_key = r.lock_key)
), expired AS (
    SELECT p.id FROM projects AS p
    WHERE p.lease_owner IN (SELECT owner FROM dead) AND p.state IN {active}
      AND p.due_at > %(now)s
    FOR UPDATE OF p SKIP LOCKED
)
UPDATE projects AS p SET due_at = %(now)s
FROM expired
WHERE p.id = expired.id
RETURNING p.id, p.lease_owner

-- name: try_session_lock
-- Session-level: held until the connection that took it closes (a replica that dies frees it).
SELECT pg_try_advisory_lock(%(key)s) AS held
