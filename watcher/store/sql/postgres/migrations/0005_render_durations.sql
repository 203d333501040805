-- The latest render durations of each kind, newest first, without a scan: every replica's
-- schedule loads them at start-up and refreshes them (watcher/schedule.py).
CREATE INDEX projects_terminal ON projects (kind, terminal_at) WHERE terminal_at IS NOT NULL;
