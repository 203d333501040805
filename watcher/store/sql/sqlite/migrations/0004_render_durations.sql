-- The latest render durations of each kind, newest first, without a scan: the schedule loads them
-- at start-up (watcher/schedule.py).
CREATE INDEX projects_terminal ON projects (kind, terminal_at) WHERE terminal_at IS NOT NULL;
