"""What a SQLite store transaction costs, and the most group commit could save.

    python bench/store_tx.py [UPDATES]

Through the real :class:`~watcher.store.sqlite_connector.SQLiteConnector` (its thread hop,
``BEGIN IMMEDIATE``, ``COMMIT``) on a file in a temporary folder: ``UPDATES`` (20,000) single-row
UPDATEs, first each in a transaction of its own (50 callers at a time, as the daemon's
concurrent work issues them), then 50 to a transaction, each in a savepoint, as group commit
would run them. Prints the process CPU per UPDATE of each way. Not run by ``bench/run.py``.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `watcher` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watcher.store.connector import Session
from watcher.store.sqlite_connector import SQLiteConnector

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


def main() -> int:
    """Run the measurement in a temporary folder."""
    updates = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(measure(updates, Path(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
