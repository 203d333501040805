"""The notifier against the in-memory store and ``httpx.MockTransport``: signing, retry backoff."""

from __future__ import annotations

import asyncio
import json
import random
from typing import TYPE_CHECKING, cast

import httpx
import pytest

from watcher import clock
from watcher.control import Readiness
from watcher.errors import ConfigError
from watcher.metrics import Metrics
from watcher.models import Kind, ProjectRef, State
from watcher.notify import MAX_DELAY, Notifier, check_settings, retry_delay
from watcher.settings import load_settings
from watcher.store import InMemoryStore
from watcher.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

if TYPE_CHECKING:
    from watcher.control import Control

pytestmark = pytest.mark.anyio

SECRET = "notify-secret"
URL = "https://receiver.example/hooks/watcher"


def test_retry_delay_doubles_with_jitter_and_is_capped() -> None:
    """Each failure doubles the wait (jittered between half and all of it), up to 10 minutes."""
    rng = random.Random(1)
    for attempts in range(12):
        ceiling = min(MAX_DELAY, 2.0 * 2**attempts)
        delays = [retry_delay(attempts, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert retry_delay(10_000, rng) <= MAX_DELAY


async def queued(store: InMemoryStore, body: dict[str, object]) -> None:
    """Finish a project with a notification queued, as the daemon does."""
    now = clock.now()
    await store.track([ProjectRef(Kind.IMAGE, "cm1")], now=now, delete_after_download=False)
    (claim,) = await store.claim_due(now=now, limit=1, owner="t", lease_seconds=30)
    await store.record_final(
        claim, now=now, state=State.ERROR, notify=lambda _p, _o: json.dumps(body)
    )


async def test_a_delivered_event_is_signed_and_marked_sent() -> None:
    """The stored body is POSTed as is, with headers that verify, and is not sent twice."""
    store = InMemoryStore()
    await queued(store, {"id": "e1", "type": "project.error"})
    received: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(204)

    metrics = Metrics()
    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as client:
        notifier = Notifier(URL, SECRET, client=client)
        assert await notifier.deliver_due(store, metrics, client) == 1
        assert await notifier.deliver_due(store, metrics, client) == 0
    (request,) = received
    assert str(request.url) == URL
    assert json.loads(request.content) == {"id": "e1", "type": "project.error"}
    verify(
        SECRET,
        request.content,
        signature=request.headers[SIGNATURE_HEADER],
        timestamp=request.headers[TIMESTAMP_HEADER],
        now=clock.now(),
    )
    assert metrics.notifications.labels("sent")._value.get() == 1


@pytest.mark.parametrize("answer", [500, 410, 302])
async def test_a_refused_event_is_retried_later_with_backoff(answer: int) -> None:
    """A non-2xx answer (redirects included) keeps the event, due again after the backoff."""
    store = InMemoryStore()
    await queued(store, {"id": "e2"})

    def receiver(_: httpx.Request) -> httpx.Response:
        return httpx.Response(answer, headers={"location": "https://elsewhere.example/"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as client:
        notifier = Notifier(URL, SECRET, client=client, rng=random.Random(3), base_delay=100)
        before = clock.now()
        await notifier.deliver_due(store, Metrics(), client)
    (n, due_at, sent) = store.notifications[1]
    assert sent is None
    assert n.attempts == 1
    assert n.last_error == f"the receiver answered HTTP {answer}"
    assert before + 50 <= due_at <= clock.now() + 100
    assert await store.claim_notifications(now=clock.now(), limit=5, lease_seconds=1) == []


async def test_a_network_failure_is_recorded_and_retried() -> None:
    """A connection error counts as a failed attempt with its cause, not a crash."""
    store = InMemoryStore()
    await queued(store, {"id": "e3"})

    def receiver(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    metrics = Metrics()
    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as client:
        await Notifier(URL, SECRET, client=client).deliver_due(store, metrics, client)
    (n, _, sent) = store.notifications[1]
    assert sent is None
    assert n.last_error == "ConnectError: connection refused"
    assert metrics.notifications.labels("failed")._value.get() == 1


def test_a_notify_url_needs_a_secret() -> None:
    """``WATCHER_NOTIFY_URL`` without a (non-blank) secret is refused; with one, a notifier
    for that URL is built; without a URL, none is."""
    unsigned = load_settings({"WATCHER_NOTIFY_URL": URL, "WATCHER_NOTIFY_SECRET": " "})
    with pytest.raises(ConfigError, match="WATCHER_NOTIFY_SECRET: required"):
        check_settings(unsigned)
    signed = load_settings({"WATCHER_NOTIFY_URL": URL, "WATCHER_NOTIFY_SECRET": SECRET})
    notifier = Notifier.from_settings(signed)
    assert notifier is not None
    assert notifier.url == URL
    assert Notifier.from_settings(load_settings({})) is None


class _Host:
    """What :meth:`Notifier.run` reads of the daemon's control interface."""

    def __init__(self) -> None:
        self.settings = load_settings({"WATCHER_NOTIFY_URL": URL, "WATCHER_NOTIFY_SECRET": SECRET})

    def readiness(self) -> Readiness:
        return Readiness(
            unauthorized=False,
            payment_required=False,
            store_problem=None,
            store_down=False,
            rate_limit_paused=0.0,
        )

    def store_failed(self, exc: Exception, *, during: str) -> None:
        raise AssertionError(f"unexpected store failure during {during}: {exc}")


async def test_a_delivery_in_flight_at_shutdown_is_finished_and_recorded() -> None:
    """Stopping while an event is being POSTed lets that delivery finish and records it sent,
    instead of leaving it claimed (and unsent) until its lease runs out."""
    store = InMemoryStore()
    await queued(store, {"id": "e4"})
    arrived = asyncio.Event()

    async def receiver(_: httpx.Request) -> httpx.Response:
        arrived.set()
        await asyncio.sleep(0.3)
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as client:
        notifier = Notifier(URL, SECRET, client=client)
        run = notifier.run(cast("Control", _Host()), store, Metrics())
        task = asyncio.create_task(run)
        await asyncio.wait_for(arrived.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (_, _, sent) = store.notifications[1]
    assert sent is not None
