"""A replica's liveness on PostgreSQL: a session-level advisory lock held on a connection of its
own, and the ``LISTEN`` that wakes it when another replica makes work due.

:class:`PostgresLiveness` opens one connection outside the pool and, in one transaction, takes
the advisory lock ``(LIVENESS_LOCK_CLASS, key)`` with a key drawn from ``replica_keys`` and
writes the replica's row in ``replicas`` (owner, key, the server's start time): no replica ever
sees the row of a live one without its lock. Then it ``LISTEN``s on :data:`CHANNEL`.

While :meth:`PostgresLiveness.watch` runs, the connection waits for notifications and, every
``every`` seconds, writes the row again (the heartbeat, allowed the store's call timeout, so a
frozen server or a vanished host is noticed as a loss, not waited for). A replica that dies
closes the connection with its process, and the server frees the lock within milliseconds: the
others' :meth:`~watcher.store.postgres.PostgresStore.expire_dead_leases` sees it free while the
server has run on, and takes the dead replica's leases over. A lost session is the caller's to
handle (:class:`~watcher.errors.StoreUnavailable`): it must assume it was taken over.

This module decides nothing about what a replica does when its session is lost, nor when to try
again; the dispatcher does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow

from watcher.errors import StoreError, StoreUnavailable
from watcher.store.base import Liveness
from watcher.store.postgres_connector import PostgresConnector
from watcher.store.sql import load_queries

_Q = load_queries("postgres")

# The first key of every liveness lock (the bytes of "WATC"); the second is the replica's key.
LIVENESS_LOCK_CLASS = 0x57_41_54_43
# The channel of wake-ups: a write that makes work due notifies it in its own transaction.
CHANNEL = "watcher_due"


class PostgresLiveness(Liveness):
    """Replica ``owner``'s liveness session through ``connector``; see the module docstring."""

    def __init__(self, connector: PostgresConnector, owner: str) -> None:
        self._connector = connector
        self.owner = owner
        self.key: int | None = None  # the lock's second key, while a session holds it
        self._conn: AsyncConnection[DictRow] | None = None

    def __repr__(self) -> str:
        return f"PostgresLiveness({self.owner!r}, key={self.key})"

    async def take(self) -> None:
        await self.close()
        connector = self._connector
        with connector.wrap_errors():
            try:
                async with asyncio.timeout(connector.timeout):
                    conn = await connector.connect()
                    try:
                        key = await self._register(conn)
                    except BaseException:
                        await _close(conn)
                        raise
            except TimeoutError:
                raise self._no_answer() from None
        self._conn, self.key = conn, key

    async def _register(self, conn: AsyncConnection[DictRow]) -> int:
        """Take a new key's lock and name it in the replica's row, then listen."""
        async with conn.transaction():
            row = await (await conn.execute(_Q["next_replica_key"])).fetchone()
            if row is None:  # pragma: no cover - nextval always returns a row
                raise StoreError("no replica key was drawn")
            key = int(row["lock_key"])
            await conn.execute(_Q["take_liveness_lock"], {"class": LIVENESS_LOCK_CLASS, "key": key})
            await conn.execute(_Q["register_replica"], {"owner": self.owner, "key": key})
            await conn.execute(_Q["forget_replicas"], {"class": LIVENESS_LOCK_CLASS})
        await conn.execute(_Q["listen_due"])
        return key

    async def watch(self, on_due: Callable[[], None], *, every: float) -> None:
        conn, key = self._conn, self.key
        beat = {"owner": self.owner, "key": key}
        if conn is None or key is None:
            raise StoreError("the liveness session is not taken")
        try:
            with self._connector.wrap_errors():
                while True:
                    async for _ in conn.notifies(timeout=every):
                        on_due()  # an event set again and again: a burst is one wake-up
                    async with asyncio.timeout(self._connector.timeout):
                        await conn.execute(_Q["register_replica"], beat)
        except TimeoutError:
            await self.close()
            raise self._no_answer() from None
        except StoreError:
            await self.close()
            raise
        # Cancelled (the daemon stops): the session stays open, and the lock held, until the
        # daemon has released its leases and closes it; a replica stopping is not a death.

    def _no_answer(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"PostgreSQL error on {self._connector.display_url}: the liveness session had no "
            f"answer within {self._connector.timeout:g} s (WATCHER_STORE_TIMEOUT)"
        )

    async def close(self) -> None:
        conn, self._conn, self.key = self._conn, None, None
        if conn is not None:
            await _close(conn)


async def _close(conn: AsyncConnection[DictRow]) -> None:
    with contextlib.suppress(psycopg.Error):
        await conn.close()
