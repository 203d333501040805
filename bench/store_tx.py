"""What a SQLite store transaction costs, and the most group commit could save.

    python bench/store_tx.py [UPDATES]
    python bench/store_tx.py --polls [--projects N] [--polls-per-round P] [--saves-per-round S]
                                     [--rounds R]

Through the real :class:`~watcher.store.sqlite_connector.SQLiteConnector` (its thread hop,
``BEGIN IMMEDIATE``, ``COMMIT``) on a file in a temporary folder: ``UPDATES`` (20,000) single-row
UPDATEs, first each in a transaction of its own (50 callers at a time, as the daemon's
concurrent work issues them), then 50 to a transaction, each in a savepoint, as group commit
would run them. Prints the process CPU per UPDATE of each way. Not run by ``bench/run.py``.

``--polls``: the store's share of a poll and of a saved output, through the real
:class:`~watcher.store.sqlite.SQLiteStore`, the way the daemon's 40 tasks at a time call it. N
projects (1,000) are tracked; a poll is one ``claim_due`` of one project (the dispatcher claims
as work ends) and its ``record_poll``; a save is a claim, ``record_complete`` with one output,
``record_output_verified`` and ``record_saved`` with that output's save in its transaction, as
the workflow saves a project's last output (S per round, at most N).
The CPU of the process (``time.process_time``, the store's thread included) per poll and per
save is printed for each of R rounds, and the median. To compare two versions of the code, run
it from each tree (``PYTHONPATH=TREE python bench/store_tx.py --polls``), alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: make `watcher` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from watcher.store.connector import Session
from watcher.store.sqlite_connector import SQLiteConnector

if TYPE_CHECKING:
    from watcher.store import Claim, SQLiteStore

BATCH = 50
UPDATE = "UPDATE t SET v = v + 1, s = 'rendering' WHERE id = :id"
NONE: dict[str, object] = {}


async def measure(updates: int, folder: Path) -> None:
    """Print the CPU per UPDATE alone in its transaction, and 50 to a transaction."""
    conn = SQLiteConnector(str(folder / "bench.db"), exclusive=True)
    await conn.open()

    async def create(s: Session) -> None:
        await s.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v REAL, s TEXT)", NONE)
        await s.executemany("INSERT INTO t VALUES (:id, 0, 'x')", [{"id": i} for i in range(1000)])

    await conn.transaction(create)

    def one(i: int) -> Callable[[Session], Coroutine[Any, Any, None]]:
        async def work(s: Session) -> None:
            await s.execute(UPDATE, {"id": i % 1000})

        return work

    def batch(first: int) -> Callable[[Session], Coroutine[Any, Any, None]]:
        async def work(s: Session) -> None:
            for i in range(first, first + BATCH):
                await s.execute("SAVEPOINT work", NONE)
                await s.execute(UPDATE, {"id": i % 1000})
                await s.execute("RELEASE work", NONE)

        return work

    started = time.process_time()
    for first in range(0, updates, BATCH):
        await asyncio.gather(*(conn.transaction(one(i)) for i in range(first, first + BATCH)))
    alone = time.process_time() - started
    started = time.process_time()
    for first in range(0, updates, BATCH):
        await conn.transaction(batch(first))
    grouped = time.process_time() - started
    await conn.close()
    print(f"one per transaction: {1e6 * alone / updates:.0f} us CPU per UPDATE")
    print(f"{BATCH} per transaction: {1e6 * grouped / updates:.0f} us CPU per UPDATE")


TASKS = 40  # the daemon's work in flight on the defaults (wiring.max_in_flight)
OWNER = "bench"


async def _claim_one(store: SQLiteStore, now: float) -> Claim:
    (claim,) = await store.claim_due(now=now, limit=1, owner=OWNER, lease_seconds=300.0)
    return claim


async def _polls(store: SQLiteStore, polls: int) -> float:
    """CPU seconds of ``polls`` claims and ``record_poll`` s, ``TASKS`` at a time."""
    from watcher.models import RemoteStatus  # noqa: PLC0415 - the tree under test

    async def one() -> None:
        now = time.time()
        claim = await _claim_one(store, now)
        await store.record_poll(
            claim, now=now, remote_status=RemoteStatus.RENDERING, attempt=1, due_at=now - 1
        )

    started = time.process_time()
    for _ in range(0, polls, TASKS):
        await asyncio.gather(*(one() for _ in range(TASKS)))
    return time.process_time() - started


async def _saves(store: SQLiteStore, saves: int) -> float:
    """CPU seconds of ``saves`` projects saved with one output, ``TASKS`` at a time (each then
    put back to polling, so that the next round finds it due)."""
    from watcher.models import ProjectRef, State  # noqa: PLC0415
    from watcher.store import NewOutput  # noqa: PLC0415

    saved: list[ProjectRef] = []

    async def one(i: int) -> None:
        now = time.time()
        claim = await _claim_one(store, now)
        saved.append(claim.project.ref)
        new = NewOutput(0, f"https://cdn.test/{i}.png", now + 86400, f"image/{claim.id}/0.png")
        await store.record_complete(claim, now=now, due_at=now + 300, outputs=[new])
        await store.record_output_verified(claim, index=0, size=200_000, sha256="0" * 64)
        await store.record_saved(claim, now=now, due_at=now, delete_next=False, last_output=0)

    started = time.process_time()
    for first in range(0, saves, TASKS):
        await asyncio.gather(*(one(i) for i in range(first, first + TASKS)))
    cpu = time.process_time() - started
    # Back to polling from scratch: what untrack and track again do.
    await store.connector.execute("DELETE FROM projects WHERE state = :s", {"s": State.SAVED})
    await store.track(saved, now=time.time() - 1, delete_after_download=False)
    return cpu


async def measure_polls(args: argparse.Namespace, folder: Path) -> None:
    """Print the CPU per poll and per save of each round, and their medians."""
    from watcher.models import Kind, ProjectRef  # noqa: PLC0415
    from watcher.store import SQLiteStore  # noqa: PLC0415

    store = SQLiteStore(str(folder / "bench.db"), exclusive=True)
    await store.open()
    refs = [ProjectRef(Kind.IMAGE, f"p{i:05d}") for i in range(args.projects)]
    await store.track(refs, now=time.time() - 1, delete_after_download=False)
    await _polls(store, TASKS)  # warm: statements prepared
    per_poll, per_save = [], []
    saves = min(args.saves_per_round, args.projects)  # each saved project is claimed once
    for r in range(args.rounds):
        poll = await _polls(store, args.polls_per_round)
        save = await _saves(store, saves)
        per_poll.append(1e6 * poll / args.polls_per_round)
        per_save.append(1e6 * save / saves)
        print(f"round {r + 1}: {per_poll[-1]:.0f} us CPU per poll, {per_save[-1]:.0f} us per save")
    await store.close()
    print(
        f"median: {statistics.median(per_poll):.0f} us CPU per poll, "
        f"{statistics.median(per_save):.0f} us per save"
    )


def main() -> int:
    """Run the measurement in a temporary folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("updates", nargs="?", type=int, default=20_000)
    parser.add_argument("--polls", action="store_true", help="the store's CPU per poll and save")
    parser.add_argument("--projects", type=int, default=1000)
    parser.add_argument("--polls-per-round", type=int, default=8000)
    parser.add_argument("--saves-per-round", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import watcher  # noqa: PLC0415

    print(f"watcher from {Path(watcher.__file__).parent}")
    with tempfile.TemporaryDirectory() as folder:
        if args.polls:
            asyncio.run(measure_polls(args, Path(folder)))
        else:
            asyncio.run(measure(args.updates, Path(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
