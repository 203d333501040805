"""Replicas' liveness on the real PostgreSQL: a replica whose session ends while the server runs
on has its leases made due at once (and only then: a live replica's, or one the store has never
heard of, wait for their expiry; so do every replica's after a server restart), a lost session
is reported and taken again, and a write that makes work due wakes the replicas that listen."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest

from tests import pg
from watcher.errors import StoreUnavailable
from watcher.models import Kind, ProjectRef, State
from watcher.store.postgres import PostgresStore
from watcher.store.postgres_liveness import LIVENESS_LOCK_CLASS, PostgresLiveness

pytestmark = pytest.mark.anyio

T0 = 1_000_000.0
LEASE = 600.0


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, each with its own pool, as two replicas would have."""
    async with PostgresStore(pg_url, max_size=4) as a, PostgresStore(pg_url, max_size=4) as b:
        yield a, b


def refs(count: int, prefix: str = "p") -> list[ProjectRef]:
    return [ProjectRef(Kind.IMAGE, f"{prefix}{i:03d}") for i in range(count)]


async def until(check: Callable[[], Awaitable[bool]], within: float = 10) -> bool:
    """Ask ``check`` until it says yes (the server frees a closed session's locks a little after
    the client closed it)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def terminate(url: str, live: PostgresLiveness) -> None:
    """End ``live``'s session from the server's side, as a cut connection or an operator would."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 2 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (LIVENESS_LOCK_CLASS, live.key),
        )
        assert [row[0] for row in await cursor.fetchall()] == [True]


async def test_a_dead_replicas_leases_are_taken_over_at_once(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """While replica a's session lives its leases stay its own; once the session ends, b finds
    them due at once (long before their expiry) and claims them, the interruption counted."""
    a, b = replicas
    await a.track(refs(5), now=T0, delete_after_download=False)
    live = a.liveness("a")
    await live.take()
    held = await a.claim_due(now=T0, limit=10, owner="a", lease_seconds=LEASE)
    assert len(held) == 5

    assert await b.expire_dead_leases(now=T0 + 1) == {}
    assert await b.claim_due(now=T0 + 1, limit=10, owner="b", lease_seconds=LEASE) == []

    await live.close()  # the process died: its connection closed with it
    expired: dict[str, str] = {}

    async def taken_over() -> bool:
        expired.update(await b.expire_dead_leases(now=T0 + 2))
        return len(expired) == 5

    assert await until(taken_over)
    assert expired == {c.id: "a" for c in held}
    claims = await b.claim_due(now=T0 + 2, limit=10, owner="b", lease_seconds=LEASE)
    assert sorted(c.id for c in claims) == sorted(expired)
    assert all(c.project.interruptions == 1 and c.project.lease_owner == "b" for c in claims)
    # a's writes under its old claims are refused: the lease is the fence, as after an expiry.
    assert not await a.renew(held[0], now=T0 + 3, lease_seconds=LEASE)


async def test_leases_of_a_replica_never_heard_of_wait_for_their_expiry(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """A replica that took no liveness (an older version in a rolling upgrade) is not taken for
    dead: its leases run out as they always did."""
    a, b = replicas
    await a.track(refs(3), now=T0, delete_after_download=False)
    assert len(await a.claim_due(now=T0, limit=10, owner="old", lease_seconds=LEASE)) == 3
    assert await b.expire_dead_leases(now=T0 + 1) == {}
    later = await b.claim_due(now=T0 + LEASE + 1, limit=10, owner="b", lease_seconds=LEASE)
    assert len(later) == 3


async def test_a_lost_session_raises_and_is_taken_again(
    replicas: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    """A session ended by the server (a cut connection) makes ``watch`` raise
    ``StoreUnavailable`` at once; the replica counts as dead until it takes a new session, and
    as alive again from then on."""
    a, b = replicas
    await a.track(refs(2), now=T0, delete_after_download=False)
    live = a.liveness("a")
    await live.take()
    await a.claim_due(now=T0, limit=10, owner="a", lease_seconds=LEASE)
    watching = asyncio.create_task(live.watch(lambda: None, every=30))
    await asyncio.sleep(0.1)
    first_key = live.key
    await terminate(pg_url, live)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(watching, 10)  # noticed at once, not at the next check (30 s)
    assert live.key is None

    await live.take()
    assert live.key not in {None, first_key}
    try:
        assert await b.expire_dead_leases(now=T0 + 1) == {}
    finally:
        await live.close()


async def test_a_server_restart_leaves_leases_to_their_expiry(
    own_postgres: pg.OwnServer,
) -> None:
    """Every session ends when the server restarts: nobody is taken for dead for it (they
    come back and take their locks again); the leases run out as before if they do not."""
    pg.migrate(own_postgres.url)
    async with PostgresStore(own_postgres.url) as a:
        await a.track(refs(2), now=T0, delete_after_download=False)
        live = a.liveness("a")
        await live.take()
        assert len(await a.claim_due(now=T0, limit=10, owner="a", lease_seconds=LEASE)) == 2
        own_postgres.stop()
        own_postgres.start()
        await live.close()
    async with PostgresStore(own_postgres.url) as b:
        assert await b.expire_dead_leases(now=T0 + 1) == {}
        later = await b.claim_due(now=T0 + LEASE + 1, limit=10, owner="b", lease_seconds=LEASE)
        assert len(later) == 2


async def test_writes_that_make_work_due_wake_the_listening_replicas(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """Tracking, reviving, expediting and releasing leases on replica a each wake replica b,
    which listens on its liveness session, however long its own checks are apart."""
    a, b = replicas
    woken = asyncio.Event()
    live = b.liveness("b")
    await live.take()
    watching = asyncio.create_task(live.watch(woken.set, every=60))

    async def wakes(write: Awaitable[object]) -> None:
        woken.clear()
        await write
        await asyncio.wait_for(woken.wait(), 10)

    try:
        await wakes(a.track(refs(2), now=T0, delete_after_download=False))
        (claim, _) = await a.claim_due(now=T0, limit=10, owner="a", lease_seconds=LEASE)
        await wakes(a.release_leases(now=T0 + 1, owner="a"))
        await wakes(a.expedite(claim.id, now=T0 + 2))
        (claim, *_) = await a.claim_due(now=T0 + 2, limit=1, owner="a", lease_seconds=LEASE)
        await a.record_final(claim, now=T0 + 3, state=State.NOT_FOUND, failure="404")
        await wakes(a.revive([claim.project.ref], now=T0 + 4, delete_after_download=False))
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await live.close()


async def test_a_dead_replicas_expired_leases_wake_the_others(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """The replica that finds another dead wakes the whole fleet: whoever has room takes the
    work over, not only the one that looked."""
    a, b = replicas
    await a.track(refs(1), now=T0, delete_after_download=False)
    dead = a.liveness("dead")
    await dead.take()
    await a.claim_due(now=T0, limit=1, owner="dead", lease_seconds=LEASE)
    woken = asyncio.Event()
    live = b.liveness("b")
    await live.take()
    watching = asyncio.create_task(live.watch(woken.set, every=60))
    try:
        await dead.close()

        async def expired() -> bool:
            return bool(await a.expire_dead_leases(now=T0 + 1))

        assert await until(expired)
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await live.close()


async def test_a_watch_cancelled_at_shutdown_keeps_the_session_until_it_is_closed(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """A daemon that stops cancels the watch, releases its leases, then closes the session:
    until it closes it, nobody takes it for dead (a replica stopping is not a death)."""
    a, b = replicas
    await a.track(refs(1), now=T0, delete_after_download=False)
    live = a.liveness("a")
    await live.take()
    await a.claim_due(now=T0, limit=1, owner="a", lease_seconds=LEASE)
    watching = asyncio.create_task(live.watch(lambda: None, every=60))
    await asyncio.sleep(0.1)
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching
    assert await b.expire_dead_leases(now=T0 + 1) == {}
    await live.close()

    async def expired() -> bool:
        return bool(await b.expire_dead_leases(now=T0 + 2))

    assert await until(expired)
