"""``watcher run`` out of file descriptors: its descriptor limit is lowered from outside
(``prlimit``) while sockets pile up on its port, so accept() fails with ``EMFILE``. The log
stays JSON with one warning for the burst, and the daemon carries on once they are gone."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.http_support import free_port
from tests.support import spawn, watcher_env
from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.timeline import ProjectOverrides

Serve = Callable[..., SimulatorServer]
WATCHER = [sys.executable, "-m", "watcher"]
QUICK = SimConfig(seed=3, queued_seconds=(0.0, 0.0), rendering_seconds=(0.05, 0.1))
pytestmark = pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")


def wait_for(check: Callable[[], object], within: float = 20) -> object:
    """Poll ``check`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {within} s")


def logged(log: Path, event: str) -> list[dict[str, object]]:
    lines = log.read_text("utf-8").splitlines() if log.exists() else []
    return [
        e
        for e in (json.loads(line) for line in lines if line.startswith("{"))
        if e["event"] == event
    ]


def open_descriptors(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def test_running_out_of_descriptors_logs_one_json_warning(serve: Serve, tmp_path: Path) -> None:
    """With accept() failing on EMFILE, every line of output is still JSON, the failures are
    one ``http_accept_failed`` warning, and afterwards the API answers and a project is saved."""
    server = serve(QUICK)
    (pid,) = server.simulator.create_projects(
        Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(
        watcher_env(
            server,
            tmp_path,
            http_enabled="true",
            http_port=str(port),
            http_read_timeout="30",
            log_format="json",
            log_level="info",
        )
    )
    log = tmp_path / "watcher.log"
    process = spawn([*WATCHER, "run"], env, log)
    sockets: list[socket.socket] = []
    try:
        wait_for(lambda: logged(log, "http_started"))
        limits = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(
            process.pid, resource.RLIMIT_NOFILE, (open_descriptors(process.pid) + 5, limits[1])
        )
        # The kernel completes these connections; the watcher cannot accept them all.
        sockets += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        wait_for(lambda: logged(log, "http_accept_failed"))
        for sock in sockets:
            sock.close()
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, limits)

        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 200)
        tracked = httpx.post(f"{base}/v1/projects", json={"id": pid, "kind": "image"}, timeout=5)
        assert tracked.status_code == 201, tracked.text
        wait_for(
            lambda: httpx.get(f"{base}/v1/projects/{pid}", timeout=5).json()["state"] == "saved"
        )
    finally:
        for sock in sockets:
            sock.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0
    lines = log.read_text("utf-8").splitlines()
    not_json = [line for line in lines if not line.startswith("{")]
    assert not_json == [], not_json[:5]
    failures = logged(log, "http_accept_failed")
    assert len(failures) == 1, failures
    assert failures[0]["level"] == "warning"
    assert str(failures[0]["error"]).startswith("EMFILE")
