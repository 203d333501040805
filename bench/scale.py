"""Scenario "scale": the cost of one poll with 1,000 and with 100,000 projects tracked on SQLite.

Every project stays ``queued`` for days, so the watcher polls without end. Both sizes run with the
same fixed interval (``POLL_INITIAL = POLL_MAX``) short enough that both want more requests than
the rate budget (``MAX_REQUESTS_PER_SECOND``) admits: both poll at the same rate, so only the
number of tracked projects differs. The projects are written to a fresh SQLite file through the
store API before the daemon starts (as ``watcher track`` would, in one transaction).

Measured: after a warm-up, the daemon's CPU over a fixed window (``/proc/<pid>/stat``) divided by
the GETs the simulator answered in that window = CPU per poll; the peak RSS of the run; RSS per
tracked project = (peak RSS at the large size - at the small size) / difference in projects.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Profile, database_path, fresh_folder, watcher_argv, watcher_env
from bench.proc import Child, Measured
from bench.sim import SimProcess
from bench.stats import MB, Verdict, at_most, fmt, markdown_table, ratio
from watcher.models import Kind, ProjectRef
from watcher.store import create_store

SIM_CONFIG: dict[str, Any] = {
    "seed": 11,
    "timeline_start": "created",
    "error_rate": 0.0,
    "cancel_rate": 0.0,
}
QUEUED_FOREVER = {"queued_seconds": 10_000_000}
POLL_SECONDS = "2"
RATE = "100"
PROFILE = Profile(
    "scale",
    {
        "WATCHER_POLL_INITIAL": POLL_SECONDS,
        "WATCHER_POLL_MAX": POLL_SECONDS,
        "WATCHER_MAX_REQUESTS_PER_SECOND": RATE,
    },
)
STOP_TIMEOUT = 60.0
CPU_RATIO_LIMIT = 1.2


@dataclass(frozen=True, slots=True)
class ScaleRun:
    """The watcher polling ``tracked`` projects for a fixed window."""

    tracked: int
    first_get_after: float  # seconds from the daemon's start to its first GET
    window: float
    cpu: float  # CPU seconds used in the window
    polls: int  # GETs answered in the window
    projects_polled: int  # distinct projects among them
    measured: Measured

    @property
    def cpu_per_poll_ms(self) -> float:
        """Milliseconds of CPU per poll in the window."""
        return ratio(self.cpu * 1000, self.polls)

    def to_json(self) -> dict[str, Any]:
        """The raw numbers, for ``--json``."""
        return {
            "tracked": self.tracked,
            "first_get_after": self.first_get_after,
            "window": self.window,
            "cpu": self.cpu,
            "polls": self.polls,
            "projects_polled": self.projects_polled,
            "cpu_per_poll_ms": self.cpu_per_poll_ms,
            "max_rss_bytes": self.measured.max_rss_bytes,
            "exit_code": self.measured.exit_code,
        }


async def _track(database: Path, ids: list[str]) -> None:
    async with create_store(f"sqlite:///{database}") as store:
        refs = [ProjectRef(Kind.IMAGE, pid) for pid in ids]
        await store.track(refs, now=time.time(), delete_after_download=False)


def run_one(tracked: int, workdir: Path, *, warmup: float, window: float) -> ScaleRun:
    """Track ``tracked`` projects, run the daemon, measure the window after ``warmup`` seconds."""
    folder = fresh_folder(workdir / f"scale-{tracked}")
    with SimProcess(SIM_CONFIG) as sim:
        ids = sim.create(tracked, QUEUED_FOREVER)
        asyncio.run(_track(database_path(folder), ids))
        env = watcher_env(sim, folder, profile=PROFILE)
        with (folder / "client.log").open("wb") as log:
            child = Child(watcher_argv(until_done=False), env=env, stdout=log)
            time.sleep(warmup)
            start, cpu_start = time.time(), child.cpu_seconds()
            time.sleep(window)
            end, cpu_end = time.time(), child.cpu_seconds()
            child.signal(signal.SIGTERM)
            measured = child.wait(STOP_TIMEOUT)
        report = sim.report(folder / "simulator.json")
    times = [get[0] for get in report["gets"]]
    in_window = [get for get in report["gets"] if start <= get[0] < end]
    return ScaleRun(
        tracked=tracked,
        first_get_after=(min(times) - measured.started_at) if times else float("nan"),
        window=end - start,
        cpu=cpu_end - cpu_start,
        polls=len(in_window),
        projects_polled=len({get[1] for get in in_window}),
        measured=measured,
    )


def table(runs: list[ScaleRun]) -> str:
    """One row per size."""
    rows = [
        (
            f"{r.tracked:,}",
            "timeout" if r.measured.timed_out else str(r.measured.exit_code),
            fmt(r.first_get_after),
            fmt(r.window, 1),
            str(r.polls),
            fmt(r.polls / r.window, 1),
            str(r.projects_polled),
            fmt(r.cpu),
            fmt(r.cpu_per_poll_ms, 3),
            fmt(r.measured.max_rss_bytes / MB, 1),
        )
        for r in runs
    ]
    headers = (
        "tracked",
        "exit",
        "first GET after s",
        "window s",
        "polls in window",
        "polls/s",
        "projects polled",
        "CPU s in window",
        "CPU ms / poll",
        "peak RSS MB",
    )
    return markdown_table(headers, rows)


def verdicts(runs: list[ScaleRun]) -> list[Verdict]:
    """CPU per poll at the largest size within 1.2x of the smallest; RSS per project (reported)."""
    if len(runs) < 2:
        return []
    small, large = min(runs, key=lambda r: r.tracked), max(runs, key=lambda r: r.tracked)
    cpu_ratio = ratio(large.cpu_per_poll_ms, small.cpu_per_poll_ms)
    extra = large.tracked - small.tracked
    per_project = ratio(large.measured.max_rss_bytes - small.measured.max_rss_bytes, extra)
    return [
        Verdict(
            f"CPU/poll at {large.tracked:,} <= {CPU_RATIO_LIMIT} x at {small.tracked:,}",
            f"{fmt(cpu_ratio, 3)} x ({fmt(large.cpu_per_poll_ms, 3)} vs "
            f"{fmt(small.cpu_per_poll_ms, 3)} ms)",
            at_most(cpu_ratio, CPU_RATIO_LIMIT),
        ),
        Verdict(
            "RSS per tracked project (no target)",
            f"{fmt(per_project, 1)} bytes "
            f"({fmt(large.measured.max_rss_bytes / MB, 1)} - "
            f"{fmt(small.measured.max_rss_bytes / MB, 1)} MB over {extra:,} projects)",
            None,
            info=True,
        ),
    ]
