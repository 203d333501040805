"""The ``watcher`` command riding out a store that stops answering: a PostgreSQL server of the
test's own stopped and started again, a SQLite file locked by another process past the busy
timeout. The daemon pauses, says so once (and on ``/readyz``), and finishes every project."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import pg
from tests.support import spawn, watcher_env
from watcher.models import Kind
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator

Serve = Callable[..., SimulatorServer]
WATCHER = [sys.executable, "-m", "watcher"]
# Renders that outlast the start of the outage; nothing errors, so every project ends saved.
RENDERS = SimConfig(
    seed=21,
    queued_seconds=(0.2, 0.4),
    rendering_seconds=(1.0, 2.0),
    error_rate=0.0,
    cancel_rate=0.0,
    output_bytes=(2_000, 40_000),
)
PROJECTS = 8
# Small timeouts and backoff, so the test is quick.
QUICK = {
    "store_timeout": "0.3",
    "store_retry_initial": "0.05",
    "store_retry_max": "0.4",
    "lease_seconds": "5",
    "log_level": "info",
    "log_format": "json",
    "http_enabled": "true",
}


def json_lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def wait_for_event(log: Path, event: str, daemon: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in json_lines(log):
            if line["event"] == event:
                return line
        assert daemon.poll() is None, f"the daemon ended: {log.read_text()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"no {event} in {log.read_text()[-3000:]}")


def wait_until_rendered(sim: Simulator, ids: list[str], daemon: subprocess.Popen[bytes]) -> None:
    """Until every render has finished at the simulator: all of it happened during the outage."""
    deadline = time.monotonic() + 30
    while any((sim.truth(pid).finishes_at or float("inf")) > sim.now() for pid in ids):
        assert time.monotonic() < deadline, "the renders never finished"
        assert daemon.poll() is None, "the daemon ended during the outage"
        time.sleep(0.05)


def env_for(server: SimulatorServer, root: Path, ids: list[str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    port = str(pg.free_port())
    env.update(watcher_env(server, root, projects=" ".join(ids), http_port=port, **QUICK, **extra))
    return env


def readiness(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{env['WATCHER_HTTP_PORT']}/readyz", timeout=10)
    return response.status_code, response.json()


def assert_finished(
    daemon: subprocess.Popen[bytes], log: Path, sim: Simulator, root: Path, ids: list[str]
) -> None:
    """Exit 0, every project saved byte for byte, one warning for the outage and one recovery."""
    assert daemon.wait(timeout=40) == 0, log.read_text()[-3000:]
    lines = json_lines(log)
    assert "Traceback" not in log.read_text()
    events = [line["event"] for line in lines]
    assert events.count("store_unavailable") == 1, events
    assert events.count("store_recovered") == 1, events
    assert "store_error" not in events
    (stopped,) = (line for line in lines if line["event"] == "daemon_stopped")
    assert stopped["projects_saved"] == PROJECTS, stopped
    for path in (root / "downloads").rglob("*"):
        assert not path.name.endswith(".part"), path
    for pid in ids:
        for out in sim.truth(pid).outputs:
            (saved,) = (root / "downloads" / "image" / pid).glob(f"{out.index}-*")
            assert hashlib.sha256(saved.read_bytes()).hexdigest() == out.sha256


@pytest.mark.slow
def test_a_postgres_restart_pauses_the_daemon_and_it_finishes(
    serve: Serve, tmp_path: Path, own_postgres: pg.OwnServer
) -> None:
    """PostgreSQL stopped while renders run and started again once they are done: the daemon
    does not die, is not ready meanwhile (its metrics are still served), logs the outage once
    and its end once, and saves every project."""
    server = serve(RENDERS)
    sim = server.simulator
    ids = sim.create_projects(Kind.IMAGE, PROJECTS)
    env = env_for(server, tmp_path, ids, database_url=own_postgres.url)
    log = tmp_path / "daemon.log"
    daemon = spawn([*WATCHER, "run", "--until-done"], env, log)
    try:
        wait_for_event(log, "http_started", daemon)
        own_postgres.stop()
        outage = wait_for_event(log, "store_unavailable", daemon)
        assert "PostgreSQL" in outage["error"]
        status, body = readiness(env)
        assert status == 503
        assert body["checks"]["store"] != "ok"
        metrics = httpx.get(f"http://127.0.0.1:{env['WATCHER_HTTP_PORT']}/metrics", timeout=10)
        assert metrics.status_code == 200  # still served, the store's counts as last read
        assert "watcher_work_in_flight" in metrics.text
        wait_until_rendered(sim, ids, daemon)
        own_postgres.start()
        assert_finished(daemon, log, sim, tmp_path, ids)
    finally:
        daemon.kill()
        daemon.wait()


LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("COMMIT")
"""


@pytest.mark.slow
def test_a_sqlite_file_locked_by_another_process_pauses_the_daemon(
    serve: Serve, tmp_path: Path
) -> None:
    """Another process holds the SQLite write lock far past the busy timeout: the daemon waits
    (not ready, though the file can still be read), logs it once, and finishes when released."""
    server = serve(RENDERS)
    sim = server.simulator
    ids = sim.create_projects(Kind.IMAGE, PROJECTS)
    env = env_for(server, tmp_path, ids)
    log = tmp_path / "daemon.log"
    daemon = spawn([*WATCHER, "run", "--until-done"], env, log)
    holder = None
    try:
        wait_for_event(log, "http_started", daemon)
        holder = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "watcher.db")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        outage = wait_for_event(log, "store_unavailable", daemon)
        assert "locked" in outage["error"]
        # Not ready all along; once the writes queued on the store's thread have timed out, the
        # file answers a read, and the outage alone keeps it not ready.
        deadline = time.monotonic() + 20
        while True:
            status, body = readiness(env)
            assert status == 503, body
            if body["checks"]["store"] == "unavailable":
                break
            assert time.monotonic() < deadline, body
        wait_until_rendered(sim, ids, daemon)
        holder.communicate("", timeout=10)  # COMMIT: the lock is released
        assert holder.returncode == 0
        assert_finished(daemon, log, sim, tmp_path, ids)
    finally:
        daemon.kill()
        daemon.wait()
        if holder is not None:
            holder.kill()
            holder.wait()


def test_sigterm_during_an_outage_still_stops_cleanly(
    serve: Serve, tmp_path: Path, own_postgres: pg.OwnServer
) -> None:
    """A daemon asked to stop while PostgreSQL is down exits 0 at once (it was asked to stop),
    its last line saying the end state could not be read, without a traceback."""
    server = serve(RENDERS)
    ids = server.simulator.create_projects(Kind.IMAGE, 2)
    env = env_for(server, tmp_path, ids, database_url=own_postgres.url)
    log = tmp_path / "daemon.log"
    daemon = spawn([*WATCHER, "run"], env, log)
    try:
        wait_for_event(log, "http_started", daemon)
        own_postgres.stop()
        wait_for_event(log, "store_unavailable", daemon)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert "Traceback" not in log.read_text()
        last = json_lines(log)[-1]
        assert (last["event"], last["level"], last["exit_code"]) == ("daemon_stopped", "warning", 0)
        assert "PostgreSQL" in last["error"]
    finally:
        daemon.kill()
        daemon.wait()


@pytest.mark.slow
def test_a_frozen_postgres_holds_no_call_forever(
    serve: Serve, tmp_path: Path, own_postgres: pg.OwnServer
) -> None:
    """Every process of PostgreSQL stopped (SIGSTOP: connections stay open, nothing answers, as
    when its host hangs or vanishes in a failover): every call gives up after the store timeout,
    so the outage is reported once and a SIGTERM stops the daemon within its grace, not after
    it, though the server never answers again."""
    server = serve(RENDERS)
    ids = server.simulator.create_projects(Kind.IMAGE, PROJECTS)
    env = env_for(server, tmp_path, ids, database_url=own_postgres.url, shutdown_grace="120")
    log = tmp_path / "daemon.log"
    daemon = spawn([*WATCHER, "run"], env, log)
    try:
        wait_for_event(log, "http_started", daemon)
        own_postgres.freeze()
        try:
            wait_for_event(log, "store_unavailable", daemon)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=40) == 0, log.read_text()[-3000:]
        finally:
            own_postgres.thaw()
        events = [line["event"] for line in json_lines(log)]
        assert events.count("store_unavailable") == 1, events
        assert "shutdown_cancelled_work" not in events  # nothing hung past the grace
        assert events[-1] == "daemon_stopped"
    finally:
        daemon.kill()
        daemon.wait()


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small volume")
    volume = tmp_path / "volume"
    volume.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(volume)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield volume
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)


def fill(volume: Path) -> Path:
    """Fill ``volume`` to the last byte; the file that does it."""
    filler = volume / "filler"
    # Unbuffered: a write the full volume refuses is not kept to fail again at close.
    with filler.open("wb", buffering=0) as out:
        for block in (65536, 4096, 1):
            try:
                while out.write(b"\0" * block):
                    pass
            except OSError:
                pass
    return filler


@pytest.mark.slow
def test_a_full_database_volume_pauses_the_daemon(
    serve: Serve, tmp_path: Path, small_volume: Path
) -> None:
    """The SQLite database's volume fills up while renders run: the daemon waits (not ready),
    logs it once, and finishes every project once space is freed."""
    server = serve(RENDERS)
    sim = server.simulator
    ids = sim.create_projects(Kind.IMAGE, PROJECTS)
    env = env_for(server, tmp_path, ids, database_url=f"sqlite:///{small_volume / 'watcher.db'}")
    log = tmp_path / "daemon.log"
    daemon = spawn([*WATCHER, "run", "--until-done"], env, log)
    try:
        wait_for_event(log, "http_started", daemon)
        filler = fill(small_volume)
        outage = wait_for_event(log, "store_unavailable", daemon)
        assert "full" in outage["error"], outage
        assert readiness(env)[0] == 503
        wait_until_rendered(sim, ids, daemon)
        filler.unlink()
        assert_finished(daemon, log, sim, tmp_path, ids)
    finally:
        daemon.kill()
        daemon.wait()
