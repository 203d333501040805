"""A store outage in the middle of the daemon's work, in-process: an in-memory store that stops
answering at a chosen call, against the real simulator. The daemon neither dies nor loses a
write: the work waits for the store and goes on from what it holds, under the same lease."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.support import watcher_settings
from watcher import clock
from watcher.errors import StoreUnavailable
from watcher.models import Kind, RemoteStatus, State
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.timeline import ProjectOverrides
from watcher.store import Claim, InMemoryStore, OutputState
from watcher.wiring import build

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]


class OutageStore(InMemoryStore):
    """The in-memory store, which stops answering at the first call of ``trigger``: that call
    and the ``failing`` calls after it (of any method) raise :class:`StoreUnavailable`."""

    def __init__(
        self,
        trigger: str,
        failing: int,
        meanwhile: Callable[[InMemoryStore], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__()
        self.trigger = trigger
        self.left = -1  # -1: the outage has not begun
        self.failing = failing
        self.failed: list[str] = []
        self.meanwhile = meanwhile  # what another replica does while this one cannot reach it

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not asyncio.iscoroutinefunction(attr):
            return attr

        async def call(*args: object, **kwargs: object) -> object:
            if name == self.trigger and self.left == -1:
                self.left = 0
                if self.meanwhile is not None:
                    await self.meanwhile(self)
                self.left = self.failing + 1
            if self.left > 0:
                self.left -= 1
                self.failed.append(name)
                raise StoreUnavailable(f"the database does not answer ({name})")
            result: Coroutine[Any, Any, object] = attr(*args, **kwargs)
            return await result

        return call


def done_projects(seed: int) -> SimConfig:
    """Projects that are complete at once, with two outputs (each output is a few writes)."""
    return SimConfig(
        seed=seed,
        queued_seconds=(0.0, 0.0),
        rendering_seconds=(0.0, 0.0),
        error_rate=0.0,
        cancel_rate=0.0,
        image_outputs=(2, 2),
        output_bytes=(5_000, 50_000),
    )


@pytest.mark.parametrize(
    "trigger",
    ["record_output_saved", "record_output_verified", "record_complete", "record_final"],
)
async def test_a_write_that_fails_mid_work_is_redone_under_the_same_lease(
    serve: Serve, tmp_path: Path, trigger: str
) -> None:
    """The outage starts at one of the work's writes and outlasts a few probes: the project ends
    as configured, byte for byte, never taken over (no interruption), with one warning for the
    outage and one line when the store is back."""
    server = serve(done_projects(seed=31))
    sim = server.simulator
    (pid,) = sim.create_projects(Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE))
    settings = watcher_settings(
        server,
        tmp_path,
        projects=pid,
        delete_after_download="true",
        store_retry_initial="0.01",
        store_retry_max="0.05",
    )
    store = OutageStore(trigger, failing=3)
    with capture_logs() as logs:
        outcome = await asyncio.wait_for(build(settings, store, until_done=True).run(), 30)
    assert store.failed[0] == trigger
    assert outcome.exit_code == 0
    assert outcome.counts == {State.DELETED: 1}
    events = [e["event"] for e in logs]
    assert events.count("store_unavailable") == 1, events
    assert events.count("store_recovered") == 1, events
    assert "store_error" not in events
    assert "lease_expired_while_working" not in events
    record = await store.get(pid)
    assert record is not None
    assert record.interruptions == 0
    for out in sim.truth(pid).outputs:
        (path,) = (tmp_path / "downloads" / "image" / pid).glob(f"{out.index}-*")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == out.sha256
    assert not list((tmp_path / "downloads").rglob("*.part"))


async def test_claims_that_fail_pause_the_daemon_instead_of_ending_it(
    serve: Serve, tmp_path: Path
) -> None:
    """The dispatch loop's claim fails several times in a row: the daemon backs off, then
    claims and finishes every project."""
    server = serve(done_projects(seed=32))
    ids = server.simulator.create_projects(
        Kind.IMAGE, 3, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    settings = watcher_settings(
        server,
        tmp_path,
        projects=" ".join(ids),
        store_retry_initial="0.01",
        store_retry_max="0.05",
    )
    store = OutageStore("claim_due", failing=4)
    with capture_logs() as logs:
        outcome = await asyncio.wait_for(build(settings, store, until_done=True).run(), 30)
    assert outcome.counts == {State.SAVED: 3}
    assert store.failed[0] == "claim_due"
    assert set(store.failed) == {"claim_due", "release_leases"}  # the probe: a write
    outage = [e for e in logs if e["event"] == "store_unavailable"]
    assert [e["during"] for e in outage] == ["claim"]
    (back,) = [e for e in logs if e["event"] == "store_recovered"]
    assert back["failures"] == 5


async def test_work_whose_lease_was_taken_during_the_outage_stops_there(
    serve: Serve, tmp_path: Path
) -> None:
    """Another replica claims the project while this one cannot reach the store: once the store
    answers, this one's work sees the lease gone, says so, and writes nothing more."""
    server = serve(done_projects(seed=33))
    (pid,) = server.simulator.create_projects(
        Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    settings = watcher_settings(
        server, tmp_path, projects=pid, store_retry_initial="0.01", store_retry_max="0.05"
    )
    taken: list[Claim] = []

    async def another_replica_claims(store: InMemoryStore) -> None:
        later = clock.now() + 3600  # past this replica's lease
        taken.extend(
            await InMemoryStore.claim_due(
                store, now=later, limit=1, owner="other", lease_seconds=600
            )
        )

    store = OutageStore("record_output_saved", failing=3, meanwhile=another_replica_claims)
    daemon = build(settings, store)
    with capture_logs() as logs:
        running = asyncio.create_task(daemon.run())
        deadline = asyncio.get_running_loop().time() + 20
        while not any(e["event"] == "lease_lost" for e in logs):
            assert asyncio.get_running_loop().time() < deadline, str([e["event"] for e in logs])
            await asyncio.sleep(0.02)
        daemon.request_stop()
        await asyncio.wait_for(running, 20)
    (lost,) = [e for e in logs if e["event"] == "lease_lost"]
    assert (lost["project_id"], lost["during"]) == (pid, "outage")
    (claim,) = taken
    record = await store.get(pid)
    assert record is not None
    assert (record.lease_owner, record.lease_version) == ("other", claim.version)
    assert OutputState.SAVED not in {o.state for o in await store.outputs(pid)}
