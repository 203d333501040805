"""The SQLite store: the embedded default, for one daemon process.

:class:`SQLiteStore` is the :class:`~watcher.store.sql_store.SqlStore` over a
:class:`~watcher.store.sqlite_connector.SQLiteConnector` (one connection on one dedicated thread;
WAL, ``synchronous=NORMAL``, ``BEGIN IMMEDIATE`` writes; its module says what survives what). It
adds only what SQLite's SQL says its own way: claiming, as the single writer, by selecting the
due rows and leasing them one by one in the same transaction. The daemon flushes (a WAL
checkpoint, which fsyncs) before every DELETE it sends.

A daemon opens the store with ``exclusive=True``, so two daemons can never share one SQLite file
(run PostgreSQL for several replicas); other processes open it without the lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from watcher.store import transitions as t
from watcher.store.connector import Session
from watcher.store.records import Claim, Claimed, Notification
from watcher.store.rows import notification_from_row, project_from_row
from watcher.store.sql import load_queries
from watcher.store.sql_store import SqlStore
from watcher.store.sqlite_connector import DEFAULT_TIMEOUT, SQLiteConnector
from watcher.store.sqlite_connector import transaction as _transaction

# _Q and _transaction: the contract tests read query plans and drive a raw transaction.
__all__ = ["DEFAULT_TIMEOUT", "_Q", "SQLiteStore", "_transaction"]

T = TypeVar("T")

_Q = load_queries("sqlite")


class SQLiteStore(SqlStore[SQLiteConnector]):
    """A :class:`Store` in one SQLite file (or ``:memory:``)."""

    def __init__(
        self, path: str, *, exclusive: bool = False, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        super().__init__(SQLiteConnector(path, exclusive=exclusive, timeout=timeout), _Q)
        self.path = path

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @property
    def is_exclusive(self) -> bool:
        return self.connector.exclusive

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        """Run ``fn(*args)`` on the store's thread (for tools and tests that need the raw
        connection, :attr:`_conn`)."""
        return await self.connector.call(fn, *args)

    @property
    def _conn(self) -> sqlite3.Connection:
        """The raw connection: use it only inside :meth:`_run`."""
        return self.connector.conn

    _db = _conn

    async def claim_due(
        self, *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> list[Claim]:
        async def work(s: Session) -> list[Claim]:
            return await _lease_due(s, now=now, limit=limit, owner=owner, until=now + lease_seconds)

        return await self.connector.transaction(work)

    async def claim_due_and_next(
        self, *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> Claimed:
        async def work(s: Session) -> Claimed:
            until = now + lease_seconds
            claims = await _lease_due(s, now=now, limit=limit, owner=owner, until=until)
            row = await s.fetchone(_Q["next_due_at"], {})
            return Claimed(claims, None if row is None else row["due_at"])

        return await self.connector.transaction(work)

    async def claim_notifications(
        self, *, now: float, limit: int, lease_seconds: float
    ) -> list[Notification]:
        async def work(s: Session) -> list[Notification]:
            rows = await s.fetchall(_Q["select_notifications"], {"now": now, "limit": limit})
            for row in rows:
                params = {"id": row["id"], "until": now + lease_seconds}
                await s.execute(_Q["lease_notification"], params)
            return [notification_from_row(r) for r in rows]

        return await self.connector.transaction(work)


async def _lease_due(
    s: Session, *, now: float, limit: int, owner: str, until: float
) -> list[Claim]:
    """Inside a transaction: lease up to ``limit`` projects due at ``now`` to ``owner`` until
    ``until``, earliest first."""
    rows = await s.fetchall(_Q["select_due"], {"now": now, "limit": limit})
    if not rows:
        return []
    # One bump of the counter for the whole batch: versions first..last, in due order.
    (bumped,) = await s.fetchall(_Q["next_lease_versions"], {"n": len(rows)})
    first = bumped["last"] - len(rows) + 1
    claims = []
    for version, row in enumerate(rows, start=first):
        record = t.leased(project_from_row(row), owner=owner, until=until, version=version)
        claims.append(Claim(record, version))
    leases = [{"id": c.id, "until": until, "owner": owner, "version": c.version} for c in claims]
    await s.executemany(_Q["lease_project"], leases)
    return claims
