"""Hostile input from the API side: file names that try to escape, oversized and non-JSON bodies,
and a disk that fills up. Each gets a clear outcome and loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from watcher.models import Kind, ProjectRef, State
from watcher.settings import Settings, load_settings
from watcher.store import InMemoryStore, SQLiteStore
from watcher.wiring import build
from watcher.workflow import WorkflowLimits

pytestmark = pytest.mark.anyio

API = "https://api.test"
CDN = "https://cdn.test"
EXPIRES = "2999-01-01T00:00:00.000Z"


def project(pid: str, urls: list[str]) -> dict[str, object]:
    return {
        "id": pid,
        "name": None,
        "status": "complete",
        "type": "AI_IMAGE",
        "created_at": "2026-01-01T00:00:00Z",
        "enabled": True,
        "credits_charged": 5,
        "image_count": len(urls),
        "downloads": [{"url": u, "expires_at": EXPIRES} for u in urls],
        "error": None,
    }


class FakeApi:
    """A fake API and CDN: each project id maps to a body (bytes) or to download URLs."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == "api.test":
            pid = request.url.path.rsplit("/", 1)[-1]
            if request.method == "DELETE":
                return httpx.Response(204)
            return httpx.Response(200, content=self.bodies[pid])
        return httpx.Response(200, content=self.files[request.url.raw_path.decode()])


def settings_for(root: Path, projects: str, **extra: str) -> Settings:
    env = {
        "WATCHER_API_TOKEN": "mhk_live_token",
        "WATCHER_API_BASE_URL": API,
        "WATCHER_PROJECTS": projects,
        "WATCHER_DOWNLOAD_DIR": str(root / "downloads"),
        "WATCHER_POLL_INITIAL": "0.05",
        "WATCHER_POLL_MAX": "0.2",
        "WATCHER_MAX_REQUESTS_PER_SECOND": "1000",
        "WATCHER_HTTP_ENABLED": "false",
    }
    env.update({f"WATCHER_{k.upper()}": v for k, v in extra.items()})
    return load_settings(env)


async def test_hostile_file_names_stay_inside_the_download_dir(tmp_path: Path) -> None:
    """Names with ../, absolute paths, NUL and 300 characters are saved under <kind>/<id>/."""
    api = FakeApi()
    names = [
        "/..%2F..%2Fescape.png",
        "/%2Fetc%2Fpasswd",
        "/bad%00name.png",
        "/" + "x" * 300 + ".png",
    ]
    urls = [f"{CDN}/f{i}{name}" for i, name in enumerate(names)]
    for i, url in enumerate(urls):
        api.files[httpx.URL(url).raw_path.decode()] = f"file {i}".encode()
    api.bodies["hostile1"] = json.dumps(project("hostile1", urls)).encode()
    settings = settings_for(tmp_path, "hostile1")
    daemon = build(
        settings, InMemoryStore(), until_done=True, transport=httpx.MockTransport(api.handler)
    )
    outcome = await asyncio.wait_for(daemon.run(), 20)
    assert outcome.counts == {State.SAVED: 1}
    folder = tmp_path / "downloads" / "image" / "hostile1"
    saved = sorted(p for p in (tmp_path).rglob("*") if p.is_file())
    assert len(saved) == 4
    for path in saved:
        assert path.parent == folder
        assert len(path.name) <= 110
        assert "\x00" not in path.name
    assert sorted(p.read_bytes() for p in saved) == [f"file {i}".encode() for i in range(4)]
    assert not any("authorization" in r.headers for r in api.requests if r.url.host == "cdn.test")


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        (b"<html><body>502 Bad Gateway from the proxy</body></html>", "bad_body"),
        (b'{"id": "p1", "status": "compl', "bad_body"),
        (b'{"id": "p1", "status": "exploded"}', "bad_body"),
        (b" " * (2 * 1024 * 1024), "body_too_large"),
    ],
)
async def test_unreadable_api_bodies_are_retried_not_fatal(
    tmp_path: Path, body: bytes, cause: str
) -> None:
    """HTML, truncated JSON, a schema mismatch or a huge body: a transient fault, logged briefly."""
    api = FakeApi()
    api.bodies["p1"] = body
    settings = settings_for(tmp_path, "p1")
    store = InMemoryStore()
    daemon = build(settings, store, transport=httpx.MockTransport(api.handler))
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        while len(api.requests) < 6:
            await asyncio.sleep(0.01)
        daemon.request_stop()
        await asyncio.wait_for(task, 10)
    retries = [e for e in logs if e["event"] == "api_retry"]
    assert retries
    assert {e["cause"] for e in retries} == {cause}
    assert all(len(e["error"]) < 400 for e in retries)
    record = await store.get("p1")
    assert record is not None
    assert record.state == State.POLLING
    assert record.failures >= 1


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
async def test_a_full_disk_fails_the_download_cleanly_and_it_is_retried(tmp_path: Path) -> None:
    """ENOSPC leaves no partial file and the project downloading; with space back, it completes."""
    api = FakeApi()
    big = os.urandom(3 * 1024 * 1024)
    api.files["/big/output.png"] = big
    api.bodies["p1"] = json.dumps(project("p1", [f"{CDN}/big/output.png"])).encode()
    downloads = tmp_path / "downloads"
    settings = settings_for(tmp_path, "p1")
    with tmpfs(downloads, "1m"):
        store = SQLiteStore(str(tmp_path / "w.db"), exclusive=True)
        daemon = build(
            settings,
            store,
            until_done=True,
            transport=httpx.MockTransport(api.handler),
            limits=WorkflowLimits(disk_full_retry_seconds=0.3),
        )
        with capture_logs() as logs:
            task = asyncio.create_task(daemon.run())
            while not any(e["event"] == "disk_full" for e in logs):
                await asyncio.sleep(0.02)
            assert not [p for p in downloads.rglob("*") if p.is_file()]
            remount = ["mount", "-o", "remount,size=16m", str(downloads)]
            await asyncio.to_thread(subprocess.run, remount, check=True)
            outcome = await asyncio.wait_for(task, 20)
        assert outcome.counts == {State.SAVED: 1}
        (saved,) = [p for p in downloads.rglob("*") if p.is_file()]
        assert saved.read_bytes() == big
        full = [e for e in logs if e["event"] == "disk_full"]
        assert "no space left" in full[0]["error"]


class RefusingCdn(FakeApi):
    """An API whose project stays complete but whose CDN refuses every signed URL (403), or
    whose project disappears once complete (404 on the next GET)."""

    def __init__(self, *, vanish: bool) -> None:
        super().__init__()
        self.vanish = vanish
        self.gets = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == "cdn.test":
            return httpx.Response(403, text="<Error>AccessDenied</Error>")
        self.gets += 1
        if self.vanish and self.gets > 1:
            return httpx.Response(404, json={"message": "Not found"})
        body = project("p1", [f"{CDN}/p1/output-{self.gets}.png"])
        return httpx.Response(200, json=body)


@pytest.mark.parametrize("vanish", [False, True])
async def test_outputs_that_cannot_be_fetched_end_failed_naming_the_cause(
    tmp_path: Path, vanish: bool
) -> None:
    """Fresh URLs that keep being refused, or a project gone before its outputs were saved,
    end in a loud, recorded failed state; nothing is deleted."""
    api = RefusingCdn(vanish=vanish)
    settings = settings_for(tmp_path, "p1", delete_after_download="true")
    store = InMemoryStore()
    daemon = build(settings, store, until_done=True, transport=httpx.MockTransport(api.handler))
    with capture_logs() as logs:
        outcome = await asyncio.wait_for(daemon.run(), 30)
    assert outcome.counts == {State.FAILED: 1}
    assert outcome.exit_code == 1
    record = await store.get("p1")
    assert record is not None
    assert record.failure is not None
    assert ("gone" if vanish else "could not be saved") in record.failure
    (failed,) = [e for e in logs if e["event"] == "project_failed"]
    assert failed["log_level"] == "error"
    assert failed["cause"] == record.failure
    assert not [r for r in api.requests if r.method == "DELETE"]
    assert not list((tmp_path / "downloads").rglob("*.png"))


async def test_payment_required_pauses_polling_with_one_clear_line(tmp_path: Path) -> None:
    """A 402 pauses every poll (one probe at a time) and is logged once, not per project."""
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(402, json={"message": "Payment Required"})

    settings = settings_for(
        tmp_path, " ".join(f"p{i}" for i in range(20)), max_concurrent_requests="1"
    )
    daemon = build(settings, InMemoryStore(), transport=httpx.MockTransport(handler))
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        await asyncio.sleep(1.0)
        daemon.request_stop()
        await asyncio.wait_for(task, 10)
    assert [e["event"] for e in logs].count("api_payment_required") == 1
    assert daemon.health.payment_required
    # The calls already claimed wait out the pause in the client instead of being sent.
    assert len(requests) == 1


async def test_a_project_whose_work_keeps_being_interrupted_is_quarantined(
    tmp_path: Path,
) -> None:
    """Three leases in a row that ran out while held (a poison project that kills replicas)
    set the project aside as quarantined, with the cause, before it is tried again."""
    api = FakeApi()
    api.bodies["p1"] = json.dumps(project("p1", [f"{CDN}/p1/out.png"])).encode()
    store = InMemoryStore()
    start = time.time() - 1000
    await store.track([ProjectRef(Kind.IMAGE, "p1")], now=start, delete_after_download=False)
    for n in range(4):  # the first claim, then three take-overs of a lease that ran out
        await store.claim_due(now=start + 100 * n, limit=1, owner=f"ghost{n}", lease_seconds=10)
    daemon = build(
        settings_for(tmp_path, ""),
        store,
        until_done=True,
        transport=httpx.MockTransport(api.handler),
    )
    with capture_logs() as logs:
        outcome = await asyncio.wait_for(daemon.run(), 10)
    assert outcome.counts == {State.QUARANTINED: 1}
    record = await store.get("p1")
    assert record is not None
    assert record.failure is not None
    assert "interrupted" in record.failure
    assert [e["event"] for e in logs if e.get("project_id") == "p1"] == ["project_quarantined"]
    assert api.requests == []
