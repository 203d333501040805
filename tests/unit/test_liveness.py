"""The liveness keeper over a fake session: a loss stops the work and the claims at once, is
logged once, and is followed by a new session with backoff, released leases before any claim;
and the search for dead replicas logs, counts and wakes the fleet."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from watcher.errors import StoreUnavailable
from watcher.liveness import LivenessKeeper
from watcher.metrics import Metrics
from watcher.store import InMemoryStore, Liveness

pytestmark = pytest.mark.anyio


class FakeSession(Liveness):
    """A session whose takes fail as scripted and whose watch ends when the test cuts it."""

    def __init__(self, failures_before_take: list[int]) -> None:
        self.script = failures_before_take  # for each take: how many tries fail first
        self.takes = 0
        self.failed = 0
        self.cut = asyncio.Event()
        self.closed = False

    async def take(self) -> None:
        if self.script and self.failed < self.script[0]:
            self.failed += 1
            raise StoreUnavailable("PostgreSQL error: connection refused")
        if self.script:
            self.script.pop(0)
        self.failed = 0
        self.takes += 1
        self.cut.clear()

    async def watch(self, on_due: Callable[[], None], *, every: float) -> None:
        del every
        on_due()
        await self.cut.wait()
        raise StoreUnavailable("PostgreSQL error: server closed the connection unexpectedly")

    async def close(self) -> None:
        self.closed = True


class DeadFinder(InMemoryStore):
    """A store whose one look for dead replicas finds two leases of ``r2``."""

    def __init__(self) -> None:
        super().__init__()
        self.found = {"p1": "r2", "p2": "r2"}

    async def expire_dead_leases(self, *, now: float) -> dict[str, str]:
        found, self.found = self.found, {}
        return found


def keeper(session: Liveness, **hooks: object) -> tuple[LivenessKeeper, dict[str, list[object]]]:
    calls: dict[str, list[object]] = {"due": [], "lost": [], "back": []}
    stopping = asyncio.Event()

    def on_lost() -> int:
        calls["lost"].append(k.proven)
        return 3

    async def on_back() -> None:
        calls["back"].append(k.proven)

    k = LivenessKeeper(
        session,
        store=hooks.pop("store", InMemoryStore()),  # type: ignore[arg-type]
        on_due=lambda: calls["due"].append(True),
        on_lost=on_lost,
        on_back=on_back,
        store_down=hooks.pop("store_down", lambda: False),  # type: ignore[arg-type]
        stopping=stopping,
        retry_initial=0.001,
        retry_max=0.002,
        rng=random.Random(1),
        metrics=Metrics(),
        takeover_every=0.001,
    )
    return k, calls


async def stop(k: LivenessKeeper, task: asyncio.Task[None]) -> None:
    """Stop the keeper as the daemon does at shutdown: stopping set, its loop cancelled."""
    k.stopping.set()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.001)


async def test_a_lost_session_stops_the_work_and_is_taken_again_before_any_claim() -> None:
    """Proven once the first session is taken; its loss stops the work at once (logged once,
    with how many were stopped); the new session, taken after two failed tries, first lets the
    dispatcher release its leases, and only then counts as proven."""
    session = FakeSession([0, 2])
    k, calls = keeper(session)
    with capture_logs() as logs:
        task = asyncio.create_task(k.run())
        await until(lambda: k.proven)
        assert k.metrics.registry.get_sample_value("watcher_liveness_held") == 1
        session.cut.set()
        await until(lambda: session.takes == 2 and k.proven)
        await stop(k, task)
    assert calls["lost"] == [False]  # the claims stopped before the work was
    assert calls["back"] == [False]  # leases released before anything is claimed again
    events = [(e["event"], e.get("stopped"), e.get("attempts")) for e in logs]
    assert events == [("liveness_lost", 3, None), ("liveness_restored", None, 3)]
    assert not k.proven
    await k.close()
    assert session.closed


async def test_a_first_session_that_cannot_be_taken_is_tried_again() -> None:
    """No session at start-up: nothing proven, one line saying so, then taken with backoff."""
    session = FakeSession([2])
    k, calls = keeper(session)
    with capture_logs() as logs:
        task = asyncio.create_task(k.run())
        await until(lambda: k.proven)
        await stop(k, task)
    assert [e["event"] for e in logs] == ["liveness_lost", "liveness_restored"]
    assert logs[0]["stopped"] == 0
    assert calls["due"]  # the dispatcher was told to claim once proven


async def test_dead_replicas_found_are_logged_counted_and_wake_the_fleet() -> None:
    """A look that finds a dead replica's leases logs it once per replica, counts the leases
    and wakes the claim loop; none is made while the store is down."""
    k, calls = keeper(FakeSession([]), store=DeadFinder())
    alive = asyncio.create_task(k.run())
    await until(lambda: k.proven)
    calls["due"].clear()
    with capture_logs() as logs:
        task = asyncio.create_task(k.find_dead())
        await until(lambda: bool(calls["due"]))
        await stop(k, task)
    await stop(k, alive)
    assert [(e["event"], e["replica"], e["leases"]) for e in logs] == [
        ("replica_found_dead", "r2", 2)
    ]
    assert k.metrics.registry.get_sample_value("watcher_leases_taken_over_total") == 2


async def test_no_dead_replica_is_looked_for_while_the_store_is_down() -> None:
    """While the store does not answer (or this replica is not proven), nobody is found dead."""
    store = DeadFinder()
    k, calls = keeper(FakeSession([]), store=store, store_down=lambda: True)
    alive = asyncio.create_task(k.run())
    await until(lambda: k.proven)
    calls["due"].clear()
    task = asyncio.create_task(k.find_dead())
    await asyncio.sleep(0.02)
    await stop(k, task)
    await stop(k, alive)
    assert store.found  # never asked
    assert not calls["due"]
