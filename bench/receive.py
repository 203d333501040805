"""What receiving one large output costs the event loop, measured in-process.

``python bench/receive.py [--size BYTES] [--rounds R] [--into disk|null]``: one output of the
simulator (1 GiB by default) is saved R times through :class:`watcher.downloader.Downloader`
into a real file under a temporary folder in the current directory (``disk``: ``.part``,
sha256, ``fsync``, rename, as the watcher does it), or only received through the watcher's
HTTP client and dropped (``null``: the transport's layers and nothing else). Each round prints
the event loop's own CPU per GiB (``time.thread_time`` on the loop's thread, which the
machine's other load moves less than wall time), the process's CPU (all threads, ``getrusage``)
and the throughput; then the medians. The simulator runs in another process; its CPU is not
counted. To compare two versions of the code, run it from each tree, alternating
(``PYTHONPATH=TREE python bench/receive.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.floor import COMPLETE, SIM_CONFIG, _watcher_client
from bench.sim import SimProcess

GIB = 1024**3


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _receive(base_url: str, url: str, root: Path, into: str) -> tuple[float, float, float]:
    """Wall seconds, loop CPU seconds, process CPU seconds of one transfer."""
    from watcher.downloader import Downloader  # noqa: PLC0415 - the tree under test

    async def verified(size: int, sha256: str) -> None:
        del size, sha256

    async with _watcher_client(base_url) as http:
        started, loop_cpu, cpu = time.monotonic(), time.thread_time(), _cpu()
        if into == "disk":
            await Downloader(http).fetch(url, root / "0-output.bin", verified)
        else:
            async with http.stream("GET", url) as response:
                async for _ in response.aiter_raw():
                    pass
        return (
            time.monotonic() - started,
            time.thread_time() - loop_cpu,
            _cpu() - cpu,
        )


def main() -> int:
    """Run the rounds and print the CPU per GiB."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=GIB)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--into", choices=("disk", "null"), default="disk")
    args = parser.parse_args()
    import watcher  # noqa: PLC0415

    print(f"watcher from {Path(watcher.__file__).parent}, into {args.into}")
    loop_per_gib, cpu_per_gib, rates = [], [], []
    with SimProcess(SIM_CONFIG) as sim:
        for r in range(args.rounds):
            (pid,) = sim.create(1, {**COMPLETE, "output_size": args.size})
            url = sim.download_url(pid)
            with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
                wall, loop_cpu, cpu = asyncio.run(_receive(sim.base_url, url, Path(tmp), args.into))
            loop_per_gib.append(loop_cpu * GIB / args.size)
            cpu_per_gib.append(cpu * GIB / args.size)
            rates.append(args.size / 1e6 / wall)
            print(
                f"round {r}: {rates[-1]:.0f} MB/s, loop CPU {loop_per_gib[-1]:.3f} s/GiB, "
                f"process CPU {cpu_per_gib[-1]:.3f} s/GiB"
            )
    print(
        f"median: {statistics.median(rates):.0f} MB/s, loop CPU "
        f"{statistics.median(loop_per_gib):.3f} s/GiB, process CPU "
        f"{statistics.median(cpu_per_gib):.3f} s/GiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
