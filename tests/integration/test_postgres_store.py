"""What only the PostgreSQL store promises: several replicas on one database (disjoint claims,
concurrent migrations, one fleet-wide request budget), claims through the index, and no password
in anything it prints."""

from __future__ import annotations

import asyncio
import random
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest
from psycopg.rows import dict_row

from tests import pg
from watcher.errors import StoreError
from watcher.models import Kind, ProjectRef
from watcher.settings import load_settings
from watcher.store import Store, create_store
from watcher.store.postgres import _Q, PostgresStore, take_from_bucket
from watcher.store.postgres_liveness import LIVENESS_LOCK_CLASS
from watcher.store.sql import load_migrations

pytestmark = pytest.mark.anyio

T0 = 1_000_000.0
LEASE = 600.0
SECRET = "secretpw"


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, each with its own pool, as two replicas would have."""
    async with PostgresStore(pg_url, max_size=4) as a, PostgresStore(pg_url, max_size=4) as b:
        yield a, b


def refs(count: int) -> list[ProjectRef]:
    return [ProjectRef(Kind.IMAGE, f"p{i:04d}") for i in range(count)]


async def drain(store: Store, owner: str) -> list[str]:
    """Claim until nothing is left for this worker; the ids it got."""
    got: list[str] = []
    while claims := await store.claim_due(now=T0, limit=7, owner=owner, lease_seconds=LEASE):
        got += [c.id for c in claims]
    return got


async def test_two_replicas_never_claim_the_same_project(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """Replicas claiming at once split the due projects between them: every one, none twice."""
    a, b = replicas
    await a.track(refs(500), now=T0, delete_after_download=False)
    results = await asyncio.gather(
        *(drain(store, f"{name}{w}") for store, name in ((a, "a"), (b, "b")) for w in range(3))
    )
    by_replica = [{i for r in results[:3] for i in r}, {i for r in results[3:] for i in r}]
    assert sum(len(r) for r in results) == 500
    assert by_replica[0] | by_replica[1] == {r.id for r in refs(500)}
    assert not by_replica[0] & by_replica[1]
    assert by_replica[0]
    assert by_replica[1]


async def test_two_replicas_never_claim_the_same_notification(
    replicas: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    """Notifications claimed by replicas at once are shared out, each to one replica."""
    a, b = replicas
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO notifications (project_id, body, created_at, due_at)"
            " SELECT 'p' || n, '{}', %(t)s, %(t)s FROM generate_series(1, 300) AS n",
            {"t": T0},
        )

    async def drain_outbox(store: Store) -> list[int]:
        got: list[int] = []
        while batch := await store.claim_notifications(now=T0, limit=5, lease_seconds=LEASE):
            got += [n.id for n in batch]
        return got

    results = await asyncio.gather(*(drain_outbox(s) for s in (a, b, a, b)))
    ids = [i for r in results for i in r]
    assert sorted(ids) == list(range(1, 301))


async def test_migrations_run_concurrently_from_several_replicas(pg_empty_url: str) -> None:
    """Replicas starting together on an empty database migrate it once, without an error."""
    stores = [PostgresStore(pg_empty_url) for _ in range(6)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await stores[0].track(refs(1), now=T0, delete_after_download=False)
        assert (await stores[5].get("p0000")) is not None
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    async with await psycopg.AsyncConnection.connect(pg_empty_url) as conn:
        rows = await (await conn.execute("SELECT version FROM schema_migrations")).fetchall()
    shipped = [version for version, _ in load_migrations("postgres")]
    assert len(shipped) >= 4
    assert sorted(v for (v,) in rows) == shipped


async def test_open_is_idempotent_and_data_survives_reopening(pg_url: str) -> None:
    """Opening twice is harmless, closing twice too, and a reopened store sees what was written."""
    store = PostgresStore(pg_url)
    await store.open()
    await store.open()
    await store.track(refs(2), now=T0, delete_after_download=True)
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.get("p0000")
    async with store:
        p = await store.get("p0001")
        assert p is not None
        assert p.delete_after_download is True


async def test_claims_go_through_the_due_indexes(pg_url: str) -> None:
    """Claiming projects and notifications reads their due index in order: no scan, no sort;
    a dead replica's leases are found through the index of leases, not by a scan."""
    async with await psycopg.AsyncConnection.connect(
        pg_url, autocommit=True, row_factory=dict_row
    ) as conn:
        await conn.execute(
            "INSERT INTO projects (id, kind, state, delete_after_download, due_at, tracked_at,"
            " updated_at) SELECT 'p' || n, 'image',"
            " CASE WHEN n %% 10 = 0 THEN 'polling' ELSE 'saved' END,"
            " false, %(t)s + n, %(t)s, %(t)s FROM generate_series(1, 20000) AS n",
            {"t": T0},
        )
        await conn.execute(
            "INSERT INTO notifications (project_id, body, created_at, due_at, sent_at)"
            " SELECT 'p' || n, '{}', %(t)s, %(t)s + n,"
            " CASE WHEN n %% 10 = 0 THEN NULL ELSE %(t)s END FROM generate_series(1, 20000) AS n",
            {"t": T0},
        )
        await conn.execute("ANALYZE projects, notifications")
        params = {
            "now": T0 + 10_000,
            "limit": 10,
            "owner": "r",
            "until": T0 + LEASE,
            "class": LIVENESS_LOCK_CLASS,
        }
        for query, table, index in (
            ("expire_dead_leases", "projects", "projects_leased"),
            ("claim_due", "projects", "projects_due"),
            ("next_due_at", "projects", "projects_due"),
            ("claim_notifications", "notifications", "notifications_due"),
        ):
            rows = await (await conn.execute("EXPLAIN " + _Q[query], params)).fetchall()
            plan = "\n".join(r["QUERY PLAN"] for r in rows)
            assert index in plan, plan
            assert f"Seq Scan on {table}" not in plan, plan
            assert f"Sort Key: {table}." not in plan, plan


async def test_the_request_budget_holds_for_the_whole_fleet(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """Two replicas asking at once are granted no more than rate x elapsed + burst, yet use it."""
    a, b = replicas
    rate, burst = 50.0, 10.0
    rng = random.Random(5)
    granted = 0
    for step in range(101):
        now = T0 + step / 100
        asks = [(store, rng.randint(1, 4)) for store in (a, b, a, b)]
        answers = await asyncio.gather(
            *(s.take_rate_tokens(now=now, rate=rate, burst=burst, want=w) for s, w in asks)
        )
        assert all(0 <= g <= w for g, (_, w) in zip(answers, asks, strict=True))
        granted += sum(answers)
        assert granted <= rate * (now - T0) + burst + 1e-6
    assert granted >= rate * 1.0 + burst - 1


def test_token_bucket_refills_up_to_burst_and_never_backwards() -> None:
    """The bucket refills at rate up to burst, and a lagging clock neither refills nor rewinds."""
    t = 100.0
    assert take_from_bucket(0.0, t, now=t + 10, rate=5, burst=8, want=20) == (8, 0.0, t + 10)
    assert take_from_bucket(2.5, t, now=t + 0.5, rate=5, burst=8, want=2) == (2, 3.0, t + 0.5)
    assert take_from_bucket(3.0, t, now=t - 5, rate=5, burst=8, want=10) == (3, 0.0, t)
    assert take_from_bucket(0.5, t, now=t, rate=5, burst=8, want=1) == (0, 0.5, t)


def test_postgres_urls_select_the_postgres_store() -> None:
    """Settings accept postgresql:// and postgres:// URLs, and create_store builds PostgresStore."""
    for url in ("postgresql://u@db/w", "postgres://u@db:5433/w"):
        settings = load_settings({"WATCHER_DATABASE_URL": url})
        store = create_store(settings.database_url, pool_max_size=3)
        assert isinstance(store, PostgresStore)
        assert (store.min_size, store.max_size, store.is_exclusive) == (1, 3, False)


def _everything_said(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def test_a_password_never_shows_in_repr_or_errors() -> None:
    """Neither repr nor an open error (refused connection, malformed URL) repeats the password."""
    refused = pg.database_url("test", password=SECRET).replace(":5432/", ":1/")
    assert ":1/" in refused
    for url in (refused, refused + "?password=" + SECRET, refused.replace(SECRET, "se%zzcret")):
        store = create_store(url)
        assert SECRET not in repr(store)
        assert "se%zzcret" not in repr(store)
        with pytest.raises(StoreError) as caught:
            await store.open()
        said = _everything_said(caught.value)
        assert SECRET not in said
        assert "se%zzcret" not in said
        assert "***" in repr(store)


async def test_a_driver_error_becomes_a_store_error_without_the_password(pg_url: str) -> None:
    """A failing statement raises StoreError naming the database, never the URL's password."""
    url = pg_url.replace("://postgres@", f"://postgres:{SECRET}@")
    assert SECRET in url
    async with PostgresStore(url) as store:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            await conn.execute("DROP TABLE outputs; DROP TABLE projects")
        with pytest.raises(StoreError, match="projects") as caught:
            await store.get("p0000")
    said = _everything_said(caught.value)
    assert SECRET not in said
    assert "postgres:***@" in str(caught.value)


async def test_one_replica_at_a_time_reports_the_fleet_gauges(
    replicas: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    """Of two replicas exactly one reports the store-derived gauges, and keeps doing so; when its
    session dies (terminated by the server) or it closes, the other takes over, and the old one
    does not report again alongside it."""
    a, b = replicas
    first = await a.reports_fleet_gauges()
    assert [first, await b.reports_fleet_gauges()] == [True, False]
    assert [await a.reports_fleet_gauges(), await b.reports_fleet_gauges()] == [True, False]

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert [row[0] for row in await cursor.fetchall()] == [True]
    assert await pg_until(b.reports_fleet_gauges)
    assert await a.reports_fleet_gauges() is False  # reconnected, and finds the lock taken

    await b.close()  # the server frees b's lock once its backend has gone: soon, not at once
    assert await pg_until(a.reports_fleet_gauges)


async def pg_until(check: Callable[[], Awaitable[bool]], within: float = 10) -> bool:
    """Ask ``check`` until it says yes (the server ends a session, and frees its locks, a little
    after the client sees it end)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
