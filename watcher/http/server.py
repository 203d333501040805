"""Serving the control plane: uvicorn inside the daemon's own event loop, as a side task.

This module owns :class:`HttpServer`: the listening socket (bound up front, so a port in use is
a clear start-up error and port 0 works in tests) and the uvicorn server that runs as one of the
daemon's ``side_tasks``. uvicorn installs no signal handlers here (the CLI owns SIGTERM/SIGINT)
and writes no access log (the app logs ``http_request`` through structlog instead). The server
keeps answering while the daemon drains, so ``/readyz`` can say it is shutting down; when the
daemon cancels its side tasks, connections get one second to finish.

It also owns :func:`check_settings`, the start-up refusal to listen on a non-loopback address
without ``WATCHER_CONTROL_TOKEN``. The routes are in :mod:`watcher.http.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog
import uvicorn

from watcher.errors import ConfigError
from watcher.http.app import create_app
from watcher.webhooks import configured

if TYPE_CHECKING:
    from watcher.daemon import Daemon
    from watcher.settings import Settings

log = structlog.get_logger("watcher")

GRACEFUL_SECONDS = 1
STOP_SECONDS = 3.0


def check_settings(settings: Settings) -> None:
    """Refuse (:class:`ConfigError`) to serve a non-loopback address without a control token."""
    if not settings.http_enabled or settings.http_is_loopback:
        return
    if configured(settings.control_token) is None:
        raise ConfigError(
            f"WATCHER_CONTROL_TOKEN: required when WATCHER_HTTP_HOST ({settings.http_host}) is "
            "not a loopback address, or anyone who reaches the port controls the watcher "
            "(or set WATCHER_HTTP_HOST=127.0.0.1)"
        )


class ServerState(enum.Enum):
    """Where an :class:`HttpServer` is in its life; it serves once."""

    BOUND = "bound"
    SERVING = "serving"
    CLOSED = "closed"


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: they would replace the daemon's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The control plane's socket and server. :meth:`bind`, then add :meth:`run` to the
    daemon's ``side_tasks``; :meth:`close` releases the socket if it never served."""

    def __init__(self, sock: socket.socket, host: str) -> None:
        self._socket = sock
        self.host = host
        self.port: int = sock.getsockname()[1]
        self.state = ServerState.BOUND
        self._server: _Server | None = None

    @classmethod
    def bind(cls, host: str, port: int) -> HttpServer:
        """Listen on ``host:port`` now (port 0 picks a free one); :class:`ConfigError` if not."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted
        # sockets whose proto says TCP, and without it every answer waits ~40 ms for an ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"WATCHER_HTTP_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        return cls(sock, host)

    @property
    def url(self) -> str:
        """``http://host:port`` of the server (a wildcard host is shown as loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def started(self) -> bool:
        """Whether uvicorn accepts connections."""
        return self._server is not None and self._server.started

    def close(self) -> None:
        """Release the socket. Safe to call twice, and after :meth:`run`."""
        self.state = ServerState.CLOSED
        self._socket.close()

    async def run(self, daemon: Daemon) -> None:
        """Serve ``daemon``'s app until cancelled (the daemon's side task)."""
        if self.state is not ServerState.BOUND:
            raise RuntimeError(f"cannot serve an HTTP server that is {self.state.value}")
        self.state = ServerState.SERVING
        config = uvicorn.Config(
            create_app(daemon),
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
        )
        self._server = server = _Server(config)
        serving = asyncio.create_task(server.serve(sockets=[self._socket]), name="http-server")
        log.info("http_started", host=self.host, port=self.port)
        try:
            await asyncio.shield(serving)
        finally:
            await self._stop(server, serving)
            self.close()
            log.info("http_stopped")

    async def _stop(self, server: _Server, serving: asyncio.Task[None]) -> None:
        if serving.done():
            return
        server.should_exit = True
        _, pending = await asyncio.wait({serving}, timeout=STOP_SECONDS)
        if pending:
            server.force_exit = True
            serving.cancel()
            await asyncio.wait({serving})
