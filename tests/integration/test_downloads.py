"""Downloads against real servers on 127.0.0.1: the simulator for the API, and a small CDN written
here for what the simulator cannot do (drip bytes, serve names ending in ``.part``)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pytest
from structlog.testing import capture_logs

from tests.integration.http_support import CONTROL_TOKEN, eventually, running
from tests.support import watcher_env, watcher_settings
from watcher.daemon import Daemon, Outcome
from watcher.downloader import Downloader
from watcher.errors import DownloadIncomplete
from watcher.models import Kind, State
from watcher.receive import TransferLimits
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator
from watcher.store import InMemoryStore, SQLiteStore
from watcher.wiring import build

pytestmark = pytest.mark.anyio

DAY = 86_400.0


def one_output(size: int, seed: int = 7) -> SimConfig:
    """A simulator whose image projects finish at once with one output of ``size`` bytes."""
    return SimConfig(
        seed=seed,
        queued_seconds=(0.0, 0.0),
        rendering_seconds=(0.05, 0.05),
        error_rate=0.0,
        cancel_rate=0.0,
        image_outputs=(1, 1),
        output_bytes=(size, size),
    )


@dataclass(frozen=True)
class Plan:
    """How :class:`SlowCdn` answers one request: ``fast`` bytes at once (all of them if
    ``None``), then the rest one byte every ``interval`` seconds."""

    fast: int | None = None
    interval: float = 0.02


class SlowCdn:
    """An HTTP/1.1 server on 127.0.0.1 serving ``body`` at any path, honouring ``Range``; each
    request follows the next plan (then everything at once). Records each request's headers."""

    def __init__(self, body: bytes, plans: list[Plan]) -> None:
        self.body = body
        self.plans = list(plans)
        self.requests: list[dict[str, str]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)
            }
            headers[":path"] = head[0].split()[1]
            self.requests.append(headers)
            plan = self.plans.pop(0) if self.plans else Plan()
            match = re.fullmatch(r"bytes=(\d+)-", headers.get("range", ""))
            start = int(match.group(1)) if match else 0
            data = self.body[start:]
            status = "206 Partial Content" if match else "200 OK"
            extra = f"Content-Range: bytes {start}-{len(self.body) - 1}/{len(self.body)}\r\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Length: {len(data)}\r\n"
                f"{extra if match else ''}Connection: close\r\n\r\n".encode()
            )
            fast = len(data) if plan.fast is None else plan.fast
            writer.write(data[:fast])
            await writer.drain()
            for i in range(fast, len(data)):
                await asyncio.sleep(plan.interval)
                writer.write(data[i : i + 1])
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


class ToCdn(httpx.AsyncBaseTransport):
    """The real network, except that the simulator's download URLs are served by ``cdn``."""

    def __init__(self, cdn: SlowCdn) -> None:
        self._cdn = cdn
        self._network = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/sim/files/"):
            request.url = request.url.copy_with(port=self._cdn.port)
        return await self._network.handle_async_request(request)

    async def aclose(self) -> None:
        await self._network.aclose()


class PartNames(httpx.AsyncBaseTransport):
    """The real simulator, except that every download URL it hands out ends in ``.part`` (the
    API chooses the names; the simulator's are ``output.png`` and the like)."""

    def __init__(self) -> None:
        self._network = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/sim/files/") and path.endswith(".part"):
            request.url = request.url.copy_with(path=path.removesuffix(".part"))
            return await self._network.handle_async_request(request)
        response = await self._network.handle_async_request(request)
        if "-projects/" not in path or request.method != "GET" or response.status_code != 200:
            return response
        body = json.loads(await response.aread())
        await response.aclose()
        for link in body.get("downloads") or []:
            url = httpx.URL(link["url"])
            link["url"] = str(url.copy_with(path=url.path + ".part"))
        return httpx.Response(200, json=body)

    async def aclose(self) -> None:
        await self._network.aclose()


async def run_daemon(daemon: Daemon, limit: float = 20) -> Outcome:
    return await asyncio.wait_for(daemon.run(), limit)


# --- slow-drip transfers are bounded ------------------------------------------------------------


async def test_a_slow_drip_is_cut_and_resumed_with_range(serve: Any, tmp_path: Path) -> None:
    """A CDN that sends a burst, then one byte at a time, stays under the read timeout; the
    minimum rate cuts it, the slot is freed, and the next try resumes with Range."""
    server: SimulatorServer = serve(one_output(200_000))
    (pid,) = server.simulator.create_projects(Kind.IMAGE, 1)
    body = server.simulator.expected_bytes(pid, 0)
    settings = watcher_settings(
        server,
        tmp_path,
        projects=pid,
        max_concurrent_downloads="1",
        download_min_rate="2000",
        download_rate_window="0.5",
    )
    async with SlowCdn(body, [Plan(fast=50_000)]) as cdn:
        with capture_logs() as logs:
            daemon = build(settings, InMemoryStore(), until_done=True, transport=ToCdn(cdn))
            outcome = await run_daemon(daemon)
    assert outcome.counts == {State.SAVED: 1}
    first, second = cdn.requests
    assert "range" not in first
    resumed = int(second["range"].removeprefix("bytes=").removesuffix("-"))
    assert resumed >= 50_000
    (saved,) = (tmp_path / "downloads" / "image" / pid).iterdir()
    assert saved.read_bytes() == body
    (retry,) = [e for e in logs if e["event"] == "project_retry_scheduled"]
    assert "fewer than 1000 bytes arrived in 0.5 s" in retry["cause"]
    (done,) = [e for e in logs if e["event"] == "download_saved"]
    assert done["resumed_from"] == resumed
    assert "authorization" not in first
    assert "authorization" not in second


async def test_a_transfer_past_its_deadline_is_cut_and_resumed(tmp_path: Path) -> None:
    """However steadily bytes arrive, a transfer that outlives its deadline is cut, keeps its
    bytes, and the next try resumes from them."""
    body = hashlib.sha256(b"deadline").digest() * 2_000
    final = tmp_path / "image" / "cm1" / "0-output.png"
    limits = TransferLimits(min_rate=0, max_seconds=0.5)
    recorded: list[tuple[int, str]] = []

    async def on_verified(size: int, sha256: str) -> None:
        recorded.append((size, sha256))

    cdn = SlowCdn(body, [Plan(fast=1_000, interval=0.01)])
    async with cdn, httpx.AsyncClient() as http:
        downloader = Downloader(http, limits=limits)
        url = f"http://127.0.0.1:{cdn.port}/files/output.png"
        with pytest.raises(DownloadIncomplete, match=r"did not finish within 0\.5 s"):
            await asyncio.wait_for(downloader.fetch(url, final, on_verified), 10)
        kept = next(final.parent.glob("*.part")).stat().st_size
        assert kept >= 1_000
        saved = await downloader.fetch(url, final, on_verified)
    assert cdn.requests[1]["range"] == f"bytes={kept}-"
    assert saved.resumed_from == kept
    assert final.read_bytes() == body
    assert recorded == [(len(body), hashlib.sha256(body).hexdigest())]


# --- progress while a long download runs ----------------------------------------------------------


async def test_a_running_download_shows_its_progress(serve: Any, tmp_path: Path) -> None:
    """While an output downloads, its bytes are counted in the metric, logged as progress, and
    shown by the API and by ``watcher status`` (another process, reading the store and disk)."""
    server: SimulatorServer = serve(one_output(2_000_000))
    (pid,) = server.simulator.create_projects(Kind.IMAGE, 1)
    body = server.simulator.expected_bytes(pid, 0)
    extra = {
        "projects": pid,
        "download_min_rate": "0",
        "download_progress_seconds": "0.1",
        "shutdown_grace": "0",
        "control_token": CONTROL_TOKEN,
    }
    settings = watcher_settings(server, tmp_path, **extra)
    store = SQLiteStore(str(tmp_path / "watcher.db"), exclusive=True)
    async with SlowCdn(body, [Plan(fast=300_000, interval=0.01)]) as cdn:
        with capture_logs() as logs:
            daemon = build(settings, store, transport=ToCdn(cdn))

            def counted() -> float:
                value = daemon.metrics.registry.get_sample_value("watcher_download_bytes_total")
                return value or 0.0

            def progress() -> list[dict[str, Any]]:
                return [
                    dict(e)
                    for e in logs
                    if e["event"] == "download_progress" and e["bytes"] >= 300_000
                ]

            async with running(daemon) as run:
                await eventually(lambda: counted() >= 300_000 and progress())
                shown = (await run.client.get(f"/v1/projects/{pid}")).json()
                doc = await status_json(watcher_env(server, tmp_path, **extra))
                table = await status_table(watcher_env(server, tmp_path, **extra))
    assert counted() < len(body)  # counted as it streams, before the file is whole
    event = progress()[0]
    assert event["total"] == len(body)
    assert event["path"].endswith(f"image/{pid}/0-output.png")
    for project in (shown, doc["projects"][0]):
        (output,) = project["outputs"]
        assert output["state"] == "pending"
        assert output["bytes"] is None
        assert output["bytes_received"] >= 300_000
    assert re.search(r"0/1 \+\d+\.\d KiB", table), table


async def status_json(env: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(await run_watcher(["status", "--json"], env))
    return doc


async def status_table(env: dict[str, str]) -> str:
    return await run_watcher(["status"], env)


async def run_watcher(args: list[str], env: dict[str, str]) -> str:
    """Run ``watcher`` in a subprocess (while this loop keeps the daemon running)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "watcher",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode()


# --- an output whose name ends in .part -------------------------------------------------------


async def test_an_output_named_part_survives_its_projects_clean_up(
    serve: Any, tmp_path: Path
) -> None:
    """An output whose URL ends in ``.part`` is saved, and stays after the project's clean-up
    of temporary files, which runs after the DELETE: it would be gone from both places."""
    server: SimulatorServer = serve(one_output(30_000))
    (pid,) = server.simulator.create_projects(Kind.IMAGE, 1)
    settings = watcher_settings(server, tmp_path, projects=pid, delete_after_download="true")
    daemon = build(settings, InMemoryStore(), until_done=True, transport=PartNames())
    outcome = await run_daemon(daemon)
    assert outcome.counts == {State.DELETED: 1}
    saved = tmp_path / "downloads" / "image" / pid / "0-output.png.part"
    assert saved.read_bytes() == server.simulator.expected_bytes(pid, 0)


async def test_start_up_removes_temporary_files_but_never_an_output(
    serve: Any, tmp_path: Path
) -> None:
    """At start-up, an output named ``….part`` stays; this version's temporary files go; an
    earlier version's (``<name>.part``) go only where the store knows the project and does not
    record that path as an output."""
    server: SimulatorServer = serve(one_output(30_000))
    (pid,) = server.simulator.create_projects(Kind.IMAGE, 1)
    settings = watcher_settings(server, tmp_path, projects=pid)
    db = str(tmp_path / "watcher.db")
    outcome = await run_daemon(
        build(settings, SQLiteStore(db, exclusive=True), until_done=True, transport=PartNames())
    )
    assert outcome.counts == {State.SAVED: 1}
    folder = tmp_path / "downloads" / "image" / pid
    saved = folder / "0-output.png.part"
    expected = server.simulator.expected_bytes(pid, 0)
    assert saved.read_bytes() == expected
    stranger = tmp_path / "downloads" / "image" / "cmnottracked"
    stranger.mkdir()
    leftovers = [
        folder / ".0-output.png.part.part",  # this version's temporary file
        folder / "1-output.png.part",  # an earlier version's, of no recorded output
        stranger / ".0-x.png.part",  # this version's, in the folder of no tracked project
    ]
    unknown = stranger / "0-x.png.part"  # an earlier version's name: maybe someone's output
    for path in [*leftovers, unknown]:
        path.write_bytes(b"leftover")

    with capture_logs() as logs:
        outcome = await run_daemon(
            build(settings, SQLiteStore(db, exclusive=True), until_done=True)
        )
    assert outcome.counts == {State.SAVED: 1}
    assert saved.read_bytes() == expected
    assert unknown.exists()
    assert not [path for path in leftovers if path.exists()]
    (started,) = [e for e in logs if e["event"] == "daemon_started"]
    assert started["parts_removed"] == len(leftovers)


# --- a URL whose expires_at looks past ----------------------------------------------------------


async def test_a_url_that_looks_expired_is_still_tried(serve: Any, tmp_path: Path) -> None:
    """With the API's clock two days behind ours, every ``expires_at`` looks past; the CDN still
    serves the URL, so the output is saved from the first GET's link, with no refresh."""

    def behind() -> float:
        return time.time() - 2 * DAY

    server = SimulatorServer(Simulator(one_output(20_000), clock=behind)).start()
    try:
        (pid,) = server.simulator.create_projects(Kind.IMAGE, 1)
        settings = watcher_settings(server, tmp_path, projects=pid)
        with capture_logs() as logs:
            outcome = await run_daemon(build(settings, InMemoryStore(), until_done=True), 15)
        gets = [e for e in server.simulator.events() if e.what == "get"]
        downloads = [e for e in server.simulator.events() if e.what == "download"]
    finally:
        server.stop()
    assert outcome.counts == {State.SAVED: 1}
    events = {e["event"] for e in logs}
    assert "download_url_stale" not in events
    assert "download_urls_refreshed" not in events
    assert len(downloads) == 1
    assert all(e.status_code == 200 for e in gets)
