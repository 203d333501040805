-- Named queries of the PostgreSQL store. Parameters are named, in psycopg's pyformat style.
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
    WHERE state IN ('polling', 'downloading', 'deleting') AND due_at <= %(now)s
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
WHERE state IN ('polling', 'downloading', 'deleting')

-- name: release_leases
UPDATE projects
SET lease_owner = NULL, due_at = least(due_at, %(now)s)
WHERE lease_owner IS NOT NULL AND (%(owner)s::text IS NULL OR lease_owner = %(owner)s)
  AND state IN ('polling', 'downloading', 'deleting')

-- name: renew
UPDATE projects SET due_at = %(until)s
WHERE id = %(id)s AND lease_version = %(version)s AND lease_owner IS NOT NULL

-- name: expedite
UPDATE projects SET due_at = least(due_at, %(now)s)
WHERE id = %(id)s AND state IN ('polling', 'downloading', 'deleting') AND lease_owner IS NULL

-- name: is_active
SELECT 1 AS active FROM projects
WHERE id = %(id)s AND state IN ('polling', 'downloading', 'deleting')

-- name: record_poll
UPDATE projects
SET remote_status = %(remote_status)s, attempt = %(attempt)s, due_at = %(due_at)s,
    polls = polls + 1, updated_at = %(now)s, lease_owner = NULL, failures = 0, failure = NULL,
    stalled_since = NULL, interruptions = 0
WHERE id = %(id)s AND lease_version = %(version)s

-- name: record_retry
UPDATE projects
-- A try that gained bytes before it failed is progress: the run of failures starts over.
SET due_at = %(due_at)s, failure = %(failure)s,
    failures = CASE WHEN %(progressed)s THEN 0 ELSE failures + %(count)s END,
    stalled_since = CASE WHEN %(progressed)s THEN NULL
                         WHEN %(count)s > 0 THEN coalesce(stalled_since, %(now)s)
                         ELSE stalled_since END,
    updated_at = %(now)s, lease_owner = NULL, interruptions = 0
WHERE id = %(id)s AND lease_version = %(version)s

-- name: record_complete
-- From polling this is a good GET, which ends a run of failed ones; a GET for fresh URLs of a
-- project already downloading is no progress of its downloads, so their run goes on.
UPDATE projects
SET state = 'downloading', remote_status = 'complete', polls = polls + 1,
    failures = CASE WHEN state = 'polling' THEN 0 ELSE failures END,
    stalled_since = CASE WHEN state = 'polling' THEN NULL ELSE stalled_since END,
    terminal_at = coalesce(terminal_at, %(now)s), due_at = %(due_at)s, updated_at = %(now)s,
    interruptions = 0
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
WHERE state IN ('polling', 'downloading', 'deleting')

-- name: outputs_of
SELECT * FROM outputs WHERE project_id = ANY(%(ids)s) ORDER BY project_id, idx

-- name: output_verified
UPDATE outputs SET state = 'verified', bytes = %(bytes)s, sha256 = %(sha256)s
WHERE project_id = %(project_id)s AND idx = %(idx)s

-- name: output_saved
UPDATE outputs SET state = 'saved', saved_at = %(now)s
WHERE project_id = %(project_id)s AND idx = %(idx)s

-- name: project_progressed
-- An output was saved: the project's troubles on the way are over.
UPDATE projects SET failures = 0, stalled_since = NULL, failure = NULL
WHERE id = %(id)s AND lease_version = %(version)s

-- name: reset_output
UPDATE outputs SET state = 'pending', bytes = NULL, sha256 = NULL, saved_at = NULL
WHERE project_id = %(project_id)s AND idx = %(idx)s

-- name: check_lease
-- Locks the project until the output write commits, so no claim can slip in between.
SELECT 1 AS held FROM projects WHERE id = %(id)s AND lease_version = %(version)s FOR UPDATE

-- name: record_saved
-- Every output is saved: what went wrong on the way (a cut download, a stale link) is over.
UPDATE projects
SET state = %(state)s, due_at = %(due_at)s, updated_at = %(now)s, failure = NULL, failures = 0,
    stalled_since = NULL,
    lease_owner = CASE WHEN %(state)s = 'saved' THEN NULL ELSE lease_owner END,
    finished_at = CASE WHEN %(state)s = 'saved' THEN %(now)s ELSE finished_at END
WHERE id = %(id)s AND lease_version = %(version)s

-- name: record_final
UPDATE projects
SET state = %(state)s, remote_status = coalesce(%(remote_status)s::text, remote_status),
    error_code = %(error_code)s, error_message = %(error_message)s,
    failure = CASE WHEN %(state)s = 'failed' THEN coalesce(%(failure)s::text, failure)
                   ELSE %(failure)s END,
    finished_at = %(now)s, updated_at = %(now)s, lease_owner = NULL,
    terminal_at = CASE WHEN %(terminal)s THEN coalesce(terminal_at, %(now)s) ELSE terminal_at END,
    polls = polls + %(polled)s
WHERE id = %(id)s AND lease_version = %(version)s

-- name: pending_outputs
SELECT * FROM outputs WHERE state = 'verified' ORDER BY project_id, idx

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

-- name: try_reporter_lock
-- Session-level: held until the connection that took it closes (a replica that dies frees it).
SELECT pg_try_advisory_lock(%(key)s) AS held
