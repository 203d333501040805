"""The token-less loopback API against web pages: DNS rebinding (a foreign ``Host``), cross-site
requests (``Origin``, ``Sec-Fetch-Site``) and bodies that are not JSON, over real TCP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from tests.integration.http_support import running
from tests.integration.test_http_api import QUIET, make_daemon
from watcher import clock
from watcher.simulator.server import SimulatorServer
from watcher.webhooks import signed_headers

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]
EVIL_TRACK = b'{"id": "cmevil", "kind": "image", "delete_after_download": true}'
SECRET = "whsec_guard"


async def test_a_cross_site_form_post_tracks_nothing(serve: Serve, tmp_path: Path) -> None:
    """What a web page can send without a CORS preflight (``text/plain``, a foreign ``Origin``,
    ``Sec-Fetch-Site: cross-site``) is refused, and no project gets tracked."""
    daemon = make_daemon(serve(QUIET), tmp_path, control_token="")
    async with running(daemon) as run, httpx.AsyncClient(base_url=run.server.url) as client:
        attempts = [
            {"content-type": "text/plain", "origin": "https://evil.example"},
            {"content-type": "text/plain"},
            {"content-type": "application/x-www-form-urlencoded"},
            {"content-type": "application/json", "origin": "https://evil.example"},
            {"content-type": "application/json", "origin": "null"},
            {"content-type": "application/json", "sec-fetch-site": "cross-site"},
            {"content-type": "application/json", "sec-fetch-site": "same-site"},
        ]
        answers = [
            await client.post("/v1/projects", content=EVIL_TRACK, headers=headers)
            for headers in attempts
        ]
        listed = (await client.get("/v1/projects")).json()
        tracked = await daemon.store.get("cmevil")
    assert [(a.status_code, a.json()["error"]) for a in answers] == [
        (403, "cross_site_request"),
        (415, "unsupported_media_type"),
        (415, "unsupported_media_type"),
        (403, "cross_site_request"),
        (403, "cross_site_request"),
        (403, "cross_site_request"),
        (403, "cross_site_request"),
    ]
    assert listed["projects"] == []
    assert tracked is None


async def test_a_rebound_host_name_cannot_read_the_api(serve: Serve, tmp_path: Path) -> None:
    """A request for ``Host: evil.example`` (DNS rebinding) is refused on every route but the
    signed webhook; loopback names and IP addresses (probes use the pod IP) are served."""
    daemon = make_daemon(serve(QUIET), tmp_path, control_token="")
    async with running(daemon) as run, httpx.AsyncClient(base_url=run.server.url) as client:
        await client.post("/v1/projects", json={"id": "cmmine", "kind": "image"})
        refused = [
            await client.get(path, headers={"host": host})
            for path in ("/v1/projects", "/v1/projects/cmmine", "/metrics", "/readyz")
            for host in (
                "evil.example",
                f"evil.example:{run.server.port}",
                "127.0.0.1.evil.example",
            )
        ]
        served = [
            await client.get("/v1/projects", headers={"host": host})
            for host in (
                f"127.0.0.1:{run.server.port}",
                f"localhost:{run.server.port}",
                f"[::1]:{run.server.port}",
                "10.1.2.3:8080",
                "LOCALHOST",
            )
        ]
    assert {(r.status_code, r.json()["error"]) for r in refused} == {(400, "host_not_allowed")}
    assert all("cmmine" not in r.text for r in refused)
    assert [r.status_code for r in served] == [200] * len(served)


async def test_allowed_hosts_admit_a_proxy_name(serve: Serve, tmp_path: Path) -> None:
    """``WATCHER_HTTP_ALLOWED_HOSTS`` names the Host a reverse proxy forwards; others stay out."""
    daemon = make_daemon(
        serve(QUIET), tmp_path, control_token="", http_allowed_hosts="watcher.internal, Ops.Example"
    )
    async with running(daemon) as run, httpx.AsyncClient(base_url=run.server.url) as client:
        codes = {
            host: (await client.get("/healthz", headers={"host": host})).status_code
            for host in ("watcher.internal", "ops.example:443", "evil.example")
        }
    assert codes == {"watcher.internal": 200, "ops.example:443": 200, "evil.example": 400}


async def test_signed_webhooks_still_arrive_through_a_public_host(
    serve: Serve, tmp_path: Path
) -> None:
    """Magic Hour's deliveries come through a proxy under the public name: the signature, not
    the Host, authenticates them, so they are acted on."""
    daemon = make_daemon(
        serve(QUIET), tmp_path, control_token="", webhook_secret=SECRET, webhook_auto_track="true"
    )
    body = json.dumps({"type": "image.completed", "payload": {"id": "cmhook"}}).encode()
    async with running(daemon) as run, httpx.AsyncClient(base_url=run.server.url) as client:
        answer = await client.post(
            "/webhooks/magic-hour",
            content=body,
            headers={
                "host": "hooks.public.example",
                "content-type": "application/json",
                **signed_headers(SECRET, body, now=clock.now()),
            },
        )
    assert (answer.status_code, answer.json()["action"]) == (200, "tracked")


async def test_refusals_are_logged_once_per_burst(serve: Serve, tmp_path: Path) -> None:
    """A page hammering the API leaves one ``http_request_refused`` line naming the first
    refusal, so a misconfigured proxy can be diagnosed and a hostile page cannot flood."""
    daemon = make_daemon(serve(QUIET), tmp_path, control_token="")
    with capture_logs() as logs:
        async with running(daemon) as run, httpx.AsyncClient(base_url=run.server.url) as client:
            for _ in range(20):
                await client.get("/v1/projects", headers={"host": "evil.example"})
    refused = [e for e in logs if e["event"] == "http_request_refused"]
    assert [(e["error"], e["host"], e["occurrences"]) for e in refused] == [
        ("host_not_allowed", "evil.example", 1)
    ]
