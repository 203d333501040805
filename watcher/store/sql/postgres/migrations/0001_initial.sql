-- Tracked projects: state, schedule (due_at) and lease. Times are Unix seconds.
CREATE TABLE projects (
    id                    text PRIMARY KEY,
    kind                  text NOT NULL,
    state                 text NOT NULL,
    remote_status         text,
    delete_after_download boolean NOT NULL,
    due_at                double precision NOT NULL,
    attempt               integer NOT NULL DEFAULT 0,
    polls                 integer NOT NULL DEFAULT 0,
    tracked_at            double precision NOT NULL,
    updated_at            double precision NOT NULL,
    terminal_at           double precision,
    finished_at           double precision,
    error_code            text,
    error_message         text,
    failure               text,
    failures              integer NOT NULL DEFAULT 0,
    lease_owner           text,
    lease_version         bigint NOT NULL DEFAULT 0
);

-- The schedule: only active projects are in it, ordered by when they are due.
CREATE INDEX projects_due ON projects (due_at)
    WHERE state IN ('polling', 'downloading', 'deleting');

CREATE INDEX projects_state ON projects (state, id);

-- Outputs of complete projects. path is relative to the download directory.
CREATE TABLE outputs (
    project_id text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    idx        integer NOT NULL,
    url        text NOT NULL,
    expires_at double precision NOT NULL,
    path       text NOT NULL,
    state      text NOT NULL,
    bytes      bigint,
    sha256     text,
    saved_at   double precision,
    PRIMARY KEY (project_id, idx)
);

CREATE INDEX outputs_verified ON outputs (project_id) WHERE state = 'verified';
