-- Named queries of the SQLite store. Parameters are named (:name); a list is a JSON array.
-- {active} is the list of active states (watcher/store/sql/__init__.py fills it in). Changes of a
-- claimed project are computed in watcher/store/transitions.py and written by write_project.

-- name: insert_projects
-- One statement for the whole list (:ids and :kinds are JSON arrays); RETURNING names the ids
-- that were new. WHERE true: SQLite's parser needs it before an upsert's ON CONFLICT.
INSERT INTO projects (id, kind, state, delete_after_download, due_at, tracked_at, updated_at)
SELECT new.value, kind.value, 'polling', :delete_after_download, :now, :now, :now
FROM json_each(:ids) AS new JOIN json_each(:kinds) AS kind ON kind.key = new.key
WHERE true
ORDER BY new.key
ON CONFLICT (id) DO NOTHING
RETURNING id

-- name: revive_projects
-- Tracked again from scratch: what the 404 left (note, counters, times) is cleared.
UPDATE projects
SET state = 'polling', remote_status = NULL, delete_after_download = :delete_after_download,
    due_at = :now, attempt = 0, polls = 0, tracked_at = :now, updated_at = :now,
    terminal_at = NULL, finished_at = NULL, error_code = NULL, error_message = NULL,
    failure = NULL, failures = 0, lease_owner = NULL, interruptions = 0, stalled_since = NULL
FROM (
    SELECT new.value AS id, kind.value AS kind
    FROM json_each(:ids) AS new JOIN json_each(:kinds) AS kind ON kind.key = new.key
) AS r
WHERE projects.id = r.id AND projects.kind = r.kind AND projects.state = 'not_found'
RETURNING id

-- name: delete_project
DELETE FROM projects WHERE id = :id

-- name: get_project
SELECT * FROM projects WHERE id = :id

-- name: list_projects
SELECT * FROM projects
WHERE (:state IS NULL OR state = :state) AND (:cursor IS NULL OR id > :cursor)
ORDER BY id
LIMIT :limit

-- name: count_by_state
SELECT state, count(*) AS n FROM projects GROUP BY state

-- name: select_due
-- INDEXED BY: the planner would otherwise pick projects_state and sort every active row.
SELECT * FROM projects INDEXED BY projects_due
WHERE state IN {active} AND due_at <= :now
ORDER BY due_at
LIMIT :limit

-- name: next_lease_versions
-- :n versions for one claim of :n projects: last - :n + 1 .. last, each used once.
UPDATE lease_versions SET last = last + :n RETURNING last

-- name: lease_project
UPDATE projects
SET due_at = :until, lease_owner = :owner, lease_version = :version,
    interruptions = interruptions + (lease_owner IS NOT NULL)
WHERE id = :id

-- name: render_durations
SELECT terminal_at - tracked_at AS seconds FROM projects INDEXED BY projects_terminal
WHERE kind = :kind AND terminal_at IS NOT NULL AND polls >= 2
ORDER BY terminal_at DESC
LIMIT :limit

-- name: next_due_at
SELECT min(due_at) AS due_at FROM projects INDEXED BY projects_due
WHERE state IN {active}

-- name: release_leases
UPDATE projects
SET lease_owner = NULL, due_at = min(due_at, :now)
WHERE lease_owner IS NOT NULL AND (:owner IS NULL OR lease_owner = :owner)
  AND state IN {active}

-- name: renew
UPDATE projects SET due_at = :until
WHERE id = :id AND lease_version = :version AND lease_owner IS NOT NULL

-- name: expedite
UPDATE projects SET due_at = min(due_at, :now)
WHERE id = :id AND state IN {active} AND lease_owner IS NULL

-- name: is_active
SELECT 1 FROM projects WHERE id = :id AND state IN {active}

-- name: fenced_project
-- The claimed project's row, read to compute a transition (watcher/store/transitions.py).
SELECT * FROM projects WHERE id = :id AND lease_version = :version

-- name: write_project
-- A transition's result: every column a transition may change, fenced by the lease (the
-- parameters are named as the columns).
UPDATE projects
SET (state, remote_status, due_at, attempt, polls, updated_at, terminal_at, finished_at,
     error_code, error_message, failure, failures, lease_owner, interruptions, stalled_since) = (
    :state, :remote_status, :due_at, :attempt, :polls, :updated_at, :terminal_at, :finished_at,
    :error_code, :error_message, :failure, :failures, :lease_owner, :interruptions,
    :stalled_since)
WHERE id = :id AND lease_version = :version

-- name: upsert_output
INSERT INTO outputs (project_id, idx, url, expires_at, path, state)
VALUES (:project_id, :idx, :url, :expires_at, :path, 'pending')
ON CONFLICT (project_id, idx) DO UPDATE
SET url = excluded.url, expires_at = excluded.expires_at
WHERE outputs.state = 'pending'

-- name: outputs
SELECT * FROM outputs WHERE project_id = :project_id ORDER BY idx

-- name: note_active
UPDATE projects SET failure = :failure, updated_at = :now
WHERE state IN {active}

-- name: outputs_of
SELECT * FROM outputs WHERE project_id IN (SELECT value FROM json_each(:ids))
ORDER BY project_id, idx

-- name: output_verified
UPDATE outputs SET state = 'verified', bytes = :bytes, sha256 = :sha256
WHERE project_id = :project_id AND idx = :idx

-- name: output_uploading
UPDATE outputs SET upload_key = :upload_key
WHERE project_id = :project_id AND idx = :idx

-- name: output_saved
UPDATE outputs SET state = 'saved', saved_at = :now, upload_key = NULL
WHERE project_id = :project_id AND idx = :idx

-- name: reset_output
UPDATE outputs
SET state = 'pending', bytes = NULL, sha256 = NULL, saved_at = NULL, upload_key = NULL
WHERE project_id = :project_id AND idx = :idx

-- name: enqueue_notification
INSERT INTO notifications (project_id, body, created_at, due_at)
VALUES (:project_id, :body, :now, :now)

-- name: select_notifications
SELECT * FROM notifications
WHERE sent_at IS NULL AND due_at <= :now
ORDER BY due_at, id
LIMIT :limit

-- name: lease_notification
UPDATE notifications SET due_at = :until WHERE id = :id

-- name: notification_sent
UPDATE notifications SET sent_at = :now WHERE id = :id

-- name: notification_failed
UPDATE notifications
SET due_at = :due_at, attempts = attempts + 1, last_error = :error
WHERE id = :id
