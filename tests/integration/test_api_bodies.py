"""Hostile API answers, from a misbehaving server on 127.0.0.1 the simulator cannot imitate:
JSON nested 50,000 deep, dates no timestamp holds, HTML, a refused port, TLS spoken to plain
http, and requests that cannot be sent. Each ends as a clear note or final state, never a crash;
a project whose work does crash is quarantined naming the exception."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from structlog.testing import capture_logs

from tests.support import api_client
from watcher.api import MAX_BODY_BYTES
from watcher.daemon import Daemon
from watcher.errors import InvalidRequest, TransientApiError
from watcher.models import Kind, ProjectRef, State
from watcher.settings import Settings, load_settings
from watcher.store import InMemoryStore, SQLiteStore, Store
from watcher.transport import http_client
from watcher.wiring import build

pytestmark = pytest.mark.anyio

TOKEN = "mhk_live_HostileTestToken0042"
DEEP = b"[" * 50_000 + b"]" * 50_000
Answer = tuple[int, str, bytes]


def project(pid: str, status: str = "rendering", **extra: Any) -> bytes:
    body = {"id": pid, "name": None, "status": status, "type": "AI_IMAGE", "enabled": True}
    body.update({"downloads": [], "error": None} | extra)
    return json.dumps(body).encode()


class HostileApi:
    """A bare HTTP/1.1 server: each path answers with a scripted (status, content type, body);
    every request line is recorded. One request per connection."""

    def __init__(self, answers: dict[str, Answer], headers: dict[str, str] | None = None) -> None:
        self.answers = answers
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.requests: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.readexactly(1)
            if not first.isalpha():  # a TLS hello: answer as any plain-http server would
                writer.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
                await writer.drain()
                return
            head = first + await reader.readuntil(b"\r\n\r\n")
            method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            self.requests.append(f"{method} {path}")
            code, ctype, body = self.answers.get(path, (404, "application/json", b"{}"))
            writer.write(
                f"HTTP/1.1 {code} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                f"{self.headers}connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def settings_for(api: HostileApi, root: Path, projects: str, **extra: str) -> Settings:
    env = {
        "WATCHER_API_TOKEN": TOKEN,
        "WATCHER_API_BASE_URL": api.url,
        "WATCHER_PROJECTS": projects,
        "WATCHER_DATABASE_URL": f"sqlite:///{root / 'watcher.db'}",
        "WATCHER_DOWNLOAD_DIR": str(root / "downloads"),
        "WATCHER_POLL_INITIAL": "0.05",
        "WATCHER_POLL_MAX": "0.2",
        "WATCHER_MAX_REQUESTS_PER_SECOND": "1000",
        "WATCHER_HTTP_ENABLED": "false",
    }
    env.update({f"WATCHER_{k.upper()}": v for k, v in extra.items()})
    return load_settings(env)


@asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.started.wait(), 10)
        yield task
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 10)


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for ``check`` (an event, not a duration: the bound only turns a hang into a failure)."""
    async with asyncio.timeout(20):
        while not await check():
            await asyncio.sleep(0.02)


async def test_hostile_bodies_end_as_clear_notes_and_final_states(tmp_path: Path) -> None:
    """Deep JSON in a 200 and a 404, a year-1 expires_at and an HTML page: no crash; the 404 is
    not_found, the others carry a note saying why, in the store and in ``watcher status``; a
    healthy project beside them is saved."""
    api_paths = "/v1/image-projects"
    year1 = [{"url": "http://127.0.0.1:1/f.png", "expires_at": "0001-01-01T00:00:00"}]
    answers: dict[str, Answer] = {
        f"{api_paths}/deep200": (200, "application/json", DEEP),
        f"{api_paths}/deep404": (404, "application/json", DEEP),
        f"{api_paths}/year1": (
            200,
            "application/json",
            project("year1", "complete", downloads=year1),
        ),
        f"{api_paths}/html": (200, "text/html", b"<html><body>Sign in</body></html>"),
        "/files/good.png": (200, "image/png", b"\x89PNG good"),
    }
    async with HostileApi(answers) as api:
        good = [{"url": f"{api.url}/files/good.png", "expires_at": "2999-01-01T00:00:00Z"}]
        answers[f"{api_paths}/good"] = (
            200,
            "application/json",
            project("good", "complete", downloads=good),
        )
        settings = settings_for(api, tmp_path, "deep200 deep404 year1 html good")
        store = SQLiteStore(str(tmp_path / "watcher.db"), exclusive=True)
        daemon = build(settings, store)
        expected = {
            "deep200": "JSON nested too deeply",
            "year1": "downloads.0.expires_at: a date out of range: 0001-01-01T00:00:00",
            "html": "text/html: not JSON",
        }

        async def settled() -> bool:
            records = {pid: await store.get(pid) for pid in [*expected, "deep404", "good"]}
            return (
                all(r is not None for r in records.values())
                and all((records[pid].failure or "") != "" for pid in expected)  # type: ignore[union-attr]
                and records["deep404"].state == State.NOT_FOUND  # type: ignore[union-attr]
                and records["good"].state == State.SAVED  # type: ignore[union-attr]
            )

        with capture_logs() as logs:
            async with running(daemon):
                await until(settled, "every project has a note or a final state")
    assert not [e for e in logs if e["event"] == "project_crashed"]
    env = {**os.environ, "WATCHER_DATABASE_URL": f"sqlite:///{tmp_path / 'watcher.db'}"}
    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "watcher", "status", "--json"],
        env=env,
        capture_output=True,
        check=True,
        timeout=30,
    )
    shown = {p["id"]: p for p in json.loads(status.stdout)["projects"]}
    for pid, reason in expected.items():
        assert shown[pid]["state"] == "polling"
        assert reason in shown[pid]["failure"], shown[pid]["failure"]
        assert len(shown[pid]["failure"]) < 400
    assert shown["deep404"]["state"] == "not_found"
    assert "[[[[" in shown["deep404"]["failure"]
    assert shown["good"]["state"] == "saved"
    [saved] = (tmp_path / "downloads").rglob("*.png")
    assert saved.read_bytes() == b"\x89PNG good"


class BuggyStore(InMemoryStore):
    """A store whose poll write hits a bug: every poll of a rendering project crashes."""

    async def record_poll(self, *args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug, for the test")


async def test_a_crashing_project_is_quarantined_naming_the_exception(tmp_path: Path) -> None:
    """Each crash is noted on the project with its exception; the third in a row quarantines it
    with that cause, instead of "interrupted (a replica died)" after leases run out."""
    answers = {"/v1/image-projects/p1": (200, "application/json", project("p1"))}
    async with HostileApi(answers) as api:
        store: Store = BuggyStore()
        # A lease of 1 s (the old code would quarantine, blaming a dead replica).
        settings = settings_for(api, tmp_path, "p1").model_copy(update={"lease_seconds": 1.0})
        daemon = build(settings, store, until_done=True)
        with capture_logs() as logs:
            outcome = await asyncio.wait_for(daemon.run(), 20)
    assert outcome.counts == {State.QUARANTINED: 1}
    record = await store.get("p1")
    assert record is not None
    assert record.failure == (
        "quarantined after 3 crashes in a row: ZeroDivisionError: a bug, for the test"
    )
    assert [e["event"] for e in logs].count("project_crashed") == 3
    notes = [e["cause"] for e in logs if e["event"] == "project_retry_scheduled"]
    assert notes == [
        f"crashed ({n}x in a row): ZeroDivisionError: a bug, for the test" for n in (1, 2)
    ]


async def test_an_interruption_quarantine_names_the_last_failure(tmp_path: Path) -> None:
    """A project whose leases kept running out is quarantined with the note it carried."""
    store = InMemoryStore()
    await store.track([ProjectRef(Kind.IMAGE, "p1")], now=1000, delete_after_download=False)
    [claim] = await store.claim_due(now=1000, limit=1, owner="ghost0", lease_seconds=10)
    await store.record_retry(
        claim,
        now=1000,
        due_at=1000,
        failure="crashed (1x in a row): MemoryError",
        count_failure=True,
    )
    for n in range(1, 5):  # a claim, then three take-overs of a lease that ran out
        await store.claim_due(now=1000 + 100 * n, limit=1, owner=f"ghost{n}", lease_seconds=10)
    async with HostileApi({}) as api:
        daemon = build(settings_for(api, tmp_path, ""), store, until_done=True)
        outcome = await asyncio.wait_for(daemon.run(), 10)
        assert api.requests == []
    assert outcome.counts == {State.QUARANTINED: 1}
    record = await store.get("p1")
    assert record is not None
    assert record.failure is not None
    assert "interrupted 3 times" in record.failure
    assert record.failure.endswith("the last failure recorded: crashed (1x in a row): MemoryError")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connection_errors_name_the_host_and_the_cause() -> None:
    """A refused port and https spoken to a plain-http server say so, with host and port, and
    nothing of the path or the token."""
    ref = ProjectRef(Kind.IMAGE, "p1")
    refused = free_port()
    async with HostileApi({}) as api, httpx.AsyncClient() as http:
        for base, message in [
            (f"http://127.0.0.1:{refused}", f"connection refused by 127.0.0.1:{refused}"),
            (
                f"https://127.0.0.1:{api.port}",
                f"TLS handshake failed with 127.0.0.1:{api.port} (is it plain http?)",
            ),
        ]:
            with pytest.raises(TransientApiError) as caught:
                await api_client(http, base, TOKEN).get_project(ref)
            assert str(caught.value) == f"GET image:p1: {message}"
            assert caught.value.cause == "network"


async def test_a_gzip_encoded_project_is_decoded_and_capped_once_decoded(tmp_path: Path) -> None:
    """Through the watcher's own HTTP client, a project sent gzip-encoded is read decoded; one
    whose decoded body passes the cap is refused, though its encoded bytes are few."""
    padding = " " * (MAX_BODY_BYTES + 1)
    answers: dict[str, Answer] = {
        "/v1/image-projects/small": (200, "application/json", gzip.compress(project("small"))),
        "/v1/image-projects/bomb": (
            200,
            "application/json",
            gzip.compress(project("bomb")[:-1] + padding.encode() + b"}"),
        ),
    }
    settings = settings_for(HostileApi({}), tmp_path, "small")
    gzipped = {"content-encoding": "gzip"}
    async with HostileApi(answers, gzipped) as api, http_client(settings) as http:
        client = api_client(http, api.url, TOKEN)
        snapshot = await client.get_project(ProjectRef(Kind.IMAGE, "small"))
        with pytest.raises(TransientApiError) as caught:
            await client.get_project(ProjectRef(Kind.IMAGE, "bomb"))
    assert snapshot.id == "small"
    assert snapshot.status.value == "rendering"
    assert len(answers["/v1/image-projects/bomb"][2]) < MAX_BODY_BYTES // 100
    assert caught.value.cause == "body_too_large"


async def test_a_lone_surrogate_in_a_project_is_read_as_before(tmp_path: Path) -> None:
    """A project whose name escapes a lone surrogate (which pydantic's JSON parser refuses and
    ``json`` accepts) is still a project, not a bad body."""
    body = project("odd", name="\ud800")
    assert b"\\ud800" in body
    answers: dict[str, Answer] = {"/v1/image-projects/odd": (200, "application/json", body)}
    settings = settings_for(HostileApi({}), tmp_path, "odd")
    async with HostileApi(answers) as api, http_client(settings) as http:
        snapshot = await api_client(http, api.url, TOKEN).get_project(ProjectRef(Kind.IMAGE, "odd"))
    assert snapshot.id == "odd"


@pytest.mark.parametrize("token", [TOKEN + "\n", TOKEN + "é"])
async def test_a_token_no_request_can_carry_sends_nothing(token: str) -> None:
    """A token with a trailing newline or a non-ASCII character is not sent and not retried."""
    async with HostileApi({}) as api, httpx.AsyncClient() as http:
        with pytest.raises(InvalidRequest, match="WATCHER_API_TOKEN") as caught:
            await api_client(http, api.url, token).get_project(ProjectRef(Kind.IMAGE, "p1"))
        assert api.requests == []
    assert TOKEN not in str(caught.value)


async def test_a_request_that_cannot_be_sent_stops_polling_with_one_line(tmp_path: Path) -> None:
    """When no request can be sent (here a non-ASCII replica id in the User-Agent) the daemon
    logs it once, notes it on every project, sends nothing and exits as for a refused token."""
    async with HostileApi({}) as api:
        ids = [f"p{i}" for i in range(10)]
        settings = settings_for(api, tmp_path, " ".join(ids), replica_id="réplica")
        store = SQLiteStore(str(tmp_path / "watcher.db"), exclusive=True)
        daemon = build(settings, store, until_done=True)
        with capture_logs() as logs:
            outcome = await asyncio.wait_for(daemon.run(), 10)
        assert api.requests == []
    assert outcome.exit_code == 3
    events = [e for e in logs if e["event"] == "api_request_invalid"]
    assert len(events) == 1
    assert "WATCHER_REPLICA_ID" in events[0]["error"]
    async with store:
        for pid in ids:
            record = await store.get(pid)
            assert record is not None
            assert record.state == State.POLLING
            assert "WATCHER_REPLICA_ID" in (record.failure or "")
