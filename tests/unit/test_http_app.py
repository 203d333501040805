"""The HTTP app in-process (``httpx.ASGITransport``) over the in-memory store: the webhook's
follow-up when a poll was already in flight, and readiness with a store that does not answer."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import watcher.http.app
from watcher import clock
from watcher.errors import ConfigError, StoreError
from watcher.http.app import create_app
from watcher.http.server import check_settings
from watcher.models import Kind, ProjectRef, RemoteStatus
from watcher.settings import load_settings
from watcher.store import InMemoryStore
from watcher.webhooks import signed_headers
from watcher.wiring import build

pytestmark = pytest.mark.anyio

SECRET = "whsec_unit"


async def test_an_event_during_an_in_flight_poll_is_followed_by_another_poll() -> None:
    """If the project is leased (its GET in flight, maybe answered before the change), the
    project is made due again as soon as that work releases it, not after its long backoff."""
    settings = load_settings({"WATCHER_WEBHOOK_SECRET": SECRET, "WATCHER_API_TOKEN": "t"})
    store = InMemoryStore()
    daemon = build(settings, store)
    now = clock.now()
    await store.track([ProjectRef(Kind.IMAGE, "cm1")], now=now, delete_after_download=False)
    (claim,) = await store.claim_due(now=now, limit=1, owner="me", lease_seconds=30)

    body = json.dumps({"type": "image.completed", "payload": {"id": "cm1"}}).encode()
    transport = httpx.ASGITransport(app=create_app(daemon, daemon.store, daemon.metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        delivery = asyncio.create_task(
            client.post(
                "/webhooks/magic-hour",
                content=body,
                headers=signed_headers(SECRET, body, now=clock.now()),
            )
        )
        await asyncio.sleep(0.3)
        # The in-flight GET saw "rendering" and scheduled the next poll an hour away.
        await store.record_poll(
            claim,
            now=clock.now(),
            remote_status=RemoteStatus.RENDERING,
            attempt=1,
            due_at=now + 3600,
        )
        answer = await asyncio.wait_for(delivery, 5)
    assert answer.json() == {
        "action": "expedited",
        "note": "a poll is in flight; another follows it",
    }
    # The follow-up runs beside the answer (the daemon's, not the handler's): wait for it.
    for _ in range(100):
        record = await store.get("cm1")
        assert record is not None
        if record.due_at <= clock.now():
            break
        await asyncio.sleep(0.05)
    assert record is not None
    assert record.lease_owner is None
    assert record.due_at <= clock.now()


class DeadStore(InMemoryStore):
    """A store whose database went away."""

    async def ping(self) -> None:
        raise StoreError("database is locked")


async def test_readiness_fails_when_the_store_does_not_answer() -> None:
    """/readyz answers 503 naming the store while /healthz still answers 200."""
    settings = load_settings({"WATCHER_API_TOKEN": "t"})
    daemon = build(settings, DeadStore())
    transport = httpx.ASGITransport(app=create_app(daemon, daemon.store, daemon.metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        ready = await client.get("/readyz")
        health = await client.get("/healthz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["store"] == "unreachable"
    assert ready.json()["problems"] == ["the store does not answer: database is locked"]
    assert health.status_code == 200


class HungStore(InMemoryStore):
    """A store whose ping never answers (a frozen database), noting that it was cancelled."""

    cancelled = False

    async def ping(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_readiness_answers_in_bounded_time_when_the_store_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ping that never returns is given up after STORE_PING_SECONDS: /readyz answers 503
    (the probe gets an answer, not a timeout of its own) and the ping is cancelled."""
    monkeypatch.setattr(watcher.http.app, "STORE_PING_SECONDS", 0.05)
    store = HungStore()
    daemon = build(load_settings({"WATCHER_API_TOKEN": "t"}), store)
    transport = httpx.ASGITransport(app=create_app(daemon, daemon.store, daemon.metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["store"] == "unreachable"
    assert ready.json()["problems"] == ["the store does not answer: timed out"]
    assert store.cancelled


@pytest.mark.parametrize(
    ("host", "token", "refused"),
    [
        ("0.0.0.0", None, True),  # noqa: S104 - the case under test
        ("0.0.0.0", "  ", True),  # noqa: S104
        ("192.168.1.20", None, True),
        ("::", None, True),
        ("0.0.0.0", "s3cret", False),  # noqa: S104
        ("127.0.0.1", None, False),
        ("localhost", None, False),
        ("::1", None, False),
    ],
)
def test_a_public_address_needs_a_control_token(
    host: str, token: str | None, refused: bool
) -> None:
    """Listening beyond loopback without a (non-blank) control token is a settings error."""
    env = {"WATCHER_HTTP_HOST": host}
    if token is not None:
        env["WATCHER_CONTROL_TOKEN"] = token
    settings = load_settings(env)
    if refused:
        with pytest.raises(ConfigError, match="WATCHER_CONTROL_TOKEN: required"):
            check_settings(settings)
    else:
        check_settings(settings)
    check_settings(load_settings({**env, "WATCHER_HTTP_ENABLED": "false"}))
