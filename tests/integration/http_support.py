"""Helpers of the control-plane tests: an in-process daemon serving HTTP on 127.0.0.1, and a
signature-checking receiver of notifications."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import http.server
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from watcher.daemon import Daemon, Outcome
from watcher.http.server import HttpServer

CONTROL_TOKEN = "control-token-for-tests"
# Loading the CA bundle takes tens of milliseconds; the test clients speak plain HTTP anyway.
TLS = ssl.create_default_context()
SideTask = Callable[[], Coroutine[object, object, None]]


@dataclass
class Running:
    """A daemon running in this event loop, with its HTTP server and a client of it."""

    daemon: Daemon
    server: HttpServer
    client: httpx.AsyncClient
    task: asyncio.Task[Outcome]

    async def stop(self) -> Outcome:
        """Stop the daemon gracefully and return how it ended."""
        self.daemon.request_stop()
        return await asyncio.wait_for(self.task, 20)


@asynccontextmanager
async def running(daemon: Daemon, *side_tasks: SideTask, port: int = 0) -> AsyncIterator[Running]:
    """Run ``daemon`` with an HTTP server on ``port`` (0: a free one) of 127.0.0.1 (and
    ``side_tasks``)."""
    server = HttpServer.bind("127.0.0.1", port)
    serve = functools.partial(server.run, daemon, daemon.store, daemon.metrics)
    daemon.side_tasks.extend([serve, *side_tasks])
    task = asyncio.create_task(daemon.run())
    started = asyncio.create_task(daemon.started.wait())
    await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done() or not started.done():
        started.cancel()
        server.close()
        await task  # raises what stopped it
        raise RuntimeError("the daemon did not start")
    headers = {"authorization": f"Bearer {CONTROL_TOKEN}"}
    client = httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10, verify=TLS)
    run = Running(daemon, server, client, task)
    try:
        async with client:
            yield run
    finally:
        if not task.done():  # stopped after the client closed: no keep-alive to wait for
            await run.stop()


async def eventually(check: Callable[[], Any], within: float = 10, step: float = 0.02) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(step)


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, read and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Receiver:
    """A notification receiver on 127.0.0.1:``port`` that checks signatures on its own (with
    ``hmac``, not the watcher's code) and keeps every event it accepted."""

    port: int
    secret: str
    events: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0
    _server: http.server.ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where the watcher should POST."""
        return f"http://127.0.0.1:{self.port}/hooks/watcher"

    def start(self) -> Receiver:
        """Listen and serve in a thread."""
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                stamp = self.headers.get("magic-hour-event-timestamp", "")
                expected = hmac.new(
                    receiver.secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256
                ).hexdigest()
                given = self.headers.get("magic-hour-event-signature", "")
                if self.path == "/hooks/watcher" and hmac.compare_digest(expected, given):
                    receiver.events.append(json.loads(body))
                    self.send_response(200)
                else:
                    receiver.refused += 1
                    self.send_response(401)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
