"""Chaos: every fault of the simulator at once, a short URL lifetime, and ``kill -9`` at random
moments. Whatever happens, every output ends on disk exactly as served, no DELETE comes before
its project's downloads, nothing temporary is left behind and the token is never logged."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import spawn, watcher_env
from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import Faults, SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator

Serve = Callable[..., SimulatorServer]
WATCHER = [sys.executable, "-m", "watcher"]
FINAL = {
    RemoteStatus.COMPLETE: "deleted",
    RemoteStatus.ERROR: "error",
    RemoteStatus.CANCELED: "canceled",
}

CHAOS = SimConfig(
    seed=2026,
    queued_seconds=(0.1, 1.0),
    rendering_seconds=(0.2, 3.0),
    error_rate=0.1,
    cancel_rate=0.05,
    output_bytes=(5_000, 300_000),
    url_lifetime=3.0,
    faults=Faults(
        rate_429=0.05,
        retry_after=0.3,
        rate_5xx=0.06,
        rate_reset=0.04,
        rate_slow=0.03,
        slow_seconds=0.4,
        rate_broken_json=0.04,
        rate_truncate=0.15,
    ),
)


def env_for(server: SimulatorServer, root: Path, projects: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(
        watcher_env(
            server,
            root,
            projects=projects,
            delete_after_download="true",
            log_format="json",
            lease_seconds="5",
        )
    )
    return env


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a transcript is one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_no_delete_before_download(sim: Simulator) -> None:
    saved: dict[str, set[int]] = {}
    for event in sim.events():
        if event.what == "download" and event.completed:
            assert event.project_id is not None
            assert event.index is not None
            saved.setdefault(event.project_id, set()).add(event.index)
        elif event.what == "delete" and event.status_code in {204, 404}:
            assert event.project_id is not None
            wanted = {o.index for o in sim.truth(event.project_id).outputs}
            assert saved.get(event.project_id, set()) >= wanted, event


def deletes_seen(sim: Simulator) -> int:
    """How many DELETEs the simulator has answered."""
    return sum(1 for e in sim.events() if e.what == "delete")


def wait_for_deletes(sim: Simulator, *, at_least: int, within: float) -> None:
    """Wait until the simulator has answered ``at_least`` DELETEs."""
    deadline = time.monotonic() + within
    while deletes_seen(sim) < at_least:
        assert time.monotonic() < deadline, "no DELETE came: the kill cannot hit the delete phase"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_kill_9_under_every_fault_loses_nothing(serve: Serve, tmp_path: Path) -> None:
    """150+ projects, all faults on, SIGKILL three times (once among the DELETEs, then down
    longer than a URL lives): every output saved byte for byte, no DELETE before its downloads."""
    server = serve(CHAOS)
    sim = server.simulator
    specs = []
    for kind, count in ((Kind.IMAGE, 100), (Kind.VIDEO, 30), (Kind.AUDIO, 25)):
        specs += [f"{kind.value}:{pid}" for pid in sim.create_projects(kind, count)]
    env = env_for(server, tmp_path, " ".join(specs))
    rng = random.Random(99)
    transcripts: list[str] = []

    for run in range(3):
        log = tmp_path / f"run{run}.log"
        daemon = spawn([*WATCHER, "run"], env, log)
        if run == 1:  # the second run dies in the middle of the delete phase
            wait_for_deletes(sim, at_least=deletes_seen(sim) + 3, within=20)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            time.sleep(rng.uniform(1.0, 3.0))
        daemon.send_signal(signal.SIGKILL)
        assert daemon.wait(timeout=10) == -signal.SIGKILL
        transcripts.append(log.read_text())
        if run == 1:  # down longer than a URL lives: the links recorded so far are all stale
            time.sleep(CHAOS.url_lifetime + 0.5)

    final = subprocess.run(
        [*WATCHER, "run", "--until-done"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    transcripts += [final.stdout, final.stderr]
    status = json.loads(
        subprocess.run(
            [*WATCHER, "status", "--json", "--limit", "1000"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )

    projects = {p["id"]: p for p in status["projects"]}
    assert len(projects) == len(specs)
    for pid, project in projects.items():
        truth = sim.truth(pid)
        assert project["state"] == FINAL[truth.timeline.final_status], project
        if project["state"] != "deleted":
            continue
        assert len(project["outputs"]) == len(truth.outputs)
        for output, expected in zip(project["outputs"], truth.outputs, strict=True):
            data = (tmp_path / "downloads" / output["path"]).read_bytes()
            assert len(data) == expected.size
            assert hashlib.sha256(data).hexdigest() == expected.sha256 == output["sha256"]
    assert final.returncode == (0 if all(p["state"] == "deleted" for p in projects.values()) else 1)
    assert_no_delete_before_download(sim)
    assert not list((tmp_path / "downloads").rglob("*.part"))
    faults = {e.fault for e in sim.events() if e.fault}
    assert {"429", "5xx", "reset", "broken_json", "truncate"} <= faults, faults
    token = sim.config.token
    events = []
    for text in transcripts:
        assert token not in text
        events += json_lines(text)
    names = {e["event"] for e in events}
    assert {"api_retry", "download_url_stale"} <= names, names
    assert any(e.get("resumed_from", 0) > 0 for e in events if e["event"] == "download_saved")
