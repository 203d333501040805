"""Scenario "objects": one large output saved to disk and to object storage (moto's S3 server on
127.0.0.1), by ``watcher run --until-done`` with default settings.

    python bench/objects.py                  # one 512 MiB output, 2 repetitions of each
    python bench/objects.py --size-mib 64 --reps 1

It shows what object storage costs the watcher's process: CPU seconds (user + system, of the
watcher alone: moto runs in this bench's own process, the simulator in its own) and peak RSS,
which must stay bounded (parts of 8 MiB, two in flight) whatever the output's size. The wall
time includes moto, a Python server far slower than S3, so it says little. Each run is checked:
the object's bytes hash to the simulator's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROFILES, fresh_folder, watcher_argv, watcher_env
from bench.proc import Child, Measured
from bench.sim import SimProcess
from bench.stats import markdown_table
from tests import s3

MIB = 1 << 20
SIM_CONFIG: dict[str, Any] = {"seed": 8, "error_rate": 0.0, "cancel_rate": 0.0}


def one(
    sim: SimProcess, server: s3.S3Server, folder: Path, size: int, *, bucket: str | None
) -> tuple[Measured, bool]:
    """One project with one ``size``-byte output, saved to disk or to ``bucket``."""
    overrides = {"status": "complete", "queued_seconds": 0, "rendering_seconds": 0}
    project_id = sim.create(1, {**overrides, "outputs": 1, "output_size": size})[0]
    run = fresh_folder(folder / f"{bucket or 'disk'}-{project_id}")
    extra = {"WATCHER_LOG_LEVEL": "warning"}
    if bucket is not None:
        extra |= server.env() | {
            "WATCHER_STORAGE_URL": f"s3://{bucket}/bench",
            "WATCHER_STORAGE_ALLOW_HTTP": "true",
        }
    env = watcher_env(sim, run, profile=PROFILES["defaults"], projects=[project_id], extra=extra)
    with (run / "client.log").open("wb") as log:
        measured = Child(watcher_argv(until_done=True), env=env, stdout=log).wait(600)
    truth = sim.report(run / "simulator.json", truth=[project_id])["truth"][project_id]
    expected = truth["outputs"][0]["sha256"]
    if bucket is None:
        (path,) = (run / "downloads" / "image" / project_id).iterdir()
        data = path.read_bytes()
    else:
        (data,) = server.objects(bucket, f"bench/image/{project_id}/").values()
    ok = measured.exit_code == 0 and hashlib.sha256(data).hexdigest() == expected
    return measured, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/objects.py")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("bench/out/objects"))
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    server = s3.start()
    server.create_bucket("bench-media")
    rows: list[list[str]] = []
    try:
        with SimProcess(SIM_CONFIG) as sim:
            for rep in range(1, args.reps + 1):
                for target in (None, "bench-media"):
                    measured, ok = one(sim, server, fresh_folder(args.dir), size, bucket=target)
                    rows.append(row(target, rep, size, measured, ok))
                    print(f"done: {rows[-1]}", file=sys.stderr)
    finally:
        server.server.stop()
    header = ["to", "rep", "output MiB", "wall s", "CPU s", "CPU s per GiB", "max RSS MiB", "ok"]
    print(markdown_table(header, rows))
    return 0


def row(target: str | None, rep: int, size: int, m: Measured, ok: bool) -> list[str]:
    return [
        "disk" if target is None else "S3 (moto)",
        str(rep),
        str(size // MIB),
        f"{m.wall_seconds:.1f}",
        f"{m.cpu_seconds:.2f}",
        f"{m.cpu_seconds / (size / (1 << 30)):.2f}",
        f"{m.max_rss_bytes / MIB:.0f}",
        "yes" if ok else "NO",
    ]


if __name__ == "__main__":
    sys.exit(main())
