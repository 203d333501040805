"""Three ``watcher run`` replicas on one PostgreSQL database, one of them killed with SIGKILL:
its projects are taken over within seconds (long before its leases run out), every output is
saved once, byte for byte, no output is fetched by two replicas at the same time, the fleet keeps
one request budget, and no project is left behind."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support import spawn, watcher_env
from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Event

Serve = Callable[..., SimulatorServer]
# Leases far longer than the takeover may take: a dead replica's projects are taken over because
# its session ended, not because its leases ran out.
LEASE_SECONDS = 60
TAKEOVER_WITHIN = 10
RATE = 150
WATCHER = [sys.executable, "-m", "watcher"]
FINAL = {
    RemoteStatus.COMPLETE: "saved",
    RemoteStatus.ERROR: "error",
    RemoteStatus.CANCELED: "canceled",
}

FLEET = SimConfig(
    seed=77,
    queued_seconds=(0.2, 1.5),
    rendering_seconds=(0.5, 5.0),
    error_rate=0.05,
    cancel_rate=0.03,
    output_bytes=(20_000, 400_000),
)


def replica(event: Event) -> str:
    """The replica named in the request's User-Agent."""
    agent = event.user_agent or ""
    return agent.rpartition("(replica ")[2].rstrip(")")


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_no_project_worked_by_two_at_once(events: list[Event]) -> None:
    """No request about a project (GET, download, DELETE) by one replica overlaps in time with
    one by another replica: each project is worked on by one replica at a time."""
    spans: dict[str | None, list[tuple[float, float, str]]] = defaultdict(list)
    for e in events:
        if e.what in {"get", "download", "delete"} and e.project_id is not None:
            spans[e.project_id].append((e.at, e.ended_at or e.at, replica(e)))
    for pid, intervals in spans.items():
        latest_end: dict[str, float] = {}
        for start, end, who in sorted(intervals):
            for other, other_end in latest_end.items():
                if other != who:
                    assert start >= other_end, (pid, other, who, other_end, start)
            latest_end[who] = max(end, latest_end.get(who, end))


def held_by(pg_url: str, owner: str) -> set[str]:
    """The projects whose lease ``owner`` holds, as the database says."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT id FROM projects WHERE lease_owner = %s", (owner,)).fetchall()
    return {str(row[0]) for row in rows}


def assert_taken_over_in_time(pg_url: str, *, within: float) -> None:
    """The leases a killed replica held are all taken over within ``within`` seconds: no cron
    job, no operator, only the other replicas."""
    held = held_by(pg_url, "r2")
    assert held, "the killed replica held no lease: the takeover was not tried"
    deadline = time.monotonic() + within
    while remaining := held & held_by(pg_url, "r2"):
        assert time.monotonic() < deadline, f"still leased to the dead replica: {remaining}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_three_replicas_one_killed(serve: Serve, tmp_path: Path, pg_url: str) -> None:
    """300 projects, three replicas, one SIGKILLed mid-run: the others take its leases over
    within seconds though they would last a minute, finish everything, never work on one
    project together, and keep to one request budget."""
    server = serve(FLEET)
    sim = server.simulator
    specs = []
    for kind, count in ((Kind.IMAGE, 200), (Kind.VIDEO, 50), (Kind.AUDIO, 50)):
        specs += [f"{kind.value}:{pid}" for pid in sim.create_projects(kind, count)]
    base = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    base.update(
        watcher_env(
            server,
            tmp_path,
            database_url=pg_url,
            log_format="json",
            log_level="info",
            lease_seconds=str(LEASE_SECONDS),
            max_requests_per_second=str(RATE),
        )
    )
    # Tracked once, through the store, before the replicas start.
    tracked = subprocess.run(
        [*WATCHER, "track", *specs],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert tracked.returncode == 0, tracked.stderr
    procs = {}
    for name in ("r1", "r2", "r3"):
        env = {**base, "WATCHER_REPLICA_ID": name}
        # Logs go to files: a pipe nobody reads fills up and blocks the daemon's next log line.
        procs[name] = spawn([*WATCHER, "run"], env, tmp_path / f"{name}.log")
    deadline = time.monotonic() + 30
    while sum(1 for e in sim.events() if e.what == "download" and replica(e) == "r2") < 10:
        assert time.monotonic() < deadline, "replica r2 never downloaded"
        time.sleep(0.05)
    procs["r2"].send_signal(signal.SIGKILL)
    procs["r2"].wait(timeout=10)
    assert_taken_over_in_time(pg_url, within=TAKEOVER_WITHIN)

    finish = subprocess.run(
        [*WATCHER, "run", "--until-done", "--judge", "all"],
        env={**base, "WATCHER_REPLICA_ID": "r4", "WATCHER_HTTP_ENABLED": "false"},
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    logs = []
    for name in ("r1", "r3"):
        procs[name].send_signal(signal.SIGTERM)
        assert procs[name].wait(timeout=30) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
        logs += json_lines((tmp_path / f"{name}.log").read_text())
    logs += json_lines(finish.stdout)
    status = json.loads(
        subprocess.run(
            [*WATCHER, "status", "--json", "--limit", "1000"],
            env=base,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )

    projects = {p["id"]: p for p in status["projects"]}
    assert len(projects) == 300
    for pid, project in projects.items():
        truth = sim.truth(pid)
        assert project["state"] == FINAL[truth.timeline.final_status], project
        if project["state"] != "saved":
            continue
        for output, expected in zip(project["outputs"], truth.outputs, strict=True):
            data = (tmp_path / "downloads" / output["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == expected.sha256
    files = [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".part")]
    assert len(files) == sum(len(p["outputs"]) for p in projects.values())

    events = sim.events()
    assert_no_project_worked_by_two_at_once(events)
    seen = {replica(e) for e in events if e.what in {"get", "download"}}
    assert {"r1", "r2", "r3"} <= seen
    assert not [e for e in logs if e["event"] == "lease_lost"]
    assert finish.returncode == (0 if all(p["state"] == "saved" for p in projects.values()) else 1)
    # One budget for the fleet: in any window of one or five seconds the API saw no more calls
    # than the budget allows in it, plus the bucket's burst (one second's worth), plus the tokens
    # each of the four replicas may hold ahead (a tenth of a second's worth).
    calls = sorted(e.at for e in events if e.what in {"get", "delete"})
    for window in (1.0, 5.0):
        allowed = RATE * window + RATE + 4 * (RATE // 10)
        most = max(bisect.bisect_left(calls, t + window) - i for i, t in enumerate(calls))
        assert most <= allowed, (window, most, allowed)
