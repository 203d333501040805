"""One contract for every store backend: the in-memory fake, SQLite (a real file) and PostgreSQL
(a fresh database per test, cloned from a migrated template)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from watcher.errors import OutputsNotSaved, StoreError, StoreLocked, StoreUnavailable
from watcher.models import Kind, ProjectRef, RemoteStatus, State
from watcher.store import (
    Claim,
    InMemoryStore,
    LeaseLost,
    NewOutput,
    OutputRecord,
    OutputState,
    ProjectRecord,
    SQLiteStore,
    Store,
)
from watcher.store.postgres import PostgresStore
from watcher.store.sqlite import _Q
from watcher.store.sqlite import _transaction as sqlite_transaction

pytestmark = pytest.mark.anyio

T0 = 1_000_000.0
LEASE = 30.0


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Each backend, opened empty."""
    backend: Store
    if request.param == "memory":
        backend = InMemoryStore()
    elif request.param == "sqlite":
        backend = SQLiteStore(str(tmp_path / "w.db"))
    else:
        backend = PostgresStore(request.getfixturevalue("pg_url"), max_size=4)
    async with backend:
        yield backend


def refs(*ids: str, kind: Kind = Kind.IMAGE) -> list[ProjectRef]:
    return [ProjectRef(kind, i) for i in ids]


def new_output(index: int, pid: str = "p1", expires: float = T0 + 3600) -> NewOutput:
    return NewOutput(
        index, f"https://cdn/{pid}/{index}/out.png", expires, f"image/{pid}/{index}-out.png"
    )


async def test_track_is_idempotent(store: Store) -> None:
    """Tracking an id twice adds it once and reports it as existing the second time."""
    first = await store.track(refs("a", "b"), now=T0, delete_after_download=False)
    second = await store.track(refs("b", "c"), now=T0 + 1, delete_after_download=True)
    assert first.added == ["a", "b"]
    assert second.added == ["c"]
    assert second.existing == ["b"]
    b = await store.get("b")
    assert b is not None
    assert b.tracked_at == T0
    assert b.delete_after_download is False
    assert (await store.count_by_state()) == {State.POLLING: 3}


async def test_an_id_repeated_in_one_call_is_added_once(store: Store) -> None:
    """An id listed twice in one track call is added the first time and existing the second."""
    result = await store.track(refs("a", "b", "a"), now=T0, delete_after_download=False)
    assert (result.added, result.existing) == (["a", "b"], ["a"])
    assert (await store.count_by_state()) == {State.POLLING: 2}


async def test_claim_returns_due_projects_in_due_order_and_leases_them(store: Store) -> None:
    """Only due projects are claimed, earliest first, and a claimed one is not claimed again."""
    await store.track(refs("a", "b", "c"), now=T0, delete_after_download=False)
    claims = await store.claim_due(now=T0, limit=10, owner="r1", lease_seconds=LEASE)
    assert {c.id for c in claims} == {"a", "b", "c"}
    for c in claims:
        due = T0 + 5 if c.id == "a" else T0 + 2
        await store.record_poll(c, now=T0, remote_status=RemoteStatus.QUEUED, attempt=0, due_at=due)
    assert await store.claim_due(now=T0 + 1, limit=10, owner="r1", lease_seconds=LEASE) == []
    later = await store.claim_due(now=T0 + 10, limit=10, owner="r1", lease_seconds=LEASE)
    assert [c.id for c in later][-1] == "a"
    assert await store.claim_due(now=T0 + 10, limit=10, owner="r2", lease_seconds=LEASE) == []


async def test_claim_respects_limit_and_next_due_at(store: Store) -> None:
    """The limit caps a claim, and next_due_at reports the earliest active due time."""
    await store.track(refs(*[f"p{i}" for i in range(5)]), now=T0, delete_after_download=False)
    assert await store.next_due_at() == T0
    claims = await store.claim_due(now=T0, limit=2, owner="r1", lease_seconds=LEASE)
    assert len(claims) == 2
    assert await store.next_due_at() == T0
    rest = await store.claim_due(now=T0, limit=10, owner="r1", lease_seconds=LEASE)
    assert len(rest) == 3
    assert await store.next_due_at() == T0 + LEASE


async def test_a_claim_comes_back_with_the_next_due_at(store: Store) -> None:
    """claim_due_and_next leases as claim_due does, fenced alike, and reports the next_due_at
    of after the claim: still due, then the leases' end, then none once nothing is active."""
    await store.track(refs(*[f"p{i}" for i in range(3)]), now=T0, delete_after_download=False)
    first = await store.claim_due_and_next(now=T0, limit=2, owner="r1", lease_seconds=LEASE)
    assert ([c.id for c in first.claims], first.next_due_at) == (["p0", "p1"], T0)
    rest = await store.claim_due_and_next(now=T0, limit=10, owner="r1", lease_seconds=LEASE)
    assert ([c.id for c in rest.claims], rest.next_due_at) == (["p2"], T0 + LEASE)
    versions = [c.version for c in [*first.claims, *rest.claims]]
    assert len(set(versions)) == 3
    for claim in [*first.claims, *rest.claims]:
        await store.record_final(claim, now=T0 + 1, state=State.CANCELED)
    none = await store.claim_due_and_next(now=T0 + 2, limit=10, owner="r1", lease_seconds=LEASE)
    assert none.claims == []
    assert none.next_due_at is None


async def test_expired_lease_is_taken_over_and_the_old_claim_is_fenced(store: Store) -> None:
    """When a lease runs out another owner claims the project, and the first owner's write fails."""
    await store.track(refs("a"), now=T0, delete_after_download=False)
    (old,) = await store.claim_due(now=T0, limit=1, owner="r1", lease_seconds=LEASE)
    (new,) = await store.claim_due(now=T0 + LEASE + 1, limit=1, owner="r2", lease_seconds=LEASE)
    assert new.version > old.version
    with pytest.raises(LeaseLost):
        await store.record_poll(
            old, now=T0 + 40, remote_status=RemoteStatus.QUEUED, attempt=0, due_at=T0 + 50
        )
    with pytest.raises(LeaseLost):
        await store.record_final(old, now=T0 + 40, state=State.CANCELED)
    await store.record_final(
        new, now=T0 + 40, state=State.CANCELED, remote_status=RemoteStatus.CANCELED
    )
    p = await store.get("a")
    assert p is not None
    assert p.state == State.CANCELED
    assert not await store.renew(old, now=T0 + 41, lease_seconds=LEASE)


async def test_release_leases_makes_work_due_now(store: Store) -> None:
    """Releasing an owner's leases makes its projects claimable at once."""
    await store.track(refs("a", "b"), now=T0, delete_after_download=False)
    await store.claim_due(now=T0, limit=1, owner="r1", lease_seconds=LEASE)
    await store.claim_due(now=T0, limit=1, owner="r2", lease_seconds=LEASE)
    assert await store.release_leases(now=T0 + 1, owner="r1") == 1
    again = await store.claim_due(now=T0 + 1, limit=5, owner="r3", lease_seconds=LEASE)
    assert len(again) == 1


async def test_complete_download_save_and_delete_flow(store: Store) -> None:
    """Outputs move pending -> verified -> saved, then the project goes to deleting and deleted."""
    await store.track(refs("p1"), now=T0, delete_after_download=True)
    (claim,) = await store.claim_due(now=T0, limit=1, owner="r1", lease_seconds=LEASE)
    rows = await store.record_complete(
        claim, now=T0 + 1, due_at=T0 + 1 + LEASE, outputs=[new_output(0), new_output(1)]
    )
    assert [r.state for r in rows] == [OutputState.PENDING, OutputState.PENDING]
    p = await store.get("p1")
    assert p is not None
    assert p.state == State.DOWNLOADING
    assert p.terminal_at == T0 + 1
    await store.record_output_verified(claim, index=0, size=10, sha256="ab" * 32)
    verified = await store.outputs("p1")
    assert [(o.state, o.bytes, o.sha256) for o in verified] == [
        (OutputState.VERIFIED, 10, "ab" * 32),
        (OutputState.PENDING, None, None),
    ]
    await store.record_output_saved(claim, index=0, now=T0 + 2)
    await store.record_output_verified(claim, index=1, size=20, sha256="cd" * 32)
    await store.record_output_saved(claim, index=1, now=T0 + 3)
    saved = await store.outputs("p1")
    assert [(o.state, o.bytes) for o in saved] == [(OutputState.SAVED, 10), (OutputState.SAVED, 20)]
    await store.record_saved(claim, now=T0 + 4, due_at=T0 + 4 + LEASE, delete_next=True)
    p = await store.get("p1")
    assert p is not None
    assert p.state == State.DELETING
    await store.flush()
    await store.record_final(claim, now=T0 + 5, state=State.DELETED)
    p = await store.get("p1")
    assert p is not None
    assert p.state == State.DELETED
    assert p.finished_at == T0 + 5
    assert await store.next_due_at() is None


async def test_refreshed_urls_replace_pending_outputs_only(store: Store) -> None:
    """A second record_complete refreshes URLs of pending outputs and keeps saved ones as is."""
    await store.track(refs("p1"), now=T0, delete_after_download=False)
    (claim,) = await store.claim_due(now=T0, limit=1, owner="r1", lease_seconds=LEASE)
    await store.record_complete(
        claim, now=T0, due_at=T0 + LEASE, outputs=[new_output(0), new_output(1)]
    )
    await store.record_output_verified(claim, index=0, size=1, sha256="00" * 32)
    await store.record_output_saved(claim, index=0, now=T0)
    fresh = [
        NewOutput(i, f"https://cdn/new/{i}", T0 + 9000, f"image/p1/{i}-other.png") for i in (0, 1)
    ]
    rows = await store.record_complete(claim, now=T0 + 1, due_at=T0 + LEASE, outputs=fresh)
    assert rows[0].url.endswith("/p1/0/out.png")
    assert rows[0].state == OutputState.SAVED
    assert rows[1].url == "https://cdn/new/1"
    assert rows[1].expires_at == T0 + 9000
    assert rows[1].path == "image/p1/1-out.png"


async def test_retry_counts_failures_and_poll_clears_them(store: Store) -> None:
    """record_retry counts consecutive failures and keeps the cause; a good poll resets both."""
    await store.track(refs("a"), now=T0, delete_after_download=False)
    (c,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_retry(c, now=T0, due_at=T0 + 1, failure="HTTP 503")
    (c,) = await store.claim_due(now=T0 + 1, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_retry(c, now=T0 + 1, due_at=T0 + 2, failure="HTTP 502")
    p = await store.get("a")
    assert p is not None
    assert (p.failures, p.failure) == (2, "HTTP 502")
    (c,) = await store.claim_due(now=T0 + 2, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_poll(
        c, now=T0 + 2, remote_status=RemoteStatus.RENDERING, attempt=0, due_at=T0 + 3
    )
    p = await store.get("a")
    assert p is not None
    assert (p.failures, p.failure, p.polls, p.remote_status) == (0, None, 1, RemoteStatus.RENDERING)


async def test_uncounted_retry_keeps_the_failure_count(store: Store) -> None:
    """A retry with count_failure=False records its cause but leaves the count for quarantine."""
    await store.track(refs("a"), now=T0, delete_after_download=False)
    (c,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_retry(c, now=T0, due_at=T0 + 1, failure="HTTP 503")
    (c,) = await store.claim_due(now=T0 + 1, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_retry(c, now=T0 + 1, due_at=T0 + 2, failure="429", count_failure=False)
    p = await store.get("a")
    assert p is not None
    assert (p.failures, p.failure, p.due_at, p.lease_owner) == (1, "429", T0 + 2, None)


async def test_rate_tokens_never_exceed_what_was_asked(store: Store) -> None:
    """take_rate_tokens grants between none and all of the tokens asked for, never more."""
    granted = [
        await store.take_rate_tokens(now=T0 + i / 10, rate=20, burst=5, want=want)
        for i, want in enumerate((3, 0, 4, 1, 10))
    ]
    assert all(0 <= g <= w for g, w in zip(granted, (3, 0, 4, 1, 10), strict=True))
    assert granted[0] == 3


async def test_list_projects_paginates_by_id(store: Store) -> None:
    """Pages follow id order with a cursor, filter by state, and end with no cursor."""
    ids = [f"p{i:03d}" for i in range(25)]
    await store.track(refs(*ids), now=T0, delete_after_download=False)
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_projects(limit=10, cursor=cursor)
        seen += [p.id for p in page.projects]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ids
    empty = await store.list_projects(state=State.SAVED)
    assert empty.projects == []
    assert empty.next_cursor is None


async def test_expedite_and_untrack(store: Store) -> None:
    """expedite makes a waiting project due now; untrack forgets it and its outputs."""
    await store.track(refs("a"), now=T0, delete_after_download=False)
    (c,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_poll(
        c, now=T0, remote_status=RemoteStatus.QUEUED, attempt=0, due_at=T0 + 100
    )
    assert await store.expedite("a", now=T0 + 1)
    assert [
        x.id for x in await store.claim_due(now=T0 + 1, limit=1, owner="r", lease_seconds=LEASE)
    ] == ["a"]
    assert not await store.expedite("missing", now=T0)
    assert await store.untrack("a")
    assert await store.get("a") is None
    assert not await store.untrack("a")


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    """Everything recorded in a SQLite file is there after closing and opening it again."""
    path = str(tmp_path / "w.db")
    async with SQLiteStore(path) as s:
        await s.track(refs("a", kind=Kind.VIDEO), now=T0, delete_after_download=True)
        (c,) = await s.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
        await s.record_complete(c, now=T0, due_at=T0 + LEASE, outputs=[new_output(0, "a")])
        await s.record_output_verified(c, index=0, size=5, sha256="11" * 32)
    async with SQLiteStore(path) as s:
        p = await s.get("a")
        assert p is not None
        assert (p.kind, p.state, p.delete_after_download) == (Kind.VIDEO, State.DOWNLOADING, True)
        (o,) = await s.outputs("a")
        assert (o.state, o.bytes) == (OutputState.VERIFIED, 5)


async def test_sqlite_exclusive_lock_refuses_a_second_daemon(tmp_path: Path) -> None:
    """Two daemons cannot open one SQLite file exclusively; a reader still can."""
    path = str(tmp_path / "w.db")
    async with SQLiteStore(path, exclusive=True):
        with pytest.raises(StoreLocked):
            await SQLiteStore(path, exclusive=True).open()
        async with SQLiteStore(path) as reader:
            await reader.ping()


async def test_a_sqlite_write_lock_held_elsewhere_is_an_outage_not_an_error(
    tmp_path: Path,
) -> None:
    """Another connection holds the write lock past the busy timeout: writes raise
    StoreUnavailable (worth retrying), reads still answer, and a bad query stays a StoreError."""
    path = str(tmp_path / "w.db")
    async with SQLiteStore(path, exclusive=True, timeout=0.05) as store:
        await store.track(refs("a"), now=T0, delete_after_download=False)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable, match="database is locked"):
                await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
            assert await store.next_due_at() == T0
        finally:
            other.execute("COMMIT")
            other.close()
        (claim,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
        assert claim.id == "a"
        with pytest.raises(StoreError) as bad:
            await store._run(lambda: store._db.execute("SELECT nothing FROM nowhere"))
        assert not isinstance(bad.value, StoreUnavailable)


async def test_notification_is_queued_with_the_final_state(store: Store) -> None:
    """A notification written with record_final is claimable, hidden while leased, retried, sent."""
    await store.track(refs("a", "b"), now=T0, delete_after_download=False)
    a, b = await store.claim_due(now=T0, limit=2, owner="r", lease_seconds=LEASE)
    await store.record_final(a, now=T0, state=State.CANCELED, notify=lambda _p, _o: '{"n": 1}')
    await store.record_final(b, now=T0, state=State.NOT_FOUND)
    (n,) = await store.claim_notifications(now=T0 + 1, limit=10, lease_seconds=5)
    assert (n.project_id, n.body, n.attempts) == ("a", '{"n": 1}', 0)
    assert await store.claim_notifications(now=T0 + 2, limit=10, lease_seconds=5) == []
    await store.notification_failed(n.id, due_at=T0 + 3, error="HTTP 503")
    (again,) = await store.claim_notifications(now=T0 + 3, limit=10, lease_seconds=5)
    assert (again.id, again.attempts, again.last_error) == (n.id, 1, "HTTP 503")
    await store.notification_sent(n.id, now=T0 + 4)
    assert await store.claim_notifications(now=T0 + 100, limit=10, lease_seconds=5) == []


async def test_a_notification_is_not_queued_when_the_write_is_fenced(store: Store) -> None:
    """A stale claim's final write is refused whole: no state change and no notification."""
    await store.track(refs("a"), now=T0, delete_after_download=False)
    (old,) = await store.claim_due(now=T0, limit=1, owner="r1", lease_seconds=LEASE)
    await store.claim_due(now=T0 + LEASE + 1, limit=1, owner="r2", lease_seconds=LEASE)
    with pytest.raises(LeaseLost):
        await store.record_final(old, now=T0 + 40, state=State.CANCELED, notify=lambda _p, _o: "{}")
    assert await store.claim_notifications(now=T0 + 50, limit=10, lease_seconds=5) == []


async def test_sqlite_claims_through_the_due_index(tmp_path: Path) -> None:
    """The claim and learning queries are index searches, never a scan of every row."""
    async with SQLiteStore(str(tmp_path / "w.db")) as s:
        conn = s._conn
        assert conn is not None
        for query, params, index in (
            ("select_due", {"now": T0, "limit": 10}, "projects_due"),
            ("next_due_at", {}, "projects_due"),
            ("render_durations", {"kind": "image", "limit": 512}, "projects_terminal"),
        ):
            plan = conn.execute("EXPLAIN QUERY PLAN " + _Q[query], params).fetchall()
            details = " ".join(row["detail"] for row in plan)
            assert index in details, details
            assert "TEMP B-TREE" not in details, details


async def test_a_lease_that_runs_out_while_held_counts_as_an_interruption(store: Store) -> None:
    """Taking over an expired lease counts an interruption; progress resets the count."""
    await store.track(refs("a"), now=T0, delete_after_download=False)
    (first,) = await store.claim_due(now=T0, limit=1, owner="r1", lease_seconds=LEASE)
    assert first.project.interruptions == 0
    (second,) = await store.claim_due(now=T0 + LEASE, limit=1, owner="r2", lease_seconds=LEASE)
    assert second.project.interruptions == 1
    (third,) = await store.claim_due(now=T0 + 2 * LEASE, limit=1, owner="r3", lease_seconds=LEASE)
    assert third.project.interruptions == 2
    await store.record_poll(
        third, now=T0 + 61, remote_status=RemoteStatus.QUEUED, attempt=0, due_at=T0 + 62
    )
    (fourth,) = await store.claim_due(now=T0 + 62, limit=1, owner="r1", lease_seconds=LEASE)
    assert fourth.project.interruptions == 0
    record = await store.get("a")
    assert record is not None
    assert record.interruptions == 0


async def test_render_durations_are_the_latest_renders_seen_in_progress(store: Store) -> None:
    """Durations come per kind, oldest first, only from projects polled before they ended."""
    await store.track(refs("a", "b", "c"), now=T0, delete_after_download=False)
    await store.track(refs("v", kind=Kind.VIDEO), now=T0, delete_after_download=False)
    first = {
        c.id: c for c in await store.claim_due(now=T0, limit=4, owner="r", lease_seconds=LEASE)
    }
    for pid in ("a", "c", "v"):  # seen rendering once
        await store.record_poll(
            first[pid], now=T0 + 1, remote_status=RemoteStatus.RENDERING, attempt=0, due_at=T0 + 2
        )
    claims = {
        c.id: c for c in await store.claim_due(now=T0 + 2, limit=4, owner="r", lease_seconds=LEASE)
    }
    await store.record_complete(
        claims["a"], now=T0 + 5, due_at=T0 + 99, outputs=[new_output(0, "a")]
    )
    await store.record_complete(
        first["b"], now=T0 + 2, due_at=T0 + 99, outputs=[new_output(0, "b")]
    )
    await store.record_final(
        claims["c"], now=T0 + 8, state=State.ERROR, remote_status=RemoteStatus.ERROR
    )
    await store.record_complete(
        claims["v"], now=T0 + 20, due_at=T0 + 99, outputs=[new_output(0, "v")]
    )
    assert await store.render_durations(Kind.IMAGE, limit=10) == [
        5.0,
        8.0,
    ]  # b was never seen rendering
    assert await store.render_durations(Kind.IMAGE, limit=1) == [8.0]
    assert await store.render_durations(Kind.VIDEO, limit=10) == [20.0]
    assert await store.render_durations(Kind.AUDIO, limit=10) == []


async def test_a_lease_on_an_untracked_project_cannot_write_to_its_new_incarnation(
    store: Store,
) -> None:
    """Untracked and tracked again, a project gets fencing versions never issued before."""
    await store.track(refs("p"), now=T0, delete_after_download=False)
    (stale,) = await store.claim_due(now=T0, limit=1, owner="r1", lease_seconds=LEASE)
    assert await store.untrack("p")
    await store.track(refs("p"), now=T0 + 1, delete_after_download=False)
    (fresh,) = await store.claim_due(now=T0 + 1, limit=1, owner="r2", lease_seconds=LEASE)
    assert fresh.version != stale.version
    with pytest.raises(LeaseLost):
        await store.record_final(stale, now=T0 + 2, state=State.CANCELED)
    await store.record_final(fresh, now=T0 + 3, state=State.ERROR)
    p = await store.get("p")
    assert p is not None
    assert (p.state, p.finished_at) == (State.ERROR, T0 + 3)


async def test_resetting_an_output_is_fenced(store: Store) -> None:
    """A claim that lost its lease cannot reset the output its successor verified."""
    await store.track(refs("p"), now=T0, delete_after_download=False)
    (old,) = await store.claim_due(now=T0, limit=1, owner="r1", lease_seconds=LEASE)
    await store.record_complete(old, now=T0, due_at=T0, outputs=[new_output(0, "p")])
    (new,) = await store.claim_due(now=T0 + LEASE + 1, limit=1, owner="r2", lease_seconds=LEASE)
    await store.record_output_verified(new, index=0, size=10, sha256="ab" * 32)
    with pytest.raises(LeaseLost):
        await store.reset_output(old, index=0)
    (row,) = await store.outputs("p")
    assert (row.state, row.bytes) == (OutputState.VERIFIED, 10)
    await store.reset_output(new, index=0)
    (row,) = await store.outputs("p")
    assert (row.state, row.bytes, row.sha256) == (OutputState.PENDING, None, None)


async def test_outputs_of_a_page_come_in_one_call(store: Store) -> None:
    """outputs_of groups outputs by project in index order, with empty lists for the rest."""
    await store.track(refs("a", "b", "c"), now=T0, delete_after_download=False)
    claims = {
        c.id: c for c in await store.claim_due(now=T0, limit=3, owner="r", lease_seconds=LEASE)
    }
    await store.record_complete(
        claims["a"], now=T0, due_at=T0, outputs=[new_output(1, "a"), new_output(0, "a")]
    )
    await store.record_complete(claims["c"], now=T0, due_at=T0, outputs=[new_output(0, "c")])
    grouped = await store.outputs_of(["a", "b", "c", "unknown"])
    assert {pid: [o.index for o in rows] for pid, rows in grouped.items()} == {
        "a": [0, 1],
        "b": [],
        "c": [0],
        "unknown": [],
    }
    assert grouped["a"] == await store.outputs("a")
    assert await store.outputs_of([]) == {}


@pytest.mark.parametrize("delete_next", [False, True])
async def test_saving_every_output_clears_the_troubles_on_the_way(
    store: Store, delete_next: bool
) -> None:
    """A download that failed before it succeeded leaves no failure note on a saved project."""
    await store.track(refs("p"), now=T0, delete_after_download=delete_next)
    (c,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_complete(c, now=T0, due_at=T0, outputs=[new_output(0, "p")])
    await store.record_retry(c, now=T0, due_at=T0 + 1, failure="the connection broke")
    (c,) = await store.claim_due(now=T0 + 1, limit=1, owner="r", lease_seconds=LEASE)
    assert (c.project.failures, c.project.failure) == (1, "the connection broke")
    await store.record_output_verified(c, index=0, size=10, sha256="ab" * 32)
    await store.record_output_saved(c, index=0, now=T0 + 2)
    await store.record_saved(c, now=T0 + 2, due_at=T0 + 2, delete_next=delete_next)
    p = await store.get("p")
    assert p is not None
    assert p.state == (State.DELETING if delete_next else State.SAVED)
    assert (p.failures, p.failure) == (0, None)


async def test_a_note_on_every_active_project_until_a_good_poll(store: Store) -> None:
    """note_active marks active projects only; a project's next good poll clears its note."""
    await store.track(refs("a", "b", "done"), now=T0, delete_after_download=False)
    claims = {
        c.id: c for c in await store.claim_due(now=T0, limit=3, owner="r", lease_seconds=LEASE)
    }
    await store.record_final(claims["done"], now=T0, state=State.CANCELED)
    assert await store.note_active("unauthorized: token refused", now=T0 + 1) == 2
    notes = {p.id: p.failure for p in (await store.list_projects(limit=10)).projects}
    assert notes == {
        "a": "unauthorized: token refused",
        "b": "unauthorized: token refused",
        "done": None,
    }
    await store.record_poll(
        claims["a"], now=T0 + 2, remote_status=RemoteStatus.RENDERING, attempt=0, due_at=T0 + 3
    )
    a = await store.get("a")
    assert a is not None
    assert a.failure is None


async def saving_one_of_two(store: Store, *, delete: bool = False) -> Claim:
    """A downloading project with outputs 0 (saved) and 1 (pending); its claim."""
    await store.track(refs("p"), now=T0, delete_after_download=delete)
    (c,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_complete(
        c, now=T0, due_at=T0 + LEASE, outputs=[new_output(0, "p"), new_output(1, "p")]
    )
    await store.record_output_verified(c, index=0, size=10, sha256="ab" * 32)
    await store.record_output_saved(c, index=0, now=T0 + 1)
    return c


@pytest.mark.parametrize("delete_next", [False, True])
async def test_the_last_output_saved_and_the_project_saved_in_one_write(
    store: Store, delete_next: bool
) -> None:
    """record_saved with ``last_output`` records that output saved and ends the project in one
    transaction: the event built from the rows written shows the output saved."""
    c = await saving_one_of_two(store, delete=delete_next)
    await store.record_output_verified(c, index=1, size=10, sha256="cd" * 32)
    seen: list[list[OutputState]] = []

    def notify(_p: ProjectRecord, outputs: list[OutputRecord]) -> str:
        seen.append([o.state for o in outputs])
        return "{}"

    await store.record_saved(
        c, now=T0 + 3, due_at=T0 + 9, delete_next=delete_next, notify=notify, last_output=1
    )
    p = await store.get("p")
    assert p is not None
    assert p.state == (State.DELETING if delete_next else State.SAVED)
    assert (p.failures, p.failure) == (0, None)
    rows = await store.outputs("p")
    assert [(o.state, o.saved_at) for o in rows] == [
        (OutputState.SAVED, T0 + 1),
        (OutputState.SAVED, T0 + 3),
    ]
    assert seen == ([] if delete_next else [[OutputState.SAVED, OutputState.SAVED]])


async def test_a_last_output_refused_with_the_project_is_not_recorded_saved(store: Store) -> None:
    """When record_saved with ``last_output`` is refused (another output is not saved),
    nothing is written: that output stays verified."""
    c = await saving_one_of_two(store)
    await store.record_output_verified(c, index=1, size=10, sha256="cd" * 32)
    await store.reset_output(c, index=0)
    with pytest.raises(OutputsNotSaved, match=r"output\(s\) 0 not saved"):
        await store.record_saved(c, now=T0 + 3, due_at=T0 + 9, delete_next=False, last_output=1)
    rows = await store.outputs("p")
    assert [o.state for o in rows] == [OutputState.PENDING, OutputState.VERIFIED]
    p = await store.get("p")
    assert p is not None
    assert p.state == State.DOWNLOADING


@pytest.mark.parametrize("delete_next", [False, True])
async def test_a_project_with_an_unsaved_output_cannot_be_saved(
    store: Store, delete_next: bool
) -> None:
    """record_saved is refused whole while an output is pending: no state change, no event."""
    c = await saving_one_of_two(store, delete=delete_next)
    with pytest.raises(OutputsNotSaved, match=r"output\(s\) 1 not saved"):
        await store.record_saved(
            c, now=T0 + 2, due_at=T0 + 9, delete_next=delete_next, notify=lambda _p, _o: "{}"
        )
    p = await store.get("p")
    assert p is not None
    assert p.state == State.DOWNLOADING
    assert await store.claim_notifications(now=T0 + 50, limit=10, lease_seconds=5) == []
    await store.record_output_verified(c, index=1, size=10, sha256="cd" * 32)
    await store.record_output_saved(c, index=1, now=T0 + 3)
    await store.record_saved(c, now=T0 + 3, due_at=T0 + 9, delete_next=delete_next)
    p = await store.get("p")
    assert p is not None
    assert p.state == (State.DELETING if delete_next else State.SAVED)


@pytest.mark.parametrize("state", [State.SAVED, State.DELETED])
async def test_a_project_with_an_unsaved_output_cannot_end_saved_or_deleted(
    store: Store, state: State
) -> None:
    """record_final to saved or deleted is refused while an output is pending, or with none."""
    c = await saving_one_of_two(store)
    with pytest.raises(OutputsNotSaved):
        await store.record_final(c, now=T0 + 2, state=state, notify=lambda _p, _o: "{}")
    await store.track(refs("empty"), now=T0, delete_after_download=False)
    (e,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
    with pytest.raises(OutputsNotSaved, match="no outputs"):
        await store.record_final(e, now=T0 + 2, state=state)
    assert {p.id: p.state for p in (await store.list_projects()).projects} == {
        "p": State.DOWNLOADING,
        "empty": State.POLLING,
    }
    assert await store.claim_notifications(now=T0 + 50, limit=10, lease_seconds=5) == []
    await store.record_final(c, now=T0 + 3, state=State.FAILED, failure="gave up")


async def test_the_event_is_built_from_the_row_as_written(store: Store) -> None:
    """The notification builder sees the project and outputs exactly as the store now holds
    them, and what it returns is queued."""
    await store.track(refs("a"), now=T0, delete_after_download=False)
    (c,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
    seen: list[tuple[ProjectRecord, list[OutputRecord]]] = []

    def build(project: ProjectRecord, outputs: list[OutputRecord]) -> str:
        seen.append((project, outputs))
        return f"{project.state.value}:{project.polls}:{project.terminal_at}"

    await store.record_final(
        c, now=T0 + 5, state=State.ERROR, remote_status=RemoteStatus.ERROR, notify=build
    )
    ((project, outputs),) = seen
    assert project == await store.get("a")
    assert (project.polls, project.terminal_at, project.finished_at) == (1, T0 + 5, T0 + 5)
    assert outputs == []
    (n,) = await store.claim_notifications(now=T0 + 6, limit=10, lease_seconds=5)
    assert n.body == f"error:1:{T0 + 5}"


async def test_progress_ends_a_run_of_failures_and_a_failure_starts_one(store: Store) -> None:
    """A counted retry starts the run (stalled_since) and the next ones keep its start; a try
    that gained bytes, and a saved output, each clear it."""
    c = await saving_one_of_two(store)
    await store.record_retry(c, now=T0 + 2, due_at=T0 + 3, failure="HTTP 503")
    (c,) = await store.claim_due(now=T0 + 3, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_retry(c, now=T0 + 4, due_at=T0 + 5, failure="HTTP 502")
    p = await store.get("p")
    assert p is not None
    assert (p.failures, p.stalled_since) == (2, T0 + 2)
    (c,) = await store.claim_due(now=T0 + 5, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_retry(c, now=T0 + 6, due_at=T0 + 7, failure="cut", progressed=True)
    p = await store.get("p")
    assert p is not None
    assert (p.failures, p.stalled_since, p.failure) == (0, None, "cut")
    (c,) = await store.claim_due(now=T0 + 7, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_retry(c, now=T0 + 8, due_at=T0 + 9, failure="HTTP 503")
    (c,) = await store.claim_due(now=T0 + 9, limit=1, owner="r", lease_seconds=LEASE)
    fresh = [new_output(0, "p"), new_output(1, "p")]
    await store.record_complete(c, now=T0 + 9, due_at=T0 + 20, outputs=fresh)  # fresh URLs
    p = await store.get("p")
    assert p is not None
    assert (p.failures, p.stalled_since) == (1, T0 + 8)  # fresh links are no progress
    await store.record_output_verified(c, index=1, size=10, sha256="cd" * 32)
    await store.record_output_saved(c, index=1, now=T0 + 10)
    p = await store.get("p")
    assert p is not None
    assert (p.failures, p.stalled_since, p.failure) == (0, None, None)


async def test_the_good_get_that_ends_polling_clears_its_failed_ones(store: Store) -> None:
    """GETs that failed while polling do not count against the downloads that follow."""
    await store.track(refs("p"), now=T0, delete_after_download=False)
    (c,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
    await store.record_retry(c, now=T0, due_at=T0 + 1, failure="HTTP 503")
    (c,) = await store.claim_due(now=T0 + 1, limit=1, owner="r", lease_seconds=LEASE)
    assert (c.project.failures, c.project.stalled_since) == (1, T0)
    await store.record_complete(c, now=T0 + 1, due_at=T0 + 9, outputs=[new_output(0, "p")])
    p = await store.get("p")
    assert p is not None
    assert (p.state, p.failures, p.stalled_since) == (State.DOWNLOADING, 0, None)


async def test_a_not_found_project_is_revived_from_scratch(store: Store) -> None:
    """Reviving makes a ``not_found`` project (same id and kind) poll again, due now, with what
    the 404 left cleared; any other state, or another kind, is left as it is."""
    await store.track(refs("gone", "done", "vid"), now=T0, delete_after_download=False)
    claims = await store.claim_due(now=T0, limit=10, owner="r1", lease_seconds=LEASE)
    finals = {"gone": State.NOT_FOUND, "done": State.CANCELED, "vid": State.NOT_FOUND}
    for c in claims:
        await store.record_final(
            c, now=T0 + 1, state=finals[c.id], failure="GET: HTTP 404: no such project"
        )
    revived = await store.revive(
        [*refs("gone", "done", "never"), ProjectRef(Kind.VIDEO, "vid")],
        now=T0 + 5,
        delete_after_download=True,
    )
    assert revived == ["gone"]
    p = await store.get("gone")
    assert p is not None
    assert (p.state, p.due_at, p.tracked_at, p.delete_after_download) == (
        State.POLLING,
        T0 + 5,
        T0 + 5,
        True,
    )
    assert (p.failure, p.finished_at, p.remote_status, p.polls, p.failures) == (
        None,
        None,
        None,
        0,
        0,
    )
    assert (p.stalled_since, p.interruptions, p.lease_owner) == (None, 0, None)
    assert await store.next_due_at() == T0 + 5
    (again,) = await store.claim_due(now=T0 + 5, limit=10, owner="r2", lease_seconds=LEASE)
    assert again.id == "gone"
    assert again.version > max(c.version for c in claims)
    with pytest.raises(LeaseLost):  # the lease of the first life cannot write to the second
        await store.record_final(
            next(c for c in claims if c.id == "gone"), now=T0, state=State.SAVED
        )
    assert (await store.get("done")).state == State.CANCELED  # type: ignore[union-attr]
    assert (await store.get("vid")).state == State.NOT_FOUND  # type: ignore[union-attr]


def test_a_transaction_sqlite_already_rolled_back_raises_the_real_error(tmp_path: Path) -> None:
    """SQLite rolls back by itself on some errors (a full disk, an I/O error): the error raised
    is the original, not the rollback's complaint, and a transaction left open by a failure
    does not wedge the next one."""
    conn = sqlite3.connect(str(tmp_path / "t.db"), isolation_level=None)
    conn.execute("CREATE TABLE t (x)")

    def fails_after_sqlite_rolled_back() -> None:
        with sqlite_transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("ROLLBACK")  # as SQLite does on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        fails_after_sqlite_rolled_back()
    conn.execute("BEGIN")  # left open, as by a rollback that failed
    with sqlite_transaction(conn):
        conn.execute("INSERT INTO t VALUES (2)")
    assert conn.execute("SELECT x FROM t").fetchall() == [(2,)]
    conn.close()


async def test_notifications_are_claimed_in_due_order(store: Store) -> None:
    """An event whose delivery failed waits for its retry time: a later event that is due
    already goes first (due time, then id, on every backend)."""
    await store.track(refs("a", "b"), now=T0, delete_after_download=False)
    a, b = await store.claim_due(now=T0, limit=2, owner="r", lease_seconds=LEASE)
    await store.record_final(a, now=T0, state=State.CANCELED, notify=lambda _p, _o: '"a"')
    await store.record_final(b, now=T0, state=State.CANCELED, notify=lambda _p, _o: '"b"')
    (first,) = await store.claim_notifications(now=T0, limit=1, lease_seconds=5)
    assert first.project_id == "a"
    await store.notification_failed(first.id, due_at=T0 + 10, error="HTTP 503")
    claimed = await store.claim_notifications(now=T0 + 20, limit=10, lease_seconds=5)
    assert [n.project_id for n in claimed] == ["b", "a"]


async def test_a_saved_project_is_due_when_record_saved_says(store: Store) -> None:
    """record_saved sets ``due_at`` whether the project finishes saved or goes on to delete."""
    for pid, delete_next in (("keep", False), ("drop", True)):
        await store.track(refs(pid), now=T0, delete_after_download=delete_next)
        (c,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
        await store.record_complete(c, now=T0, due_at=T0 + LEASE, outputs=[new_output(0, pid)])
        await store.record_output_verified(c, index=0, size=1, sha256="ab" * 32)
        await store.record_output_saved(c, index=0, now=T0 + 1)
        await store.record_saved(c, now=T0 + 2, due_at=T0 + 7, delete_next=delete_next)
        p = await store.get(pid)
        assert p is not None
        assert (p.due_at, p.updated_at) == (T0 + 7, T0 + 2)


async def test_a_claim_holds_the_record_as_leased(store: Store) -> None:
    """The record a claim carries is the row as the lease left it (due at the lease's end)."""
    await store.track(refs("a"), now=T0, delete_after_download=False)
    (c,) = await store.claim_due(now=T0, limit=1, owner="r", lease_seconds=LEASE)
    assert c.project == await store.get("a")
    assert (c.project.due_at, c.project.lease_owner) == (T0 + LEASE, "r")


async def test_a_failed_project_keeps_an_empty_failure_it_is_given(store: Store) -> None:
    """Ending ``failed`` keeps the last failure only when none is given; an empty one is given."""
    await store.track(refs("a", "b"), now=T0, delete_after_download=False)
    for c in await store.claim_due(now=T0, limit=2, owner="r", lease_seconds=LEASE):
        await store.record_retry(c, now=T0, due_at=T0 + 1, failure="HTTP 503")
    a, b = await store.claim_due(now=T0 + 1, limit=2, owner="r", lease_seconds=LEASE)
    await store.record_final(a, now=T0 + 2, state=State.FAILED, failure="")
    await store.record_final(b, now=T0 + 2, state=State.FAILED)
    failures = [(p.id, p.failure) for p in (await store.list_projects()).projects]
    assert failures == [("a", ""), ("b", "HTTP 503")]


async def test_an_upload_key_lives_until_the_output_is_saved_or_reset(store: Store) -> None:
    """The temporary object key of an upload is kept through verified, fenced like every output
    write, and cleared when the output is saved or reset."""
    await store.track(refs("p"), now=T0, delete_after_download=False)
    (old,) = await store.claim_due(now=T0, limit=1, owner="r1", lease_seconds=LEASE)
    await store.record_complete(
        old, now=T0, due_at=T0, outputs=[new_output(0, "p"), new_output(1, "p")]
    )
    (c,) = await store.claim_due(now=T0 + LEASE + 1, limit=1, owner="r2", lease_seconds=LEASE)
    with pytest.raises(LeaseLost):
        await store.record_output_uploading(old, index=0, key=".parts/x")
    await store.record_output_uploading(c, index=0, key=".parts/a")
    await store.record_output_uploading(c, index=1, key=".parts/b")
    await store.record_output_verified(c, index=0, size=10, sha256="ab" * 32)
    rows = await store.outputs("p")
    assert [(o.state, o.upload_key) for o in rows] == [
        (OutputState.VERIFIED, ".parts/a"),
        (OutputState.PENDING, ".parts/b"),
    ]
    await store.record_output_saved(c, index=0, now=T0 + 2)
    await store.reset_output(c, index=1)
    rows = await store.outputs("p")
    assert [(o.state, o.upload_key) for o in rows] == [
        (OutputState.SAVED, None),
        (OutputState.PENDING, None),
    ]
