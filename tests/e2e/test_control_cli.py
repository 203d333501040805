"""``watcher track --url`` and ``watcher status --url`` against a ``watcher run`` subprocess, and
the start-up refusals of the control plane's settings."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.e2e.test_cli import WATCHER, clean_env, run
from tests.integration.http_support import CONTROL_TOKEN, free_port
from tests.support import watcher_env
from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.timeline import ProjectOverrides

Serve = Callable[..., SimulatorServer]
CONFIG = SimConfig(
    seed=12,
    queued_seconds=(0.05, 0.2),
    rendering_seconds=(0.05, 0.2),
    error_rate=0,
    cancel_rate=0,
    output_bytes=(1_000, 4_000),
)


def wait_healthy(url: str, daemon: subprocess.Popen[str]) -> None:
    """Wait until the daemon's /healthz answers 200."""
    deadline = time.monotonic() + 20
    while True:
        assert daemon.poll() is None, daemon.communicate()[1]
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the daemon's HTTP server never answered"
        time.sleep(0.05)


def revive_and_untrack(
    url: str, env: dict[str, str], headers: dict[str, str], ids: list[str]
) -> None:
    """A project the API has never heard of ends not_found and ``track --url`` revives it;
    ``untrack --url`` forgets projects, and says which were not tracked."""
    missing = "nosuchproject1"
    assert run(["track", "--url", url, f"audio:{missing}"], env).returncode == 0
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/v1/projects/{missing}", headers=headers).json()["state"] != (
        "not_found"
    ):
        assert time.monotonic() < deadline, "the missing project never ended not_found"
        time.sleep(0.05)
    revived = run(["track", "--url", url, f"audio:{missing}"], env)
    assert revived.stdout.splitlines() == [f"tracked {missing}"], revived.stderr

    untracked = run(["untrack", "--url", url, missing, ids[0]], env)
    assert untracked.returncode == 0, untracked.stderr
    assert untracked.stdout.splitlines() == [f"untracked {missing}", f"untracked {ids[0]}"]
    again = run(["untrack", "--url", url, ids[0]], env)
    assert again.returncode == 1
    assert f"{ids[0]} is not tracked" in again.stderr


def test_track_and_status_through_a_running_daemon(serve: Serve, tmp_path: Path) -> None:
    """``track --url`` adds projects through the API (new, then already tracked, and a
    ``not_found`` one again), ``status --url`` shows them saved, ``untrack --url`` forgets them,
    a wrong token fails with exit 1, and SIGTERM still ends cleanly."""
    server = serve(CONFIG)
    ids = server.simulator.create_projects(
        Kind.AUDIO, 2, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(
        **watcher_env(
            server,
            tmp_path,
            http_enabled="true",
            http_port=str(port),
            control_token=CONTROL_TOKEN,
            log_format="json",
        )
    )
    daemon = subprocess.Popen(
        [*WATCHER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_healthy(url, daemon)
        health = run(["health"], env)
        assert health.returncode == 0, health.stderr
        assert health.stdout.strip() == f"healthy: {url}/healthz"
        tracked = run(["track", "--url", url, "--kind", "audio", *ids, f"audio:{ids[0]}"], env)
        assert tracked.returncode == 0, tracked.stderr
        assert tracked.stdout.splitlines() == [
            *(f"tracked {pid}" for pid in ids),
            f"already tracked {ids[0]}",
        ]

        headers = {"authorization": f"Bearer {CONTROL_TOKEN}"}
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/v1/projects", headers=headers).json()["counts"] != {"saved": 2}:
            assert time.monotonic() < deadline, "the projects were never saved"
            time.sleep(0.05)
        status = run(["status", "--url", url, "--json"], env)
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert doc["counts"] == {"saved": 2}
        assert sorted(p["id"] for p in doc["projects"]) == sorted(ids)
        assert all(o["state"] == "saved" for p in doc["projects"] for o in p["outputs"])
        table = run(["status", "--url", url], env).stdout.splitlines()
        assert table[0] == "projects: saved 2"
        assert sorted(line.split()[0] for line in table[2:]) == sorted(ids)

        revive_and_untrack(url, env, headers, ids)

        wrong = run(["status", "--url", url], {**env, "WATCHER_CONTROL_TOKEN": "wrong"})
        assert wrong.returncode == 1
        assert "WATCHER_CONTROL_TOKEN" in wrong.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=20)
    assert daemon.returncode == 0, err
    events = [json.loads(line)["event"] for line in out.splitlines() if line.strip()]
    assert "http_started" in events
    assert events[-1] == "daemon_stopped"
    assert CONTROL_TOKEN not in out + err


def test_a_public_address_without_a_control_token_refuses_to_start(tmp_path: Path) -> None:
    """``watcher run`` on 0.0.0.0 without WATCHER_CONTROL_TOKEN exits 2 naming the variable,
    before it opens the database."""
    env = clean_env(
        WATCHER_API_TOKEN="mhk_live_test",
        WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}",
        WATCHER_HTTP_HOST="0.0.0.0",  # noqa: S104 - the refused configuration itself
        WATCHER_HTTP_PORT=str(free_port()),
    )
    result = run(["run"], env, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("watcher: WATCHER_CONTROL_TOKEN: required")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w.db").exists()


def test_health_fails_clearly_when_nothing_answers_and_passes_with_http_off(
    serve: Serve, tmp_path: Path
) -> None:
    """``watcher health`` exits 1 naming the URL when no daemon listens; with HTTP off it has
    nothing to ask and exits 0."""
    server = serve(CONFIG)
    port = free_port()
    env = clean_env(**watcher_env(server, tmp_path, http_enabled="true", http_port=str(port)))
    down = run(["health"], env)
    assert down.returncode == 1
    assert down.stderr.strip().startswith(f"watcher: health: http://127.0.0.1:{port}/healthz")
    assert "Traceback" not in down.stderr
    off = run(["health"], clean_env(**watcher_env(server, tmp_path, http_enabled="false")))
    assert off.returncode == 0, off.stderr
    assert "WATCHER_HTTP_ENABLED=false" in off.stdout
