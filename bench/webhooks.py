"""Scenario "webhooks": N image projects whose simulator sends a signed webhook 0.2 s after each
render starts and ends (``image.started``, ``image.completed``, with the project object as
payload), the SDK (which knows nothing of webhooks) beside the watcher with its control API on
and ``WATCHER_WEBHOOK_SECRET`` set.

The projects are the fleet scenario's (bench/fleet.py: same seed, timelines and outputs). The
watcher's detection lag is read from its own store: ``terminal_at`` (the moment it recorded the
terminal status, whether a GET or an event told it) minus the render's end in the simulator's
truth; the SDK's is its first terminal GET answer, as in the fleet scenario. "Announced"
projects are those whose terminal event the watcher answered with a 2xx.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import fleet
from bench.common import Profile, database_path
from bench.stats import Verdict, at_most, fmt, markdown_table, percentile

SECRET = "whsec_bench"  # noqa: S105 - a signing secret of the bench's own
DELAY = 0.2


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookRun:
    """One client's run, with what the webhooks did."""

    run: fleet.FleetRun
    delivered: int  # events answered 2xx
    failed: int  # deliveries not answered 2xx (retried by the simulator)
    announced: int  # projects whose terminal event was answered 2xx
    announced_lags: list[float]

    def to_json(self) -> dict[str, Any]:
        """The raw numbers, for ``--json``."""
        return {
            **self.run.to_json(),
            "webhooks_delivered": self.delivered,
            "webhooks_failed": self.failed,
            "announced": self.announced,
            "announced_lag_p99": percentile(self.announced_lags, 99),
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_client(count: int, client: Profile | None, workdir: Path, timeout: float) -> WebhookRun:
    """One client over ``count`` fresh projects whose simulator sends webhooks to it."""
    port = _free_port()
    sim_config = {
        **fleet.SIM_CONFIG,
        "webhook_url": f"http://127.0.0.1:{port}/webhooks/magic-hour",
        "webhook_secret": SECRET,
        "webhook_delay": DELAY,
    }
    extra = {
        "WATCHER_HTTP_ENABLED": "true",
        "WATCHER_HTTP_PORT": str(port),
        "WATCHER_WEBHOOK_SECRET": SECRET,
    }
    run = fleet.run_client(
        count,
        client,
        workdir,
        timeout,
        scenario="webhooks",
        sim_config=sim_config if client is not None else None,
        extra=extra,
    )
    slug = "sdk" if client is None else f"watcher-{client.name}"
    folder = workdir / f"webhooks-{count}-{slug}"
    report = json.loads((folder / "simulator.json").read_text())
    ends = {pid: t["finishes_at"] for pid, t in report["truth"].items()}
    delivered = sum(1 for _, _, code in report["webhooks"] if code and code < 300)
    failed = len(report["webhooks"]) - delivered
    if client is None:
        return WebhookRun(run, delivered, failed, 0, [])
    seen = _terminal_at(database_path(folder))
    lags = [seen[pid] - end for pid, end in ends.items() if pid in seen and end is not None]
    announced = _announced(report)
    announced_lags = [seen[pid] - ends[pid] for pid in announced if pid in seen and ends[pid]]
    return WebhookRun(
        dataclasses.replace(run, lags=lags), delivered, failed, len(announced), announced_lags
    )


def _announced(report: dict[str, Any]) -> set[str]:
    """Projects whose terminal event was answered 2xx: the last delivery of each project is
    its terminal one (``started`` comes first, ``completed`` after the render's end)."""
    ends = {pid: t["finishes_at"] for pid, t in report["truth"].items()}
    return {
        pid
        for at, pid, code in report["webhooks"]
        if code and code < 300 and ends.get(pid) is not None and at >= ends[pid]
    }


def _terminal_at(db: Path) -> dict[str, float]:
    """When the watcher recorded each project's terminal status (its store's ``terminal_at``)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, terminal_at FROM projects WHERE terminal_at IS NOT NULL")
        return {str(pid): float(at) for pid, at in rows}


def _watcher_only(cell: Callable[[WebhookRun], str]) -> Callable[[WebhookRun], str]:
    """A column that says nothing (``-``) of the SDK, which receives no webhooks."""
    return lambda w: "-" if w.run.client == fleet.SDK_LABEL else cell(w)


# The per-client table's columns: header, and the cell of a run.
COLUMNS: tuple[tuple[str, Callable[[WebhookRun], str]], ...] = (
    ("client", lambda w: w.run.client),
    ("exit", lambda w: "timeout" if w.run.measured.timed_out else str(w.run.measured.exit_code)),
    ("wall s", lambda w: fmt(w.run.measured.wall_seconds)),
    ("GETs / project", lambda w: fmt(w.run.gets_per_project)),
    ("webhooks delivered", _watcher_only(lambda w: f"{w.delivered} ({w.failed} failed)")),
    ("announced", _watcher_only(lambda w: str(w.announced))),
    ("lag p50 s", lambda w: fmt(w.run.lag(50), 3)),
    ("lag p99 s", lambda w: fmt(w.run.lag(99), 3)),
    ("announced lag p99 s", _watcher_only(lambda w: fmt(percentile(w.announced_lags, 99), 3))),
    ("CPU s", lambda w: fmt(w.run.measured.cpu_seconds)),
    ("outputs correct", lambda w: f"{w.run.outputs_ok}/{w.run.outputs_expected}"),
)


def table(runs: list[WebhookRun]) -> str:
    """The per-client table."""
    headers = [header for header, _ in COLUMNS]
    return markdown_table(headers, [[cell(w) for _, cell in COLUMNS] for w in runs])


def verdicts(count: int, runs: list[WebhookRun]) -> list[Verdict]:
    """Issue 11's targets: <= 1.5 GETs per project, announced lag p99 <= 0.5 s."""
    result: list[Verdict] = []
    for w in runs:
        r = w.run
        if r.client == fleet.SDK_LABEL:
            continue
        result.append(fleet.saves_every_output(f"webhooks {count}", r))
        result.append(
            Verdict(
                f"webhooks {count}: {r.client} GETs/project <= 1.5",
                fmt(r.gets_per_project),
                at_most(r.gets_per_project, 1.5),
            )
        )
        p99 = percentile(w.announced_lags, 99)
        result.append(
            Verdict(
                f"webhooks {count}: {r.client} lag p99 of announced projects <= 0.5 s",
                f"{fmt(p99, 3)} s ({w.announced} announced)",
                at_most(p99, 0.5),
            )
        )
    return result
