"""Starting the ``watcher`` command in awkward conditions: stdout closed, a database that cannot
be written (even by root), a second daemon reaching a locked database through a link."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import spawn, watcher_env
from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.timeline import ProjectOverrides

Serve = Callable[..., SimulatorServer]
WATCHER = [sys.executable, "-m", "watcher"]


def clean_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(variables)
    return env


def test_a_closed_stdout_does_not_stop_the_daemon(serve: Serve, tmp_path: Path) -> None:
    """``watcher run >&-``: the daemon runs, saves the project, and logs to stderr instead."""
    server = serve(SimConfig(seed=41, error_rate=0.0, cancel_rate=0.0))
    (pid,) = server.simulator.create_projects(
        Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    env = clean_env(**watcher_env(server, tmp_path, projects=pid, log_format="json"))
    command = shlex.join([*WATCHER, "run", "--until-done"])
    result = subprocess.run(
        ["/bin/sh", "-c", f"exec {command} >&-"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    events = [json.loads(line)["event"] for line in result.stderr.splitlines() if line]
    assert events[-1] == "daemon_stopped"
    assert "project_saved" in events
    assert list((tmp_path / "downloads" / "image" / pid).iterdir())


def read_only_run(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``watcher run`` in a mount namespace of its own where ``folder`` is mounted read-only:
    a read-only volume, which stops root as well as anyone (file modes do not stop root)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a read-only volume")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
    command = ["unshare", "--mount", "/bin/sh", "-c", script, "sh", str(folder), *WATCHER, "run"]
    probe = subprocess.run(
        ["unshare", "--mount", "/bin/sh", "-c", script, "sh", str(folder), "true"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount read-only here: {probe.stderr.decode()[-200:]}")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("read_only", ["folder", "file"])
def test_a_read_only_database_is_one_clear_line(tmp_path: Path, read_only: str) -> None:
    """A database on a read-only volume (its folder, or the file alone, mounted read-only):
    exit 1 with one line naming the file and the cause, no traceback."""
    folder = tmp_path / "db"
    db = folder / "watcher.db"
    url = f"sqlite:///{db}"
    tracked = subprocess.run(
        [*WATCHER, "track", "abc123"],
        env=clean_env(WATCHER_DATABASE_URL=url),
        capture_output=True,
        check=False,
    )
    assert tracked.returncode == 0, tracked.stderr
    env = clean_env(
        WATCHER_API_TOKEN="mhk_live_x",
        WATCHER_DATABASE_URL=url,
        WATCHER_HTTP_ENABLED="false",
        WATCHER_DOWNLOAD_DIR=str(tmp_path / "downloads"),
    )
    result = read_only_run(folder if read_only == "folder" else db, env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"watcher: cannot open the database {db} for writing"), line
    assert "read-only" in line.lower() or "readonly" in line.lower(), line


def test_a_link_to_a_served_database_cannot_start_a_second_daemon(tmp_path: Path) -> None:
    """The one-daemon lock is the file's own: a second daemon reaching the same database
    through a symlink (to the file, or to its folder) or a hard link (in its folder or in
    another) is refused."""
    real = tmp_path / "real"
    real.mkdir()
    env = clean_env(
        WATCHER_API_TOKEN="mhk_live_x",
        WATCHER_HTTP_ENABLED="false",
        WATCHER_LOG_FORMAT="json",
        WATCHER_DOWNLOAD_DIR=str(tmp_path / "downloads"),
    )
    log = tmp_path / "first.log"
    first = spawn(
        [*WATCHER, "run"], {**env, "WATCHER_DATABASE_URL": f"sqlite:///{real / 'w.db'}"}, log
    )
    try:
        deadline = time.monotonic() + 30
        while "daemon_started" not in log.read_text():
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        (tmp_path / "link.db").symlink_to(real / "w.db")
        (tmp_path / "linked").symlink_to(real)
        (tmp_path / "other").mkdir()
        os.link(real / "w.db", real / "hard.db")
        os.link(real / "w.db", tmp_path / "other" / "w.db")
        links = ("link.db", "linked/w.db", "real/hard.db", "other/w.db")
        for path in (tmp_path / name for name in links):
            second = subprocess.run(
                [*WATCHER, "run"],
                env={**env, "WATCHER_DATABASE_URL": f"sqlite:///{path}"},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert second.returncode == 1, (path, second.stdout[-2000:], second.stderr)
            assert "another watcher daemon is using" in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
    finally:
        first.kill()
        first.wait()
