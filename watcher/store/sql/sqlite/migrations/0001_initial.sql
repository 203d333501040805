-- Tracked projects: state, schedule (due_at) and lease.
CREATE TABLE projects (
    id                    TEXT PRIMARY KEY,
    kind                  TEXT NOT NULL,
    state                 TEXT NOT NULL,
    remote_status         TEXT,
    delete_after_download INTEGER NOT NULL,
    due_at                REAL NOT NULL,
    attempt               INTEGER NOT NULL DEFAULT 0,
    polls                 INTEGER NOT NULL DEFAULT 0,
    tracked_at            REAL NOT NULL,
    updated_at            REAL NOT NULL,
    terminal_at           REAL,
    finished_at           REAL,
    error_code            TEXT,
    error_message         TEXT,
    failure               TEXT,
    failures              INTEGER NOT NULL DEFAULT 0,
    lease_owner           TEXT,
    lease_version         INTEGER NOT NULL DEFAULT 0
);

-- The schedule: only active projects are in it, ordered by when they are due.
CREATE INDEX projects_due ON projects (due_at)
    WHERE state IN ('polling', 'downloading', 'deleting');

CREATE INDEX projects_state ON projects (state, id);

-- Outputs of complete projects. path is relative to the download directory.
CREATE TABLE outputs (
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL,
    url        TEXT NOT NULL,
    expires_at REAL NOT NULL,
    path       TEXT NOT NULL,
    state      TEXT NOT NULL,
    bytes      INTEGER,
    sha256     TEXT,
    saved_at   REAL,
    PRIMARY KEY (project_id, idx)
);

CREATE INDEX outputs_verified ON outputs (project_id) WHERE state = 'verified';
