-- The outbox of events for WATCHER_NOTIFY_URL, written with the final state they announce.
CREATE TABLE notifications (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at REAL NOT NULL,
    due_at     REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at    REAL
);

CREATE INDEX notifications_due ON notifications (due_at) WHERE sent_at IS NULL;
