"""Polling that trusts webhooks, decision by decision: which payloads are held, dropped or sent
to a GET (:mod:`watcher.announcements`); the workflow acting on a held payload as on a GET's
answer; the dispatcher making an announced project due first. The in-memory store, the scripted
API behind ``httpx.MockTransport`` and the fake clock of tests/unit/test_workflow.py."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.unit.fake_time import FakeClock
from tests.unit.test_workflow import API, CDN, PID, START, Rig, body, complete, content, rig_for
from watcher.announcements import Announcements, Verdict, lacking
from watcher.dispatcher import ANNOUNCED_DUE_AT, Dispatcher
from watcher.health import ApiHealth
from watcher.models import Kind, ProjectRef, ProjectSnapshot, RemoteStatus, State
from watcher.outage import StoreHealth
from watcher.settings import load_settings
from watcher.store import InMemoryStore, ProjectRecord

pytestmark = pytest.mark.anyio

FALLBACK = 30.0


def snapshot(data: dict[str, Any]) -> ProjectSnapshot:
    """A payload as the webhook handler parses it."""
    return ProjectSnapshot.parse(data)


async def tracked(store: InMemoryStore, clock: FakeClock, pid: str = PID) -> ProjectRecord:
    await store.track([ProjectRef(Kind.IMAGE, pid)], now=clock.now(), delete_after_download=False)
    record = await store.get(pid)
    assert record is not None
    return record


def knowing(record: ProjectRecord, status: RemoteStatus) -> ProjectRecord:
    """``record`` as it is once a GET saw ``status``."""
    return dataclasses.replace(record, remote_status=status)


# --- which payloads are held -----------------------------------------------------------------


async def test_a_payload_behind_what_is_known_is_stale_and_the_more_advanced_is_kept() -> None:
    """``started`` after a GET saw the render end is stale; of two payloads for one project the
    later status wins, whatever order they arrived in; one taken is gone."""
    clock = FakeClock(START)
    store = InMemoryStore()
    news = Announcements(now=clock.now)
    record = await tracked(store, clock)
    assert news.put(knowing(record, RemoteStatus.COMPLETE), snapshot(body(PID))) == Verdict.STALE
    assert news.put(record, snapshot(complete(PID, "a.png"))) == Verdict.WAITING
    assert news.put(record, snapshot(body(PID, "rendering"))) == Verdict.STALE
    assert news.put(record, snapshot(body(PID, "queued"))) == Verdict.STALE
    taken = news.take(record)
    assert taken is not None
    assert taken.status == RemoteStatus.COMPLETE
    assert news.take(record) is None


async def test_a_payload_the_store_has_moved_past_since_is_not_taken() -> None:
    """Held while the project was queued, a ``started`` payload is not taken once a GET has
    seen the project complete."""
    clock = FakeClock(START)
    store = InMemoryStore()
    news = Announcements(now=clock.now)
    record = await tracked(store, clock)
    assert news.put(knowing(record, RemoteStatus.QUEUED), snapshot(body(PID))) == Verdict.WAITING
    assert news.take(knowing(record, RemoteStatus.COMPLETE)) is None
    assert not news.waiting(PID)


def test_a_payload_lacking_what_a_get_gives_goes_to_a_get() -> None:
    """``complete`` without downloads (unless deleted: a GET would say no more) and ``error``
    without the error are lacking; the others are not."""
    assert lacking(snapshot(body(PID, "complete")))
    assert not lacking(snapshot(body(PID, "complete", enabled=False)))
    assert lacking(snapshot(body(PID, "error")))
    assert not lacking(snapshot(body(PID, "error", error={"code": "x", "message": "y"})))
    assert not lacking(snapshot(complete(PID, "a.png")))
    assert not lacking(snapshot(body(PID, "rendering")))


async def test_a_payload_no_claim_took_is_forgotten_after_keep_seconds() -> None:
    """The project was claimed elsewhere (another replica) and moved on: the payload does not
    stay in memory for ever."""
    clock = FakeClock(START)
    store = InMemoryStore()
    news = Announcements(keep_seconds=60, now=clock.now)
    record = await tracked(store, clock)
    other = await tracked(store, clock, "cwf0000000000000000000009")
    news.put(record, snapshot(body(PID)))
    clock.advance(61)
    news.put(other, snapshot(body(other.id)))
    assert not news.waiting(PID)
    assert news.waiting(other.id)


def test_polling_relaxes_only_while_events_of_the_kind_arrive() -> None:
    """No event yet: the normal delay. An image event: images wait at least the fallback,
    videos do not; a longer normal delay stands. The fallback's span after the last event:
    back to normal. A fallback of 0: never relaxed."""
    clock = FakeClock(START)
    news = Announcements(fallback_poll=FALLBACK, now=clock.now)
    assert news.poll_delay(Kind.IMAGE, 2.0) == 2.0
    news.heard(Kind.IMAGE)
    assert news.poll_delay(Kind.IMAGE, 2.0) == FALLBACK
    assert news.poll_delay(Kind.IMAGE, 45.0) == 45.0
    assert news.poll_delay(Kind.VIDEO, 5.0) == 5.0
    clock.advance(FALLBACK)
    assert news.poll_delay(Kind.IMAGE, 2.0) == FALLBACK
    clock.advance(0.001)
    assert news.poll_delay(Kind.IMAGE, 2.0) == 2.0
    off = Announcements(fallback_poll=0, now=clock.now)
    off.heard(Kind.IMAGE)
    assert off.poll_delay(Kind.IMAGE, 2.0) == 2.0


# --- the workflow acts on a held payload as on a GET's answer ----------------------------------


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made, http = rig_for(tmp_path)
    made.workflow.announcements = Announcements(fallback_poll=FALLBACK, now=made.clock.now)
    async with http:
        yield made


async def announce(rig: Rig, data: dict[str, Any], pid: str = PID) -> Verdict:
    """A verified event about ``pid`` with payload ``data``."""
    news = rig.workflow.announcements
    news.heard(Kind.IMAGE)
    return news.put(await rig.record(pid), snapshot(data))


async def test_a_completed_payload_saves_the_outputs_without_any_get(rig: Rig) -> None:
    """The payload's download URLs are saved from; the API sees no GET at all."""
    await rig.track()
    assert await announce(rig, complete(PID, "a.png", "b.png")) == Verdict.WAITING
    with capture_logs() as logs:
        record = await rig.step()
    assert record.state == State.SAVED
    assert rig.api.count("GET", API) == 0
    assert rig.api.count("GET", CDN) == 2
    assert rig.file("a.png").read_bytes() == content("a.png")
    assert rig.workflow.metrics.webhook_payloads.labels("image")._value.get() == 1
    (used,) = [e for e in logs if e["event"] == "webhook_payload_used"]
    assert used["status"] == "complete"


async def test_an_errored_payload_ends_the_project_with_its_error(rig: Rig) -> None:
    """No GET: the error is the payload's."""
    await rig.track()
    error = {"code": "no_source_face", "message": "Please use an image with a detectable face"}
    await announce(rig, body(PID, "error", error=error))
    record = await rig.step()
    assert (record.state, record.error_code) == (State.ERROR, "no_source_face")
    assert rig.api.count("GET") == 0


async def test_a_started_payload_records_rendering_and_relaxes_the_next_poll(rig: Rig) -> None:
    """``rendering`` is recorded without a GET and, events arriving, the next poll is the
    fallback away (a normal one would be about 2 s)."""
    await rig.track()
    await announce(rig, body(PID, "rendering"))
    record = await rig.step()
    assert (record.state, record.remote_status) == (State.POLLING, RemoteStatus.RENDERING)
    assert record.due_at == pytest.approx(rig.clock.now() + FALLBACK)
    assert rig.api.count("GET") == 0


async def test_without_events_arriving_the_next_poll_is_the_normal_one(rig: Rig) -> None:
    """A GET's answer with no event heard: the usual dense interval (POLL_INITIAL 2 s)."""
    await rig.track()
    rig.api.answer(PID, body(PID, "rendering"))
    record = await rig.step()
    assert record.due_at - rig.clock.now() <= 2.0
    assert rig.api.count("GET") == 1


@pytest.mark.parametrize(
    ("answered", "meanwhile"),
    [
        (body(PID, "rendering"), complete(PID, "a.png")),
        (complete(PID, "a.png"), body(PID, "rendering")),
    ],
    ids=["the event knows more", "the GET knows more"],
)
async def test_an_event_during_the_get_is_acted_on_only_if_it_knows_more(
    rig: Rig, answered: dict[str, Any], meanwhile: dict[str, Any]
) -> None:
    """A ``completed`` event that came while the GET in flight answered ``rendering`` wins
    (the outputs are saved with no second GET); a ``started`` that came while the GET answered
    ``complete`` is dropped. Either way the project is saved after one GET."""
    await rig.track()
    rig.api.answer(PID, answered)

    async def event_arrives(pid: str) -> None:
        await announce(rig, meanwhile)

    rig.api.on_get = event_arrives
    record = await rig.step()
    assert record.state == State.SAVED
    assert rig.api.count("GET", API) == 1
    assert not rig.workflow.announcements.waiting(PID)


async def test_a_repeated_completed_event_downloads_nothing_twice(rig: Rig) -> None:
    """The first ``completed`` starts the downloads (the first try fails: retried later); the
    same event again, with other URLs, is never taken by the downloading project's work: it
    saves the outputs the store recorded, each once, and sends no GET."""
    await rig.track()
    await announce(rig, complete(PID, "a.png"))
    rig.api.cdn["a.png"] = [500]
    record = await rig.step()
    assert record.state == State.DOWNLOADING
    await announce(rig, complete(PID, "b.png"))
    record = await rig.step()
    assert record.state == State.SAVED
    fetched = [u for m, u in rig.api.seen if u.startswith(CDN)]
    assert fetched == [f"{CDN}/a.png", f"{CDN}/a.png"]
    assert rig.api.count("GET", API) == 0


# --- the dispatcher makes an announced project due first ---------------------------------------


def dispatcher_for(store: InMemoryStore, clock: FakeClock) -> Dispatcher:
    settings = load_settings({"WATCHER_API_TOKEN": "mhk_live_unit"})
    return Dispatcher(
        store=store,
        health=ApiHealth(settings, now=clock.now),
        store_health=StoreHealth(initial=0.01, maximum=0.02, rng=random.Random(1)),
        owner="me",
        lease_seconds=60,
        max_in_flight=4,
        stopping=asyncio.Event(),
        announcements=Announcements(fallback_poll=FALLBACK, now=clock.now),
        now=clock.now,
    )


async def test_an_announced_project_is_claimed_ahead_of_every_overdue_one() -> None:
    """Ten projects overdue since long, one announced: the announced one is claimed first."""
    clock = FakeClock(START)
    store = InMemoryStore()
    for n in range(10):
        await tracked(store, clock, f"cwf00000000000000000000{n:02d}")
    clock.advance(100)
    record = await tracked(store, clock)
    dispatcher = dispatcher_for(store, clock)
    assert await dispatcher.announce(record, snapshot(complete(PID, "a.png"))) == (
        "announced",
        None,
    )
    after = await store.get(PID)
    assert after is not None
    assert after.due_at == ANNOUNCED_DUE_AT
    (first,) = await store.claim_due(now=clock.now(), limit=1, owner="me", lease_seconds=60)
    assert first.id == PID


async def test_a_stale_or_lacking_payload_is_ignored_or_polled_now() -> None:
    """Stale: nothing changes. Lacking: the project is due now (not first), for a GET."""
    clock = FakeClock(START)
    store = InMemoryStore()
    record = knowing(await tracked(store, clock), RemoteStatus.RENDERING)
    dispatcher = dispatcher_for(store, clock)
    action, note = await dispatcher.announce(record, snapshot(body(PID, "queued")))
    assert action == "ignored"
    assert note is not None
    assert "stale" in note
    assert not dispatcher.announcements.waiting(PID)
    clock.advance(5)
    action, _ = await dispatcher.announce(record, snapshot(body(PID, "complete")))
    assert action == "expedited"
    after = await store.get(PID)
    assert after is not None
    assert after.due_at == START
