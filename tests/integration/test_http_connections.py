"""Connections that never finish a request, over real TCP on 127.0.0.1: they are closed after
``WATCHER_HTTP_READ_TIMEOUT``, the ones beyond ``WATCHER_HTTP_MAX_CONNECTIONS`` are answered 503
at once, and the server keeps answering real requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.integration.http_support import running
from tests.integration.test_http_api import QUIET, make_daemon
from watcher.simulator.server import SimulatorServer

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]
CAP = 6


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), 15)


async def test_idle_and_slow_connections_are_closed(serve: Serve, tmp_path: Path) -> None:
    """Sockets that send nothing, half a request head, or a head without its body are closed by
    the server; those beyond the cap get a JSON 503 at once; then a request is answered."""
    daemon = make_daemon(
        serve(QUIET),
        tmp_path,
        control_token="",  # so that the POST waits for its body
        http_max_connections=str(CAP),
        http_read_timeout="0.5",
    )
    with capture_logs() as logs:
        async with running(daemon) as run:
            port = run.server.port
            opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
            # Beyond the cap: refused while the others are still idle.
            extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            refusals = [await until_closed(reader) for reader, _ in extra]
            half_head, no_body = opened[0][1], opened[1][1]
            half_head.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            no_body.write(
                b"POST /v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"content-type: application/json\r\ncontent-length: 40\r\n\r\n{"
            )
            leftovers = [await until_closed(reader) for reader, _ in opened]
            for _, writer in opened + extra:
                writer.close()
            health = await run.client.get("/healthz")
    assert all(r.startswith(b"HTTP/1.1 503 ") for r in refusals), refusals
    assert all(b'"too_many_connections"' in r for r in refusals)
    assert leftovers == [b""] * CAP  # closed without an answer
    assert health.status_code == 200
    shed = [e for e in logs if e["event"] == "http_connections_shed"]
    assert {e["reason"] for e in shed} == {"connection_limit", "read_timeout"}
    assert len(shed) == 2  # one line per burst, not one per connection


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
