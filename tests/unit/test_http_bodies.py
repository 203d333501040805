"""No request makes the control plane answer 500: hostile JSON to the tracking API and to the
webhook receiver (signed, so it reaches the parser), absurd numbers in the query or in
``Content-Length``, get a 4xx JSON error and track nothing."""

from __future__ import annotations

import httpx
import pytest

from watcher import clock
from watcher.daemon import Daemon
from watcher.http.app import create_app
from watcher.settings import load_settings
from watcher.store import InMemoryStore
from watcher.webhooks import signed_headers
from watcher.wiring import build

pytestmark = pytest.mark.anyio

SECRET = "whsec_bodies"
DEEP = 10_000  # levels: far beyond the parser's recursion limit, within the 64 KiB cap
HOSTILE = [
    pytest.param(b"[" * DEEP + b"]" * DEEP, id="deep-array"),
    pytest.param(b'{"a":' * DEEP + b"1" + b"}" * DEEP, id="deep-object"),
    pytest.param(
        b'{"id": "cm1", "kind": "image", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}", id="deep-field"
    ),
    pytest.param(b'{"id": ' + b"7" * 5000 + b', "kind": "image"}', id="huge-integer"),
    pytest.param(b'{"id": "cm1", "kind": "image", "\\ud800": 1}', id="surrogate-field"),
    pytest.param(b'{"id": "\\udfff\\u001b[2J", "kind": "image"}', id="surrogate-id"),
    pytest.param(b'{"id": "cm1", "kind": "\\ud800"}', id="surrogate-kind"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(b'{"id": "cm1", "kind": "image", "delete_after_download": NaN}', id="nan"),
    pytest.param(b"NaN", id="bare-nan"),
    pytest.param(b"", id="empty"),
]


def client_of(daemon: Daemon) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(daemon, daemon.store, daemon.metrics))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")


@pytest.mark.parametrize("body", HOSTILE)
async def test_hostile_bodies_to_the_tracking_api_are_refused_with_400(body: bytes) -> None:
    """``POST /v1/projects`` answers 400 with a JSON error, never 500, and tracks nothing."""
    daemon = build(load_settings({"WATCHER_API_TOKEN": "t"}), InMemoryStore())
    async with client_of(daemon) as client:
        response = await client.post(
            "/v1/projects", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"] in {
        "invalid_json",
        "invalid_request",
        "invalid_id",
        "invalid_kind",
    }
    assert await daemon.store.count_by_state() == {}


@pytest.mark.parametrize("body", HOSTILE)
async def test_hostile_signed_webhooks_are_refused_with_400(body: bytes) -> None:
    """A correctly signed webhook whose body is hostile JSON answers 400 ``invalid_event``."""
    settings = load_settings(
        {
            "WATCHER_API_TOKEN": "t",
            "WATCHER_WEBHOOK_SECRET": SECRET,
            "WATCHER_WEBHOOK_AUTO_TRACK": "true",
        }
    )
    daemon = build(settings, InMemoryStore())
    async with client_of(daemon) as client:
        response = await client.post(
            "/webhooks/magic-hour",
            content=body,
            headers={
                "content-type": "application/json",
                **signed_headers(SECRET, body, now=clock.now()),
            },
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_event"
    assert await daemon.store.count_by_state() == {}


@pytest.mark.parametrize("limit", ["9" * 5000, "²", "\u0661\u0660", "1e3", " 5", "-1"])
async def test_a_limit_that_is_not_plain_digits_is_400(limit: str) -> None:
    """``limit`` must be ASCII digits: 5000 of them, a superscript or Arabic-Indic digits are
    400 ``invalid_parameter``, not a 500 (or a page of ten)."""
    daemon = build(load_settings({"WATCHER_API_TOKEN": "t"}), InMemoryStore())
    async with client_of(daemon) as client:
        response = await client.get("/v1/projects", params={"limit": limit})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_parameter")


async def test_an_absurd_content_length_is_413() -> None:
    """A declared length of 5000 digits is refused as too large, not parsed into a 500."""
    daemon = build(load_settings({"WATCHER_API_TOKEN": "t"}), InMemoryStore())
    async with client_of(daemon) as client:
        response = await client.post(
            "/v1/projects",
            content=b"{}",
            headers={"content-type": "application/json", "content-length": "9" * 5000},
        )
    assert (response.status_code, response.json()["error"]) == (413, "body_too_large")
    assert "5000 digits" in response.json()["message"]
