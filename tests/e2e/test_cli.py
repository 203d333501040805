"""The ``watcher`` command as a subprocess: settings errors, signals, track/status, the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import watcher_env
from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.timeline import ProjectOverrides

Serve = Callable[..., SimulatorServer]
WATCHER = [sys.executable, "-m", "watcher"]


def clean_env(**variables: str) -> dict[str, str]:
    """The process environment without any WATCHER_* variable, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(variables)
    return env


def run(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WATCHER, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def json_lines(text: str) -> list[dict[str, object]]:
    """Every stdout line must be one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_bad_settings_exit_2_with_one_line_each(tmp_path: Path) -> None:
    """Each bad setting is named on its own line, with exit status 2 and no traceback."""
    env = clean_env(
        WATCHER_API_TOKEN="mhk_live_secret_value",
        WATCHER_POLL_MAX="soon",
        WATCHER_MAX_CONCURRENT_REQUESTS="0",
        WATCHER_PROJECTS="good1 ../../etc/passwd",
        WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}",
    )
    result = run(["run"], env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert any("WATCHER_POLL_MAX" in line for line in lines)
    assert any("WATCHER_MAX_CONCURRENT_REQUESTS" in line for line in lines)
    assert any("WATCHER_PROJECTS" in line and "../../etc/passwd" in line for line in lines)
    assert "Traceback" not in result.stderr
    assert "mhk_live_secret_value" not in result.stderr + result.stdout


def test_missing_token_exits_2(tmp_path: Path) -> None:
    """``watcher run`` without a token refuses to start and says which variable to set."""
    result = run(["run"], clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}"))
    assert result.returncode == 2
    assert "WATCHER_API_TOKEN" in result.stderr


def test_track_refuses_a_malformed_id(tmp_path: Path) -> None:
    """``watcher track`` names the bad id and tracks nothing."""
    env = clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}")
    result = run(["track", "goodid", "bad/id"], env)
    assert result.returncode == 2
    assert "bad/id" in result.stderr
    status = run(["status", "--json"], env)
    assert json.loads(status.stdout)["projects"] == []


def test_sigterm_stops_cleanly_and_a_restart_finishes(serve: Serve, tmp_path: Path) -> None:
    """SIGTERM ends ``watcher run`` with status 0; ``run --until-done`` then finishes the work,
    a project added with ``watcher track`` included, and no log line carries the token."""
    server = serve(
        SimConfig(
            seed=3,
            queued_seconds=(1.0, 2.0),
            rendering_seconds=(0.5, 1.0),
            error_rate=0,
            cancel_rate=0,
        )
    )
    sim = server.simulator
    ids = sim.create_projects(Kind.IMAGE, 5)
    env = clean_env(**watcher_env(server, tmp_path, projects=" ".join(ids), log_format="json"))

    daemon = subprocess.Popen(
        [*WATCHER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    while not any(e.what == "get" for e in sim.events()):
        assert time.monotonic() < deadline, "the daemon never polled"
        time.sleep(0.05)
    (extra,) = sim.create_projects(Kind.AUDIO, 1, ProjectOverrides(status=RemoteStatus.COMPLETE))
    tracked = run(["track", "--kind", "audio", extra], env)
    assert tracked.returncode == 0, tracked.stderr
    assert f"tracked {extra}" in tracked.stdout
    daemon.send_signal(signal.SIGTERM)
    out, err = daemon.communicate(timeout=20)
    assert daemon.returncode == 0, err
    events = [e["event"] for e in json_lines(out)]
    assert "shutdown_requested" in events
    assert events[-1] == "daemon_stopped"

    finish = run(["run", "--until-done"], env)
    assert finish.returncode == 0, finish.stderr
    status = json.loads(run(["status", "--json"], env).stdout)
    assert status["counts"] == {"saved": 6}
    assert {p["id"] for p in status["projects"]} == {*ids, extra}
    for project in status["projects"]:
        for output in project["outputs"]:
            assert output["state"] == "saved"
            assert (tmp_path / "downloads" / output["path"]).is_file()
    token = sim.config.token
    assert token not in out + err + finish.stdout + finish.stderr


def test_status_table_is_readable(serve: Serve, tmp_path: Path) -> None:
    """``watcher status`` prints a summary line and one row per project."""
    env = clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}")
    assert run(["track", "video:abc123", "image:def456"], env).returncode == 0
    table = run(["status"], env).stdout.splitlines()
    assert table[0] == "projects: polling 2"
    assert table[1].split() == ["ID", "KIND", "STATE", "REMOTE", "POLLS", "SAVED", "NOTE"]
    assert sorted(line.split()[0] for line in table[2:]) == ["abc123", "def456"]


@pytest.mark.slow
def test_demo_runs_from_nothing(tmp_path: Path) -> None:
    """``watcher demo`` serves the simulator, saves every output, verifies them and exits 0."""
    result = run(["demo", "--dir", str(tmp_path / "demo")], clean_env(), timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "every output saved and verified" in result.stdout
    saved = [p for p in (tmp_path / "demo" / "downloads").rglob("*") if p.is_file()]
    assert saved
    assert not [p for p in saved if p.name.endswith(".part")]
