"""What saving one small output costs the watcher's downloader, with nothing else around it.

``python bench/saves.py [--outputs N] [--size BYTES] [--rounds R]``: N outputs of the
simulator (200,000 bytes each by default, the fleet's size) are saved through
:class:`watcher.downloader.Downloader` into real files under a temporary folder, 8 at a time
(the watcher's default download slots), each the way the workflow of the tree under test does
it: its path through :func:`watcher.paths.resolve_inside`, the size of its temporary file
(:func:`watcher.workflow.part_bytes`; a tree before it resolved the path a second time for
that, in ``part_size``), then ``fetch`` (temporary file, sha256, ``fsync``, rename, ``fsync``
of the folder). The CPU this process spent (user + system, threads included,
``getrusage``) per output is printed for each of R rounds, and the least of them: the rounds
alternate with nothing, so the least is the one the machine's other load disturbed least. The
simulator runs in another process; its CPU is not counted. To compare two versions of the
code, run it from each tree (``PYTHONPATH=TREE python bench/saves.py``), alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.floor import COMPLETE, SIM_CONFIG, _watcher_client
from bench.sim import SimProcess

SLOTS = 8


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _save_all(base_url: str, urls: list[str], root: Path) -> tuple[float, float]:
    from watcher import workflow  # noqa: PLC0415 - the tree under test
    from watcher.downloader import Downloader  # noqa: PLC0415
    from watcher.paths import resolve_inside  # noqa: PLC0415
    from watcher.store import OutputRecord, OutputState  # noqa: PLC0415

    part_size: Any = getattr(workflow, "part_size", None)
    slots = asyncio.Semaphore(SLOTS)

    async def verified(size: int, sha256: str) -> None:
        del size, sha256

    async with _watcher_client(base_url) as http:
        downloader = Downloader(http)

        async def one(i: int, url: str) -> None:
            async with slots:
                path = f"image/p{i}/0-output.png"
                final = resolve_inside(root, path)
                if part_size is None:  # as the workflow asks before every save
                    workflow.part_bytes(final)
                else:  # a tree before part_bytes: the size through a second resolve
                    row = OutputRecord(f"p{i}", 0, url, 0.0, path, OutputState.PENDING)
                    await part_size(root, row)
                await downloader.fetch(url, final, verified)

        await one(-1, urls[0])  # the connection pool warm
        started, cpu = time.monotonic(), _cpu()
        await asyncio.gather(*(one(i, url) for i, url in enumerate(urls)))
        return time.monotonic() - started, _cpu() - cpu


def main() -> int:
    """Run the rounds and print the CPU per output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=int, default=1500)
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import watcher  # noqa: PLC0415

    print(f"watcher from {Path(watcher.__file__).parent}")
    per_output = []
    with SimProcess(SIM_CONFIG) as sim:
        for r in range(args.rounds):
            done = sim.create(args.outputs, {**COMPLETE, "output_size": args.size})
            urls = [sim.download_url(pid) for pid in done]
            with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
                seconds, cpu = asyncio.run(_save_all(sim.base_url, urls, Path(tmp)))
            per_output.append(cpu * 1000 / len(urls))
            print(
                f"round {r}: {len(urls)} outputs in {seconds:.2f} s, "
                f"{per_output[-1]:.3f} ms CPU each"
            )
    print(f"least: {min(per_output):.3f} ms CPU per output")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
