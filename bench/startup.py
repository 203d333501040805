"""Scenario "startup": the CPU ``watcher run`` spends from exec to its first poll.

    python bench/startup.py                 # 7 runs of each configuration
    python bench/startup.py --reps 15

One simulator serves one image project that stays queued for an hour. Each run starts
``python -m watcher run`` (through ``bench/launch.py``, so the process measured is the watcher
itself) on a fresh SQLite file with that project in ``WATCHER_PROJECTS`` and
``WATCHER_LOG_LEVEL=info``; the first poll's answer is the first ``project_status_changed`` line
of its log (the status goes from none to ``queued``). The bench reads the log every millisecond,
and when that line appears reads the process's CPU so far (user + system, every thread, from
``/proc/<pid>/stat``: exec, interpreter start, imports, settings, store migration, the first
GET and its answer). Then it stops the watcher with SIGTERM. ``/proc`` counts in clock ticks
(10 ms); the table gives the median and the spread over the runs.

The watcher's bytecode is compiled first (``compileall``) and the runs may write it, as a
``pip install`` does: an interpreter started with ``PYTHONDONTWRITEBYTECODE=1`` on a source tree
would otherwise compile every watcher module at every start (about 50 ms here), which is not
what an installed watcher pays.

Configurations: the bench's usual one (SQLite, HTTP server off) and the shipped default (SQLite,
HTTP server on 127.0.0.1, a free port), so the cost of the server shows too.
"""

from __future__ import annotations

import argparse
import compileall
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROFILES, fresh_folder, watcher_argv, watcher_env
from bench.proc import Child
from bench.sim import SimProcess
from bench.stats import fmt, markdown_table, percentile

SIM_CONFIG = {"seed": 7, "timeline_start": "created", "error_rate": 0.0, "cancel_rate": 0.0}
QUEUED = {"status": "complete", "queued_seconds": 3600, "rendering_seconds": 1, "outputs": 1}
FIRST_POLL = b'"event": "project_status_changed"'
READ_EVERY = 0.001
TIMEOUT = 60.0
TARGET_CPU = 0.3


@dataclass(frozen=True, slots=True)
class Config:
    """A configuration of ``watcher run`` under measurement."""

    name: str
    env: dict[str, str]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def configs() -> list[Config]:
    """HTTP server off (the bench's setting) and on (the shipped default)."""
    return [
        Config("sqlite, HTTP off", {"WATCHER_HTTP_ENABLED": "false"}),
        Config(
            "sqlite, HTTP on",
            {"WATCHER_HTTP_ENABLED": "true", "WATCHER_HTTP_HOST": "127.0.0.1"},
        ),
    ]


def compile_watcher() -> Path:
    """Compile the bytecode of the watcher package the runs will import; its folder."""
    where = subprocess.run(
        [sys.executable, "-c", "import watcher; print(watcher.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    package = Path(where.stdout.strip()).parent
    compileall.compile_dir(package, quiet=1)
    return package


def one_run(sim: SimProcess, project_id: str, folder: Path, config: Config) -> float:
    """CPU seconds from exec to the first poll's answer, for one fresh watcher process."""
    folder = fresh_folder(folder)
    extra = {"WATCHER_LOG_LEVEL": "info", **config.env}
    if extra.get("WATCHER_HTTP_ENABLED") == "true":
        extra["WATCHER_HTTP_PORT"] = str(free_port())
    env = watcher_env(sim, folder, profile=PROFILES["defaults"], projects=[project_id], extra=extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    log_path = folder / "client.log"
    with log_path.open("wb") as log:
        child = Child(watcher_argv(until_done=False), env=env, stdout=log)
        try:
            cpu = _cpu_at_first_poll(child, log_path)
        finally:
            child.signal(signal.SIGTERM)
            child.wait(TIMEOUT)
    return cpu


def _cpu_at_first_poll(child: Child, log_path: Path) -> float:
    deadline = time.monotonic() + TIMEOUT
    with log_path.open("rb") as log:
        seen = b""
        while time.monotonic() < deadline:
            seen += log.read()
            if FIRST_POLL in seen:
                return child.cpu_seconds()
            time.sleep(READ_EVERY)
    raise TimeoutError(f"no first poll in {TIMEOUT:g} s; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    """Run every configuration ``--reps`` times; print a Markdown table."""
    parser = argparse.ArgumentParser(prog="python bench/startup.py", description=__doc__)
    parser.add_argument("--reps", type=int, default=7, help="runs of each configuration (7)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(__file__).with_name("out"), help="(bench/out)"
    )
    args = parser.parse_args(argv)
    package = compile_watcher()
    print(f"watcher from {package}", file=sys.stderr)
    rows = []
    with SimProcess(SIM_CONFIG) as sim:
        project_id = sim.create(1, QUEUED)[0]
        for config in configs():
            one_run(sim, project_id, args.workdir / "startup", config)  # warm the caches
            cpus = [
                one_run(sim, project_id, args.workdir / "startup", config) for _ in range(args.reps)
            ]
            rows.append(
                (
                    config.name,
                    str(len(cpus)),
                    fmt(percentile(cpus, 50), 3),
                    fmt(min(cpus), 3),
                    fmt(max(cpus), 3),
                    "yes" if percentile(cpus, 50) <= TARGET_CPU else "NO",
                )
            )
    headers = ("configuration", "runs", "CPU s median", "min", "max", f"<= {TARGET_CPU} s")
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
