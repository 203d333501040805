"""A fleet of ``watcher run`` replicas on the real PostgreSQL riding out a replica cut off from the
database (a TCP proxy of the test's own, cut and restored), and waking on work that another
process made due (LISTEN/NOTIFY) instead of waiting for its claim loop's next look."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.e2e.test_fleet import assert_no_project_worked_by_two_at_once, held_by, replica
from tests.support import spawn, watcher_env
from watcher.models import Kind
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer

Serve = Callable[..., SimulatorServer]
WATCHER = [sys.executable, "-m", "watcher"]
RENDERS = SimConfig(
    seed=5,
    queued_seconds=(0.2, 1.0),
    rendering_seconds=(1.0, 6.0),
    error_rate=0.0,
    cancel_rate=0.0,
    output_bytes=(20_000, 300_000),
)
# Leases far longer than the test: whatever is taken over is taken over because a session ended.
LEASE_SECONDS = "120"


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 to ``target``, which the test cuts and restores: :meth:`cut`
    closes every connection through it (both ends see it closed, as when a network path or a
    pooler dies) and closes each new one at once until :meth:`restore`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._open.discard(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut(self) -> None:
        """Close every connection and refuse new ones."""
        self._cut.set()
        with self._lock:
            doomed = list(self._open)
        self._drop(*doomed)

    def restore(self) -> None:
        """Let connections through again."""
        self._cut.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


@pytest.fixture
def proxy(pg_url: str) -> Iterator[CuttableProxy]:
    parts = urlsplit(pg_url)
    proxy = CuttableProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        yield proxy
    finally:
        proxy.close()


def through(pg_url: str, proxy: CuttableProxy) -> str:
    """``pg_url`` by way of ``proxy``."""
    parts = urlsplit(pg_url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{proxy.port}"))


def json_lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def wait_for(what: str, check: Callable[[], bool], *, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.05)


def logged(log: Path, event: str) -> bool:
    return any(line["event"] == event for line in json_lines(log))


def states(pg_url: str) -> dict[str, str]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT id, state FROM projects").fetchall()
    return {str(pid): str(state) for pid, state in rows}


def fleet_env(server: SimulatorServer, root: Path, pg_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(
        watcher_env(
            server,
            root,
            database_url=pg_url,
            log_format="json",
            log_level="info",
            lease_seconds=LEASE_SECONDS,
            store_timeout="2",
            store_retry_initial="0.2",
            store_retry_max="1",
            **extra,
        )
    )
    return env


def track(env: dict[str, str], specs: list[str], *extra: str) -> None:
    done = subprocess.run(
        [*WATCHER, "track", *extra, *specs],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_replica_cut_off_from_its_database_keeps_every_guarantee(
    serve: Serve, tmp_path: Path, pg_url: str, proxy: CuttableProxy
) -> None:
    """Replica a reaches the database through a proxy that is cut mid-run, then restored: a
    stops (its work with it), b takes a's projects over at once, a comes back and carries on,
    and in the end every project is deleted once, every output saved byte for byte, and no
    project worked on by both at once."""
    server = serve(RENDERS)
    sim = server.simulator
    specs = [f"image:{pid}" for pid in sim.create_projects(Kind.IMAGE, 60)]
    base = fleet_env(server, tmp_path, pg_url)
    track(base, specs, "--delete-after-download", "true")
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    a_env = {**base, "WATCHER_REPLICA_ID": "a", "WATCHER_DATABASE_URL": through(pg_url, proxy)}
    procs = {"a": spawn([*WATCHER, "run"], a_env, logs["a"])}
    try:

        def a_is_busy() -> bool:
            downloads = [e for e in sim.events() if e.what == "download" and replica(e) == "a"]
            return bool(downloads) and bool(held_by(pg_url, "a"))

        wait_for("replica a downloads and holds work", a_is_busy, within=60)
        procs["b"] = spawn([*WATCHER, "run"], {**base, "WATCHER_REPLICA_ID": "b"}, logs["b"])
        wait_for("b started", lambda: logged(logs["b"], "daemon_started"), within=60)
        wait_for("a holds work", lambda: bool(held_by(pg_url, "a")))
        held = held_by(pg_url, "a")
        proxy.cut()
        wait_for("a notices", lambda: logged(logs["a"], "liveness_lost"), within=10)
        wait_for("b takes a's work over", lambda: not held & held_by(pg_url, "a"), within=10)
        time.sleep(2)  # a stays cut off, trying again with backoff
        proxy.restore()
        wait_for("a is back", lambda: logged(logs["a"], "liveness_restored"), within=20)
        wait_for(
            "every project final",
            lambda: set(states(pg_url).values()) == {"deleted"},
            within=90,
        )
        for name, proc in procs.items():
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, logs[name].read_text()[-3000:]
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()

    events = sim.events()
    assert_no_project_worked_by_two_at_once(events)
    # Each project deleted once: one DELETE answered 204. A DELETE whose answer could not be
    # recorded (its sender was cut off right after) is sent again by whoever carries on, as
    # after a crash, and finds the project gone (404); never two at once.
    deletes: dict[str | None, list[int | None]] = defaultdict(list)
    for e in events:
        if e.what == "delete":
            deletes[e.project_id].append(e.status_code)
    assert len(deletes) == 60
    for pid, codes in deletes.items():
        assert codes[0] == 204, (pid, codes)
        assert all(code == 404 for code in codes[1:]), (pid, codes)
    assert {replica(e) for e in events if e.what == "get"} == {"a", "b"}
    files = [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".part")]
    expected = 0
    for spec in specs:
        pid = spec.partition(":")[2]
        for out in sim.truth(pid).outputs:
            expected += 1
            (saved,) = (tmp_path / "downloads" / "image" / pid).glob(f"{out.index}-*")
            assert hashlib.sha256(saved.read_bytes()).hexdigest() == out.sha256
    assert len(files) == expected
    for name in ("a", "b"):
        text = logs[name].read_text()
        assert "Traceback" not in text
        assert not [e for e in json_lines(logs[name]) if e["event"] == "store_error"]


@pytest.mark.timeout(60)
def test_a_project_tracked_elsewhere_wakes_an_idle_replica(
    serve: Serve, tmp_path: Path, pg_url: str
) -> None:
    """A replica whose claim loop would look again only in ten minutes still takes a project
    tracked by another process at once: the tracking transaction's NOTIFY wakes it."""
    server = serve(RENDERS)
    (pid,) = server.simulator.create_projects(Kind.IMAGE, 1)
    env = fleet_env(server, tmp_path, pg_url, claim_interval="600")
    log = tmp_path / "b.log"
    daemon = spawn([*WATCHER, "run"], {**env, "WATCHER_REPLICA_ID": "b"}, log)
    try:
        wait_for("b started", lambda: logged(log, "daemon_started"))
        time.sleep(0.5)  # b has looked for work, found none, and sleeps
        track(env, [f"image:{pid}"])
        wait_for("b saves it", lambda: states(pg_url) == {pid: "saved"}, within=40)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        daemon.kill()
        daemon.wait()
    assert {replica(e) for e in server.simulator.events() if e.what == "get"} == {"b"}
