-- Named queries of the SQLite store. Parameters are named (:name).

-- name: insert_project
INSERT INTO projects (id, kind, state, delete_after_download, due_at, tracked_at, updated_at)
VALUES (:id, :kind, 'polling', :delete_after_download, :now, :now, :now)
ON CONFLICT (id) DO NOTHING

-- name: revive_project
-- Tracked again from scratch: what the 404 left (note, counters, times) is cleared.
UPDATE projects
SET state = 'polling', remote_status = NULL, delete_after_download = :delete_after_download,
    due_at = :now, attempt = 0, polls = 0, tracked_at = :now, updated_at = :now,
    terminal_at = NULL, finished_at = NULL, error_code = NULL, error_message = NULL,
    failure = NULL, failures = 0, lease_owner = NULL, interruptions = 0, stalled_since = NULL
WHERE id = :id AND kind = :kind AND state = 'not_found'

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
WHERE state IN ('polling', 'downloading', 'deleting') AND due_at <= :now
ORDER BY due_at
LIMIT :limit

-- name: next_lease_version
UPDATE lease_versions SET last = last + 1 RETURNING last

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
WHERE state IN ('polling', 'downloading', 'deleting')

-- name: release_leases
UPDATE projects
SET lease_owner = NULL, due_at = min(due_at, :now)
WHERE lease_owner IS NOT NULL AND (:owner IS NULL OR lease_owner = :owner)
  AND state IN ('polling', 'downloading', 'deleting')

-- name: renew
UPDATE projects SET due_at = :until
WHERE id = :id AND lease_version = :version AND lease_owner IS NOT NULL

-- name: expedite
UPDATE projects SET due_at = min(due_at, :now)
WHERE id = :id AND state IN ('polling', 'downloading', 'deleting') AND lease_owner IS NULL

-- name: is_active
SELECT 1 FROM projects WHERE id = :id AND state IN ('polling', 'downloading', 'deleting')

-- name: record_poll
UPDATE projects
SET remote_status = :remote_status, attempt = :attempt, due_at = :due_at,
    polls = polls + 1, updated_at = :now, lease_owner = NULL, failures = 0, failure = NULL,
    stalled_since = NULL, interruptions = 0
WHERE id = :id AND lease_version = :version

-- name: record_retry
UPDATE projects
-- A try that gained bytes before it failed is progress: the run of failures starts over.
SET due_at = :due_at, failure = :failure,
    failures = CASE WHEN :progressed THEN 0 ELSE failures + :count END,
    stalled_since = CASE WHEN :progressed THEN NULL
                         WHEN :count > 0 THEN coalesce(stalled_since, :now)
                         ELSE stalled_since END,
    updated_at = :now, lease_owner = NULL, interruptions = 0
WHERE id = :id AND lease_version = :version

-- name: record_complete
-- From polling this is a good GET, which ends a run of failed ones; a GET for fresh URLs of a
-- project already downloading is no progress of its downloads, so their run goes on.
UPDATE projects
SET state = 'downloading', remote_status = 'complete', polls = polls + 1,
    failures = CASE WHEN state = 'polling' THEN 0 ELSE failures END,
    stalled_since = CASE WHEN state = 'polling' THEN NULL ELSE stalled_since END,
    terminal_at = coalesce(terminal_at, :now), due_at = :due_at, updated_at = :now,
    interruptions = 0
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
WHERE state IN ('polling', 'downloading', 'deleting')

-- name: outputs_of
SELECT * FROM outputs WHERE project_id IN (SELECT value FROM json_each(:ids))
ORDER BY project_id, idx

-- name: output_verified
UPDATE outputs SET state = 'verified', bytes = :bytes, sha256 = :sha256
WHERE project_id = :project_id AND idx = :idx

-- name: output_saved
UPDATE outputs SET state = 'saved', saved_at = :now
WHERE project_id = :project_id AND idx = :idx

-- name: project_progressed
-- An output was saved: the project's troubles on the way are over.
UPDATE projects SET failures = 0, stalled_since = NULL, failure = NULL
WHERE id = :id AND lease_version = :version

-- name: reset_output
UPDATE outputs SET state = 'pending', bytes = NULL, sha256 = NULL, saved_at = NULL
WHERE project_id = :project_id AND idx = :idx

-- name: check_lease
SELECT 1 FROM projects WHERE id = :id AND lease_version = :version

-- name: record_saved
-- Every output is saved: what went wrong on the way (a cut download, a stale link) is over.
UPDATE projects
SET state = :state, due_at = :due_at, updated_at = :now, failure = NULL, failures = 0,
    stalled_since = NULL,
    lease_owner = CASE WHEN :state = 'saved' THEN NULL ELSE lease_owner END,
    finished_at = CASE WHEN :state = 'saved' THEN :now ELSE finished_at END
WHERE id = :id AND lease_version = :version

-- name: record_final
UPDATE projects
SET state = :state, remote_status = coalesce(:remote_status, remote_status),
    error_code = :error_code, error_message = :error_message,
    failure = CASE WHEN :state = 'failed' THEN coalesce(:failure, failure) ELSE :failure END,
    finished_at = :now, updated_at = :now, lease_owner = NULL,
    terminal_at = CASE WHEN :terminal THEN coalesce(terminal_at, :now) ELSE terminal_at END,
    polls = polls + :polled
WHERE id = :id AND lease_version = :version

-- name: pending_outputs
SELECT * FROM outputs WHERE state = 'verified' ORDER BY project_id, idx

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
