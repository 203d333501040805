"""Scenario "big": one large output (1 GiB by default), fetched by ``curl`` and by the watcher.

All fetch from the same simulator: ``curl -o`` a fresh signed URL of one project, for context;
the same as ``curl -o FILE && sync FILE`` (the bytes on disk, not only in the page cache, as the
watcher guarantees before it says "saved": the target's yardstick); and the watcher (default
settings) a project of its own with an output of the same size (it also computes the sha256 the
store records, on the way). A transfer's time runs
from the moment the simulator received the download request (its log) to the moment the file is
complete: curl's exit (after its checks, for the second), or the watcher's final file appearing
under its name (after the watcher has hashed it, fsynced it and renamed it). Repetitions cycle
through the three; the page cache is flushed (``sync``) between transfers, untimed. The watcher's
file is checked against the simulator's sha256; curl's against the size.
"""

from __future__ import annotations

import os
import shlex
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    PROFILES,
    base_env,
    fresh_folder,
    sha256_file,
    warning_lines,
    watcher_argv,
    watcher_env,
)
from bench.proc import Child, Measured
from bench.sim import SimProcess
from bench.stats import MB, Verdict, at_least, fmt, markdown_table, percentile, ratio

SIM_CONFIG: dict[str, Any] = {
    "seed": 7,
    "timeline_start": "created",
    "error_rate": 0.0,
    "cancel_rate": 0.0,
}
POLL_SECONDS = 0.005
RSS_LIMIT_MB = 80.0
THROUGHPUT_FLOOR = 0.9  # x the speed of curl + sync
CURL_SYNC = "curl + sync"


class CurlMissing(RuntimeError):
    """``curl`` is not on PATH."""


@dataclass(frozen=True, slots=True)
class Transfer:
    """One fetch of the big output."""

    tool: str
    rep: int
    size: int
    seconds: float  # request received by the simulator -> file complete
    measured: Measured
    ok: bool

    @property
    def throughput(self) -> float:
        """MB/s (10^6 bytes per second)."""
        return ratio(self.size / MB, self.seconds)

    def to_json(self) -> dict[str, Any]:
        """The raw numbers, for ``--json``."""
        return {
            "tool": self.tool,
            "rep": self.rep,
            "size": self.size,
            "seconds": self.seconds,
            "throughput_mb_s": self.throughput,
            "cpu_seconds": self.measured.cpu_seconds,
            "max_rss_bytes": self.measured.max_rss_bytes,
            "exit_code": self.measured.exit_code,
            "ok": self.ok,
        }


def find_curl() -> str:
    """The path of ``curl``, or :class:`CurlMissing` saying how to install it."""
    curl = shutil.which("curl")
    if curl is None:
        raise CurlMissing(
            "curl is not installed: the big-download scenario needs it "
            "(Debian/Ubuntu: apt-get install curl)"
        )
    return curl


def run(size: int, reps: int, workdir: Path, timeout: float) -> list[Transfer]:
    """``reps`` rounds of curl, curl + sync, and watcher transfers of a ``size``-byte output."""
    curl = find_curl()
    folder = fresh_folder(workdir / "big")
    overrides = {
        "status": "complete",
        "queued_seconds": 0,
        "rendering_seconds": 0,
        "outputs": 1,
        "output_size": size,
    }
    transfers: list[Transfer] = []
    with SimProcess(SIM_CONFIG) as sim:
        for rep in range(1, reps + 1):
            job = _Job(folder=folder, rep=rep, size=size, overrides=overrides, timeout=timeout)
            transfers.extend(_curl(sim, curl, job, sync=sync) for sync in (False, True))
            transfers.append(_watcher(sim, job))
    return transfers


@dataclass(frozen=True, slots=True)
class _Job:
    """What every transfer of one repetition shares."""

    folder: Path
    rep: int
    size: int
    overrides: dict[str, Any]
    timeout: float


def _request_time(sim: SimProcess, folder: Path, project_id: str) -> tuple[float, dict[str, Any]]:
    report = sim.report(folder / "simulator.json", truth=[project_id])
    events = [d for d in report["downloads"] if d["project_id"] == project_id]
    if len(events) != 1:
        raise RuntimeError(f"expected one download of {project_id}, the simulator saw {events}")
    return float(events[0]["at"]), report["truth"][project_id]


def _curl(sim: SimProcess, curl: str, job: _Job, *, sync: bool) -> Transfer:
    folder, rep, size, timeout = job.folder, job.rep, job.size, job.timeout
    project_id = sim.create(1, job.overrides)[0]
    url = sim.download_url(project_id)
    target = folder / "curl.out"
    argv = [curl, "-s", "-S", "-f", "-o", str(target), url]
    if sync:
        argv = ["sh", "-c", f"{shlex.join(argv)} && sync {shlex.quote(str(target))}"]
    measured = Child(argv, env=base_env()).wait(timeout)
    requested, _ = _request_time(sim, folder, project_id)
    ok = measured.exit_code == 0 and target.is_file() and target.stat().st_size == size
    target.unlink(missing_ok=True)
    os.sync()
    finished = measured.started_at + measured.wall_seconds
    tool = CURL_SYNC if sync else "curl"
    return Transfer(tool, rep, size, finished - requested, measured, ok)


def _watcher(sim: SimProcess, job: _Job) -> Transfer:
    folder, rep, size, timeout = job.folder, job.rep, job.size, job.timeout
    project_id = sim.create(1, job.overrides)[0]
    run_folder = fresh_folder(folder / f"watcher-{rep}")
    project_dir = run_folder / "downloads" / "image" / project_id
    env = watcher_env(sim, run_folder, profile=PROFILES["defaults"], projects=[project_id])
    with (run_folder / "client.log").open("wb") as log:
        child = Child(watcher_argv(until_done=True), env=env, stdout=log)
        watcher = _FileWatch(project_dir)
        measured = child.wait(timeout)
        appeared = watcher.stop()
    requested, truth = _request_time(sim, folder, project_id)
    files = [p for p in project_dir.iterdir() if p.suffix != ".part"] if appeared else []
    ok = (
        measured.exit_code == 0
        and len(files) == 1
        and sha256_file(files[0]) == truth["outputs"][0]["sha256"]
        and warning_lines(run_folder / "client.log") == 0
    )
    shutil.rmtree(run_folder / "downloads", ignore_errors=True)
    os.sync()
    seconds = (appeared or float("nan")) - requested
    return Transfer("watcher", rep, size, seconds, measured, ok)


class _FileWatch:
    """Notes when a finished (non-``.part``) file first appears in a folder."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._stop = threading.Event()
        self.appeared: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._folder.is_dir() and any(p.suffix != ".part" for p in self._folder.iterdir()):
                self.appeared = time.time()
                return
            time.sleep(POLL_SECONDS)

    def stop(self) -> float | None:
        """Stop watching; the time the file appeared, or None."""
        self._stop.set()
        self._thread.join()
        return self.appeared


def _median(transfers: list[Transfer], tool: str) -> float:
    return percentile((t.throughput for t in transfers if t.tool == tool), 50)


def table(transfers: list[Transfer]) -> str:
    """One row per transfer."""
    rows = [
        (
            t.tool,
            str(t.rep),
            fmt(t.size / MB, 0),
            fmt(t.seconds, 3),
            fmt(t.throughput, 1),
            fmt(t.measured.cpu_seconds),
            fmt(t.measured.max_rss_bytes / MB, 1),
            "yes" if t.ok else "NO",
        )
        for t in transfers
    ]
    headers = ("tool", "rep", "MB", "seconds", "MB/s", "CPU s", "peak RSS MB", "file correct")
    return markdown_table(headers, rows)


def verdicts(transfers: list[Transfer]) -> list[Verdict]:
    """Peak RSS at most 80 MB; median throughput at least 0.9 x that of curl + sync."""
    watcher = [t for t in transfers if t.tool == "watcher"]
    peak = max((t.measured.max_rss_bytes for t in watcher), default=0) / MB
    share = ratio(_median(transfers, "watcher"), _median(transfers, CURL_SYNC))
    size = fmt(transfers[0].size / MB, 0) if transfers else "-"
    return [
        Verdict(
            f"{size} MB: watcher saves the file correctly",
            f"{sum(t.ok for t in watcher)}/{len(watcher)} runs",
            bool(watcher) and all(t.ok for t in watcher),
        ),
        Verdict(
            f"{size} MB: watcher peak RSS <= {RSS_LIMIT_MB:g} MB",
            f"{fmt(peak, 1)} MB",
            None if not watcher else peak <= RSS_LIMIT_MB,
        ),
        Verdict(
            f"{size} MB: watcher throughput >= {THROUGHPUT_FLOOR} x {CURL_SYNC} (medians)",
            f"{fmt(share, 3)} x ({fmt(_median(transfers, 'watcher'), 1)} vs "
            f"{fmt(_median(transfers, CURL_SYNC), 1)} MB/s)",
            at_least(share, THROUGHPUT_FLOOR),
        ),
        Verdict(
            f"{size} MB: watcher vs curl alone, into the page cache (medians; context)",
            f"{fmt(ratio(_median(transfers, 'watcher'), _median(transfers, 'curl')), 3)} x "
            f"({fmt(_median(transfers, 'watcher'), 1)} vs "
            f"{fmt(_median(transfers, 'curl'), 1)} MB/s)",
            None,
            info=True,
        ),
    ]
