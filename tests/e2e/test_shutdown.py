"""SIGTERM and SIGINT during a large download: a clean exit, the ``.part`` kept, a resume after
the restart; a second signal ends the process at once."""

from __future__ import annotations

import hashlib
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
BIG = 400 * 1024 * 1024


def start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*WATCHER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def big_project(
    serve: Serve, tmp_path: Path, **extra: str
) -> tuple[SimulatorServer, str, dict[str, str]]:
    server = serve(SimConfig(seed=1, queued_seconds=(0.0, 0.0), rendering_seconds=(0.1, 0.1)))
    (pid,) = server.simulator.create_projects(
        Kind.VIDEO, 1, ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=1, output_size=BIG)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(watcher_env(server, tmp_path, projects=f"video:{pid}", log_format="json", **extra))
    return server, pid, env


def wait_for_part(folder: Path, at_least: int = 1024 * 1024, limit: float = 30) -> Path:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        parts = list(folder.rglob("*.part")) if folder.exists() else []
        if parts and parts[0].stat().st_size >= at_least:
            return parts[0]
        time.sleep(0.02)
    raise AssertionError("the download never started")


def events(text: str) -> list[str]:
    return [json.loads(line)["event"] for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_sigterm_mid_download_exits_clean_and_the_restart_resumes(
    serve: Serve, tmp_path: Path
) -> None:
    """With no grace left the download is cancelled, its .part kept, and the next run resumes it."""
    server, pid, env = big_project(serve, tmp_path, shutdown_grace="0")
    daemon = start(env)
    part = wait_for_part(tmp_path / "downloads")
    daemon.send_signal(signal.SIGTERM)
    out, err = daemon.communicate(timeout=15)
    assert daemon.returncode == 0, err
    assert "shutdown_cancelled_work" in events(out)
    kept = part.stat().st_size
    assert 0 < kept < BIG
    assert not (part.parent / part.name.removeprefix(".").removesuffix(".part")).exists()

    finish = subprocess.run(
        [*WATCHER, "run", "--until-done"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finish.returncode == 0, finish.stderr
    resumed = [
        e for e in server.simulator.events() if e.what == "download" and e.range and e.completed
    ]
    assert resumed, "the restart did not resume with a Range request"
    start_byte = int(resumed[0].range.removeprefix("bytes=").split("-")[0])  # type: ignore[union-attr]
    assert start_byte >= kept // 2
    final = part.parent / part.name.removeprefix(".").removesuffix(".part")
    digest = hashlib.sha256()
    with final.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == server.simulator.expected_sha256(pid, 0)
    assert not list((tmp_path / "downloads").rglob("*.part"))


@pytest.mark.slow
def test_sigint_lets_a_running_download_finish_within_the_grace(
    serve: Serve, tmp_path: Path
) -> None:
    """With enough grace, SIGINT waits for the download, which is saved before the exit."""
    server, pid, env = big_project(serve, tmp_path, shutdown_grace="60")
    daemon = start(env)
    wait_for_part(tmp_path / "downloads")
    daemon.send_signal(signal.SIGINT)
    out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    names = events(out)
    assert names.index("shutdown_requested") < names.index("download_saved")
    assert "shutdown_cancelled_work" not in names
    (saved,) = (tmp_path / "downloads").rglob("0-*")
    assert saved.stat().st_size == BIG
    assert server.simulator.truth(pid).outputs[0].size == BIG


@pytest.mark.slow
def test_a_second_signal_exits_at_once(serve: Serve, tmp_path: Path) -> None:
    """A second SIGTERM during the grace period ends the process immediately with status 130."""
    _, _, env = big_project(serve, tmp_path, shutdown_grace="60")
    daemon = start(env)
    wait_for_part(tmp_path / "downloads")
    daemon.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    daemon.send_signal(signal.SIGTERM)
    out, _ = daemon.communicate(timeout=10)
    assert daemon.returncode == 130
    assert "shutdown_forced" in events(out)


def test_sigterm_still_stops_the_daemon_when_nobody_reads_its_logs(
    serve: Serve, tmp_path: Path
) -> None:
    """A closed stdout (the log shipper died) neither blocks nor crashes the shutdown."""
    _, _, env = big_project(serve, tmp_path)
    daemon = start(env)
    wait_for_part(tmp_path / "downloads")
    assert daemon.stdout is not None
    daemon.stdout.close()  # every later log line hits a broken pipe
    daemon.send_signal(signal.SIGTERM)
    assert daemon.stderr is not None
    try:
        code = daemon.wait(timeout=30)
    finally:
        daemon.kill()
        stderr = daemon.stderr.read()
        daemon.stderr.close()
    assert code == 0, stderr
    assert "Traceback" not in stderr
