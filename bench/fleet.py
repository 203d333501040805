"""Scenario "fleet": N image projects, each client on its own simulator with the same seed.
(Its second part, :func:`run_takeover`, runs the watcher as a fleet of replicas: see there.)

Every project renders for 2.5 to 8 s counted from its first GET (queued 0.5-2 s, rendering
2-6 s, always ``complete``) and has 1 or 2 outputs of 200,000 bytes. The simulators share a seed,
so both clients face the same ids, timelines and bytes. Measured per client: wall time until the
process exits with every output saved, API GETs and downloads per project (from the simulator's
log), detection lag (first terminal answer minus the render's end, from the simulator), CPU
seconds and peak RSS of the client process, and outputs on disk whose sha256 matches the truth.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.common import (
    Profile,
    base_env,
    folder_digests,
    fresh_folder,
    warning_lines,
    watcher_argv,
    watcher_env,
)
from bench.proc import Child, Measured
from bench.sim import SimProcess
from bench.stats import (
    MB,
    Verdict,
    at_most,
    fmt,
    markdown_table,
    outputs_correct,
    percentile,
    ratio,
)

SDK_WORKER = Path(__file__).with_name("sdk_worker.py")
SEED = 2024
SIM_CONFIG: dict[str, Any] = {
    "seed": SEED,
    "queued_seconds": [0.5, 2.0],
    "rendering_seconds": [2.0, 6.0],
    "error_rate": 0.0,
    "cancel_rate": 0.0,
    "image_outputs": [1, 2],
    "output_bytes": [200_000, 200_000],
    "timeline_start": "first_get",
}
SDK_LABEL = "SDK"
SDK_INTERVAL = 0.5


@dataclass(frozen=True, slots=True)
class FleetRun:
    """One client's run over N projects."""

    client: str
    settings: str
    projects: int
    measured: Measured
    last_render_end: float  # seconds from the client's start to the last render's end
    gets: int
    downloads: int
    lags: list[float]
    outputs_expected: int
    outputs_ok: int
    sim_cpu: float
    user_agents: dict[str, int]
    log_lines: int
    render_seconds: list[float]  # each project's render time, from its first GET
    outcome: str  # the SDK worker's summary, or the watcher's exit status

    @property
    def sdk_nominal_gets(self) -> float:
        """GETs per project the SDK's loop makes when never short of CPU.

        ``check_result`` GETs once, then loops GET-then-sleep(0.5) until a GET sees a terminal
        status: 2 + ceil(T / 0.5) GETs for a render of T seconds (request time neglected).
        """
        counts = [2 + math.ceil(t / SDK_INTERVAL) for t in self.render_seconds]
        return sum(counts) / len(counts) if counts else math.nan

    @property
    def gets_per_project(self) -> float:
        """API GETs per project."""
        return self.gets / self.projects

    @property
    def wall_ratio(self) -> float:
        """Wall time over the moment the last render ended (1.0 = no time after it)."""
        return ratio(self.measured.wall_seconds, self.last_render_end)

    def lag(self, q: float) -> float:
        """The ``q``-th percentile of detection lag, seconds (NaN if nothing was detected)."""
        return percentile(self.lags, q)

    def to_json(self) -> dict[str, Any]:
        """The raw numbers, for ``--json``."""
        m = self.measured
        return {
            "client": self.client,
            "settings": self.settings,
            "projects": self.projects,
            "exit_code": m.exit_code,
            "wall_seconds": m.wall_seconds,
            "cpu_user": m.cpu_user,
            "cpu_system": m.cpu_system,
            "max_rss_bytes": m.max_rss_bytes,
            "last_render_end": self.last_render_end,
            "gets": self.gets,
            "downloads": self.downloads,
            "lag_p50": self.lag(50),
            "lag_p99": self.lag(99),
            "lag_max": self.lag(100),
            "detected": len(self.lags),
            "outputs_expected": self.outputs_expected,
            "outputs_ok": self.outputs_ok,
            "sim_cpu": self.sim_cpu,
            "user_agents": self.user_agents,
            "log_lines": self.log_lines,
            "sdk_nominal_gets": self.sdk_nominal_gets,
            "outcome": self.outcome,
        }


def run_client(
    count: int,
    client: Profile | None,
    workdir: Path,
    timeout: float,
    *,
    scenario: str = "fleet",
    sim_config: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
) -> FleetRun:
    """Run one client (``None``: the SDK) over ``count`` fresh projects on a fresh simulator
    (``SIM_CONFIG``, or ``sim_config``), in ``workdir/<scenario>-<count>-<client>``; ``extra``
    adds settings to a watcher's environment."""
    slug = "sdk" if client is None else f"watcher-{client.name}"
    folder = fresh_folder(workdir / f"{scenario}-{count}-{slug}")
    downloads = folder / "downloads"
    with SimProcess(sim_config or SIM_CONFIG) as sim:
        ids = sim.create(count)
        log = folder / "client.log"
        with log.open("wb") as out:
            if client is None:
                ids_file = folder / "ids.txt"
                ids_file.write_text("\n".join(ids) + "\n")
                argv = [
                    sys.executable,
                    str(SDK_WORKER),
                    sim.base_url,
                    sim.token,
                    str(ids_file),
                    str(downloads),
                ]
                env = base_env()
            else:
                argv = watcher_argv(until_done=True)
                env = watcher_env(sim, folder, profile=client, projects=ids, extra=extra)
            sim_cpu_before = sim.cpu_seconds()
            measured = Child(argv, env=env, stdout=out).wait(timeout)
            sim_cpu = sim.cpu_seconds() - sim_cpu_before
        report = sim.report(folder / "simulator.json", truth=ids)
    return _summarise(
        count,
        client=client,
        measured=measured,
        report=report,
        project_root=downloads if client is None else downloads / "image",
        log=log,
        sim_cpu=sim_cpu,
    )


def _summarise(
    count: int,
    *,
    client: Profile | None,
    measured: Measured,
    report: dict[str, Any],
    project_root: Path,
    log: Path,
    sim_cpu: float,
) -> FleetRun:
    truth: dict[str, Any] = report["truth"]
    first_terminal: dict[str, float] = report["first_terminal"]
    ends = [t["finishes_at"] for t in truth.values() if t["finishes_at"] is not None]
    last_end = max(ends) - measured.started_at if len(ends) == len(truth) else math.nan
    lags = [
        first_terminal[pid] - t["finishes_at"]
        for pid, t in truth.items()
        if pid in first_terminal and t["finishes_at"] is not None
    ]
    expected = {pid: [o["sha256"] for o in t["outputs"]] for pid, t in truth.items()}
    found = {pid: folder_digests(project_root / pid) for pid in truth}
    return FleetRun(
        client=SDK_LABEL if client is None else client.label,
        settings="MAGIC_HOUR_POLL_INTERVAL=0.5 (default)" if client is None else client.describe(),
        projects=count,
        measured=measured,
        last_render_end=last_end,
        gets=len(report["gets"]),
        downloads=len(report["downloads"]),
        lags=lags,
        outputs_expected=sum(len(v) for v in expected.values()),
        outputs_ok=outputs_correct(expected, found),
        sim_cpu=sim_cpu,
        user_agents=report["user_agents"],
        log_lines=0 if client is None else warning_lines(log),
        render_seconds=[
            t["finishes_at"] - t["clock_started_at"]
            for t in truth.values()
            if t["finishes_at"] is not None
        ],
        outcome=_sdk_outcome(log) if client is None else f"exit {measured.exit_code}",
    )


def _sdk_outcome(log: Path) -> str:
    """The SDK worker's last line, ``{"ok", "failed", "errors"}``, as a short sentence."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    try:
        summary = json.loads(lines[-1])
    except (IndexError, ValueError):
        return "no summary (crashed or killed)"
    kinds = sorted({error.split(":", 1)[0] for error in summary["errors"]})
    failed = f", {summary['failed']} raised {'/'.join(kinds)}" if summary["failed"] else ""
    return f"{summary['ok']} check_result calls returned{failed}"


def table(runs: list[FleetRun]) -> str:
    """The per-client table of one fleet size."""
    headers = (
        "client",
        "exit",
        "wall s",
        "last render ends s",
        "wall / last end",
        "GETs / project",
        "downloads / project",
        "lag p50 s",
        "lag p99 s",
        "lag max s",
        "CPU s",
        "peak RSS MB",
        "outputs correct",
        "simulator CPU s",
    )
    rows = []
    for r in runs:
        m = r.measured
        rows.append(
            (
                r.client,
                "timeout" if m.timed_out else str(m.exit_code),
                fmt(m.wall_seconds),
                fmt(r.last_render_end),
                fmt(r.wall_ratio, 3),
                fmt(r.gets_per_project),
                fmt(r.downloads / r.projects),
                fmt(r.lag(50), 3),
                fmt(r.lag(99), 3),
                fmt(r.lag(100), 3),
                fmt(m.cpu_seconds),
                fmt(m.max_rss_bytes / MB, 1),
                f"{r.outputs_ok}/{r.outputs_expected}",
                fmt(r.sim_cpu),
            )
        )
    return markdown_table(headers, rows)


def settings_table(runs: list[FleetRun]) -> str:
    """Which settings each client ran with."""
    return markdown_table(("client", "settings"), [(r.client, r.settings) for r in runs])


def saves_every_output(title: str, run: FleetRun) -> Verdict:
    """The verdict on whether ``run`` saved every output correctly, in time."""
    return Verdict(
        f"{title}: {run.client} saves every output correctly",
        f"{run.outputs_ok}/{run.outputs_expected} ({run.log_lines} warning lines logged)",
        run.outputs_ok == run.outputs_expected and not run.measured.timed_out,
    )


def verdicts(count: int, runs: list[FleetRun]) -> list[Verdict]:
    """The issue's targets for this fleet size, for every watcher run, against the SDK's run."""
    sdk = next((r for r in runs if r.client == SDK_LABEL), None)
    result: list[Verdict] = []
    if sdk is not None:
        result.append(Verdict(f"{count}: the SDK's own outcome", sdk.outcome, None, info=True))
    for run in runs:
        if run.client == SDK_LABEL:
            continue
        result.append(saves_every_output(str(count), run))
        p99 = run.lag(99)
        result.append(
            Verdict(f"{count}: {run.client} lag p99 < 1.5 s", f"{fmt(p99, 3)} s", _below(p99, 1.5))
        )
        if sdk is None:
            continue
        if count <= 100:
            share = ratio(run.gets_per_project, sdk.gets_per_project)
            nominal = ratio(run.gets_per_project, run.sdk_nominal_gets)
            result.append(
                Verdict(
                    f"{count}: {run.client} GETs/project <= 0.5 x SDK",
                    f"{fmt(share, 3)} x ({fmt(run.gets_per_project)} vs "
                    f"{fmt(sdk.gets_per_project)}); {fmt(nominal, 3)} x the SDK's nominal "
                    f"{fmt(run.sdk_nominal_gets)}",
                    at_most(share, 0.5),
                )
            )
        else:
            result.append(
                Verdict(
                    f"{count}: {run.client} wall <= 1.15 x last render end",
                    f"{fmt(run.wall_ratio, 3)} x ({fmt(run.measured.wall_seconds)} s vs "
                    f"{fmt(run.last_render_end)} s)",
                    at_most(run.wall_ratio, 1.15),
                )
            )
            share = ratio(run.measured.cpu_seconds, sdk.measured.cpu_seconds)
            result.append(
                Verdict(
                    f"{count}: {run.client} CPU <= 1/30 of SDK ({fmt(1 / 30, 4)})",
                    f"{fmt(share, 4)} = 1/{fmt(ratio(1, share), 1)} "
                    f"({fmt(run.measured.cpu_seconds)} s vs {fmt(sdk.measured.cpu_seconds)} s)",
                    at_most(share, 1 / 30),
                )
            )
    return result


def _below(value: float, limit: float) -> bool | None:
    return None if math.isnan(value) else value < limit


def dump(runs: list[FleetRun]) -> str:
    """The raw numbers of the runs as JSON."""
    return json.dumps([r.to_json() for r in runs], indent=2)


# --- the fleet as replicas: what a SIGKILLed replica costs ---------------------------------------

ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
POLL_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class TakeoverRun:
    """N projects worked by a fleet of replicas on one PostgreSQL database, one of them
    SIGKILLed ``kill_after`` seconds in (or none)."""

    projects: int
    replicas: int
    kill_after: float | None
    wall_seconds: float  # from the replicas' start until the store says every project is final
    held_at_kill: int  # projects leased to the killed replica when it died
    takeover_seconds: float  # from the kill until none of those is leased to it any more
    outputs_expected: int
    outputs_ok: int
    timed_out: bool

    def to_json(self) -> dict[str, Any]:
        """The raw numbers, for ``--json``."""
        return {
            "projects": self.projects,
            "replicas": self.replicas,
            "kill_after": self.kill_after,
            "wall_seconds": self.wall_seconds,
            "held_at_kill": self.held_at_kill,
            "takeover_seconds": self.takeover_seconds,
            "outputs_expected": self.outputs_expected,
            "outputs_ok": self.outputs_ok,
            "timed_out": self.timed_out,
        }


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    """A database of the bench's own on ``BENCH_POSTGRES_URL``'s server, dropped afterwards."""
    name = f"watcher_bench_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _leased_to(conn: psycopg.Connection[Any], owner: str) -> set[str]:
    rows = conn.execute("SELECT id FROM projects WHERE lease_owner = %s", (owner,)).fetchall()
    return {str(row[0]) for row in rows}


def _active(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM projects WHERE state IN ('polling', 'downloading', 'deleting')"
    ).fetchone()
    return int(row[0]) if row else 0


def run_takeover(
    count: int, workdir: Path, timeout: float, *, replicas: int = 3, kill_after: float | None
) -> TakeoverRun:
    """``count`` fresh projects tracked into a fresh PostgreSQL database, then ``replicas``
    plain ``watcher run`` processes (``r1``…, the defaults but a 1000/s request budget, 60 s
    leases) on one download volume; with ``kill_after``, ``r2`` is SIGKILLed that many seconds
    in (or at the first moment after that when it holds a lease). Measured from the store,
    every ``POLL_SECONDS``: how long until no project is active, and how long after the kill
    until none of the projects ``r2`` held is leased to it any more."""
    slug = "none" if kill_after is None else f"kill-{kill_after:g}"
    folder = fresh_folder(workdir / f"takeover-{count}-{slug}")
    with (
        bench_database() as url,
        SimProcess(SIM_CONFIG) as sim,
        psycopg.connect(url, autocommit=True) as probe,
    ):
        ids = sim.create(count)
        profile = Profile("fleet", {"WATCHER_MAX_REQUESTS_PER_SECOND": "1000"})
        env = watcher_env(sim, folder, profile=profile, extra={"WATCHER_DATABASE_URL": url})
        tracker = [sys.executable, "-m", "watcher", "track", *(f"image:{pid}" for pid in ids)]
        subprocess.run(tracker, env=env, check=True, capture_output=True, timeout=120)
        started = time.monotonic()
        procs = _start_replicas(replicas, env, folder)
        try:
            wall, held, takeover = _observe(procs, probe, started, timeout, kill_after)
        finally:
            _stop(procs)
        report = sim.report(folder / "simulator.json", truth=ids)
    truth: dict[str, Any] = report["truth"]
    expected = {pid: [o["sha256"] for o in t["outputs"]] for pid, t in truth.items()}
    found = {pid: folder_digests(folder / "downloads" / "image" / pid) for pid in truth}
    return TakeoverRun(
        projects=count,
        replicas=replicas,
        kill_after=kill_after,
        wall_seconds=wall,
        held_at_kill=len(held),
        takeover_seconds=takeover if held else math.nan,
        outputs_expected=sum(len(v) for v in expected.values()),
        outputs_ok=outputs_correct(expected, found),
        timed_out=math.isnan(wall),
    )


def _start_replicas(
    replicas: int, env: dict[str, str], folder: Path
) -> dict[str, subprocess.Popen[bytes]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for i in range(1, replicas + 1):
        name = f"r{i}"
        with (folder / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen(
                watcher_argv(until_done=False),
                env={**env, "WATCHER_REPLICA_ID": name},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    return procs


def _observe(
    procs: dict[str, subprocess.Popen[bytes]],
    probe: psycopg.Connection[Any],
    started: float,
    timeout: float,
    kill_after: float | None,
) -> tuple[float, set[str], float]:
    """Kill ``r2`` when it is time, and watch the store: (wall seconds until no project is
    active, the projects ``r2`` held when killed, seconds until none is leased to it)."""
    held: set[str] = set()
    takeover = math.nan
    killed_at: float | None = None
    while time.monotonic() < started + timeout:
        elapsed = time.monotonic() - started
        due = kill_after is not None and killed_at is None and elapsed >= kill_after
        if due and _leased_to(probe, "r2"):  # killed while it holds work, the case that costs
            procs["r2"].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            procs["r2"].wait()
            held = _leased_to(probe, "r2")
        taken = killed_at is not None and not held & _leased_to(probe, "r2")
        if killed_at is not None and math.isnan(takeover) and taken:
            takeover = time.monotonic() - killed_at
        if _active(probe) == 0 and (killed_at is None) == (kill_after is None):
            return time.monotonic() - started, held, takeover
        time.sleep(POLL_SECONDS)
    return math.nan, held, takeover


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def takeover_table(runs: list[TakeoverRun]) -> str:
    """One row per fleet run: with and without a replica killed."""
    headers = (
        "replicas",
        "projects",
        "kill",
        "wall s",
        "projects held by the killed replica",
        "takeover s",
        "outputs correct",
    )
    rows = [
        (
            str(r.replicas),
            str(r.projects),
            "none" if r.kill_after is None else f"r2 SIGKILLed {r.kill_after:g} s in",
            "timeout" if r.timed_out else fmt(r.wall_seconds),
            "-" if r.kill_after is None else str(r.held_at_kill),
            fmt(r.takeover_seconds),
            f"{r.outputs_ok}/{r.outputs_expected}",
        )
        for r in runs
    ]
    return markdown_table(headers, rows)


def takeover_verdicts(runs: list[TakeoverRun]) -> list[Verdict]:
    """Issue 13's targets: a kill costs at most 5 s of wall time; takeover within 2 s."""
    calm = next((r for r in runs if r.kill_after is None), None)
    result: list[Verdict] = []
    for run in runs:
        complete = run.outputs_ok == run.outputs_expected and not run.timed_out
        result.append(
            Verdict(
                f"fleet of {run.replicas}, {run.projects} projects, "
                f"{'no kill' if run.kill_after is None else 'one killed'}: every output correct",
                f"{run.outputs_ok}/{run.outputs_expected}",
                complete,
            )
        )
        if run.kill_after is None:
            continue
        result.append(
            Verdict(
                "a killed replica's projects taken over within 2 s",
                f"{fmt(run.takeover_seconds)} s ({run.held_at_kill} projects held)",
                at_most(run.takeover_seconds, 2.0),
            )
        )
        if calm is not None:
            extra = run.wall_seconds - calm.wall_seconds
            result.append(
                Verdict(
                    "a kill costs at most 5 s more wall time",
                    f"{fmt(extra)} s ({fmt(run.wall_seconds)} s vs {fmt(calm.wall_seconds)} s)",
                    at_most(extra, 5.0),
                )
            )
    return result
