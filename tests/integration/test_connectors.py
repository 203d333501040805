"""The connectors under the SQL store, on a real SQLite file and the real PostgreSQL: what a
transaction commits, what it rolls back, and how a bad statement fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from watcher.errors import StoreError, StoreUnavailable
from watcher.store.connector import Connector, Session
from watcher.store.postgres_connector import PostgresConnector
from watcher.store.sqlite_connector import SQLiteConnector

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
async def connector(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Connector]:
    """Each SQL connector, opened on a migrated database with an empty table ``t (x)``."""
    db: Connector
    if request.param == "sqlite":
        db = SQLiteConnector(str(tmp_path / "w.db"))
    else:
        db = PostgresConnector(request.getfixturevalue("pg_url"), max_size=4)
    await db.open()
    try:
        await db.execute("CREATE TABLE t (x integer)", {})
        yield db
    finally:
        await db.close()


async def values(db: Connector) -> list[int]:
    return [row["x"] for row in await db.fetchall("SELECT x FROM t ORDER BY x", {})]


async def test_a_transaction_commits_all_of_its_work_or_none(connector: Connector) -> None:
    """Work that returns is committed whole; work that raises is rolled back whole, and its
    own exception is the one raised."""

    async def two(s: Session) -> int:
        await s.execute("INSERT INTO t VALUES (1)", {})
        return await s.execute("INSERT INTO t VALUES (2)", {})

    async def fails(s: Session) -> None:
        await s.execute("INSERT INTO t VALUES (3)", {})
        raise LookupError("the work's own")

    assert await connector.transaction(two) == 1
    with pytest.raises(LookupError, match="the work's own"):
        await connector.transaction(fails)
    assert await values(connector) == [1, 2]


async def test_a_bad_statement_is_a_store_error_not_an_outage(connector: Connector) -> None:
    """A statement the database refuses raises StoreError (not StoreUnavailable), and the
    connector goes on working."""
    with pytest.raises(StoreError) as bad:
        await connector.transaction(lambda s: s.execute("INSERT INTO nowhere VALUES (1)", {}))
    assert not isinstance(bad.value, StoreUnavailable)
    assert await connector.execute("INSERT INTO t VALUES (4)", {}) == 1
    assert await values(connector) == [4]


async def test_sqlite_transactions_run_one_after_the_other(tmp_path: Path) -> None:
    """SQLite's single writer: transactions started together on one connector never interleave
    on its connection (each reads the count and inserts it: every value is distinct)."""
    db = SQLiteConnector(str(tmp_path / "w.db"))
    await db.open()
    try:
        await db.execute("CREATE TABLE t (x integer)", {})

        async def count_then_insert(s: Session) -> None:
            row = await s.fetchone("SELECT count(*) AS n FROM t", {})
            assert row is not None
            await s.execute("INSERT INTO t VALUES (:n)", {"n": row["n"]})

        await asyncio.gather(*(db.transaction(count_then_insert) for _ in range(20)))
        assert await values(db) == list(range(20))
    finally:
        await db.close()


async def test_sqlite_work_may_await_only_its_session(tmp_path: Path) -> None:
    """Work that awaits anything but its session (which would block the store's thread) is
    refused, and rolled back."""
    db = SQLiteConnector(str(tmp_path / "w.db"))
    await db.open()
    try:
        await db.execute("CREATE TABLE t (x integer)", {})

        async def sleeps(s: Session) -> None:
            await s.execute("INSERT INTO t VALUES (1)", {})
            await asyncio.sleep(0)

        with pytest.raises(RuntimeError, match="only its session"):
            await db.transaction(sleeps)
        assert await values(db) == []
    finally:
        await db.close()
