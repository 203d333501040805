"""Scenario "idle": the CPU of a running ``watcher run`` that has nothing to do.

    python bench/idle.py                    # 60 s measured, after 15 s to settle
    python bench/idle.py --window 120

One simulator serves one image project that stays queued for an hour, so the daemon has one
project to poll now and then and nothing else. ``python -m watcher run`` (the shipped defaults:
SQLite, the HTTP server on 127.0.0.1, ``POLL_MAX`` 60 s) starts through ``bench/launch.py``;
after ``--settle`` seconds (start-up, the first polls) the bench reads the process's CPU (user +
system, every thread, ``/proc/<pid>/stat``), waits ``--window`` seconds and reads it again. The
difference over the window is the share of one core the idle daemon takes (target ≤ 0.5 %).
``/proc`` counts in clock ticks (10 ms): over 60 s that is a resolution of 0.017 % of a core.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROFILES, fresh_folder, watcher_argv, watcher_env
from bench.proc import Child
from bench.sim import SimProcess
from bench.startup import QUEUED, SIM_CONFIG, free_port
from bench.stats import fmt, markdown_table

TARGET_SHARE = 0.005
TIMEOUT = 60.0


def measure(settle: float, window: float, workdir: Path) -> tuple[float, float]:
    """CPU seconds of an idle daemon over ``window`` seconds, and that as a share of a core."""
    with SimProcess(SIM_CONFIG) as sim:
        project_id = sim.create(1, QUEUED)[0]
        folder = fresh_folder(workdir / "idle")
        extra = {
            "WATCHER_HTTP_ENABLED": "true",
            "WATCHER_HTTP_HOST": "127.0.0.1",
            "WATCHER_HTTP_PORT": str(free_port()),
        }
        env = watcher_env(
            sim, folder, profile=PROFILES["defaults"], projects=[project_id], extra=extra
        )
        with (folder / "client.log").open("wb") as log:
            child = Child(watcher_argv(until_done=False), env=env, stdout=log)
            try:
                time.sleep(settle)
                before = child.cpu_seconds()
                time.sleep(window)
                cpu = child.cpu_seconds() - before
            finally:
                child.signal(signal.SIGTERM)
                child.wait(TIMEOUT)
    return cpu, cpu / window


def main(argv: list[str] | None = None) -> int:
    """Measure once; print a Markdown table."""
    parser = argparse.ArgumentParser(prog="python bench/idle.py", description=__doc__)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds before (15)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured (60)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(__file__).with_name("out"), help="(bench/out)"
    )
    args = parser.parse_args(argv)
    cpu, share = measure(args.settle, args.window, args.workdir)
    headers = ("window s", "CPU s", "% of a core", f"<= {TARGET_SHARE:.1%}")
    row = (
        fmt(args.window, 0),
        fmt(cpu, 3),
        fmt(share * 100, 3),
        "yes" if share <= TARGET_SHARE else "NO",
    )
    print(markdown_table(headers, [row]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
