-- The outbox of events for WATCHER_NOTIFY_URL, written with the final state they announce.
CREATE TABLE notifications (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id text NOT NULL,
    body       text NOT NULL,
    created_at double precision NOT NULL,
    due_at     double precision NOT NULL,
    attempts   integer NOT NULL DEFAULT 0,
    last_error text,
    sent_at    double precision
);

-- (due_at, id) is the claim's order, so a backlog is read in order, never sorted whole.
CREATE INDEX notifications_due ON notifications (due_at, id) WHERE sent_at IS NULL;
