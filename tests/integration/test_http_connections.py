"""Connections that never finish a request, over real TCP on 127.0.0.1: they are closed after
``WATCHER_HTTP_READ_TIMEOUT``, the ones beyond ``WATCHER_HTTP_MAX_CONNECTIONS`` are answered 503
at once, and the server keeps answering real requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from tests.integration.http_support import eventually, running
from tests.integration.test_http_api import QUIET, make_daemon
from watcher.daemon import Daemon
from watcher.simulator.server import SimulatorServer

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]
CAP = 6


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), 15)


def daemon_with_cap(serve: Serve, tmp_path: Path) -> Daemon:
    """A token-less daemon (so that a POST waits for its body) with a small cap."""
    return make_daemon(
        serve(QUIET),
        tmp_path,
        control_token="",
        http_max_connections=str(CAP),
        http_read_timeout="0.5",
    )


async def test_idle_and_slow_connections_are_closed(serve: Serve, tmp_path: Path) -> None:
    """Sockets that send nothing, half a request head, or a head without its body are closed by
    the server without an answer, and the server goes on answering requests."""
    with capture_logs() as logs:
        async with running(daemon_with_cap(serve, tmp_path)) as run:
            port = run.server.port
            opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
            half_head, no_body = opened[0][1], opened[1][1]
            half_head.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            no_body.write(
                b"POST /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"content-type: application/json\r\ncontent-length: 40\r\n\r\n{"
            )
            leftovers = [await until_closed(reader) for reader, _ in opened]
            for _, writer in opened:
                writer.close()
            health = await run.client.get("/healthz")
    assert leftovers == [b""] * CAP
    assert health.status_code == 200
    shed = [e for e in logs if e["event"] == "http_connections_shed"]
    assert [(e["reason"], e["occurrences"]) for e in shed] == [("read_timeout", 1)]


async def test_idle_sockets_at_the_cap_cannot_lock_a_client_out(
    serve: Serve, tmp_path: Path
) -> None:
    """With the cap filled by sockets idle for a while, a real request takes the place of the
    oldest one; with the cap filled by requests under way, a new connection gets a JSON 503."""
    daemon = make_daemon(
        serve(QUIET), tmp_path, http_max_connections=str(CAP), http_read_timeout="30"
    )
    with capture_logs() as logs:
        async with running(daemon) as run:
            port = run.server.port
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]

            async def healthz() -> bool:
                # A fresh connection each time: refused (503) until the idle ones are old enough.
                async with httpx.AsyncClient(base_url=run.server.url) as client:
                    return (await client.get("/healthz")).status_code == 200

            await eventually(healthz)
            evicted = await until_closed(idle[0][0])
            for _, writer in idle:
                writer.close()
            busy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
            for _, writer in busy:
                writer.write(b"GET /healthz HTTP/1.1\r\n")
                await writer.drain()
            await eventually(lambda: run.server.connection_counts() == (CAP, 0))
            extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
            refusal = await until_closed(extra_reader)
            extra_writer.close()
            for _, writer in busy:
                writer.close()
    assert evicted == b""
    assert refusal.startswith(b"HTTP/1.1 503 ")
    assert b'"too_many_connections"' in refusal
    shed = [e["reason"] for e in logs if e["event"] == "http_connections_shed"]
    assert {"idle_evicted", "connection_limit"} <= set(shed)
    assert "read_timeout" not in shed  # evicted, not timed out


async def test_a_kept_alive_connection_serves_request_after_request(
    serve: Serve, tmp_path: Path
) -> None:
    """The read deadline is per request: a client that keeps its connection and sends one
    request after another is served each time."""
    daemon = make_daemon(serve(QUIET), tmp_path, http_read_timeout="0.5")
    async with running(daemon) as run:
        reader, writer = await asyncio.open_connection("127.0.0.1", run.server.port)
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            await asyncio.wait_for(reader.readexactly(len(b'{"status":"ok"}')), 10)
        writer.close()


async def test_malformed_http_is_one_json_warning(serve: Serve, tmp_path: Path) -> None:
    """Garbage on the port gets uvicorn's 400, and its complaint is one ``http_bad_request``
    event for the burst instead of a plain-text line per request on stderr."""
    with capture_logs() as logs:
        async with running(make_daemon(serve(QUIET), tmp_path)) as run:
            answers = []
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", run.server.port)
                writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                answers.append(await until_closed(reader))
                writer.close()
    assert all(a.startswith(b"HTTP/1.1 400 ") for a in answers)
    bad = [e for e in logs if e["event"] == "http_bad_request"]
    assert [(e["occurrences"], e["detail"]) for e in bad] == [(1, "Invalid HTTP request received.")]
