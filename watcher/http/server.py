"""Serving the control plane: uvicorn inside the daemon's own event loop, as a side task.

This module owns :class:`HttpServer`: the listening socket (bound up front, so a port in use is
a clear start-up error and port 0 works in tests) and the uvicorn server that runs as one of the
daemon's ``side_tasks``. uvicorn installs no signal handlers here (the CLI owns SIGTERM/SIGINT)
and writes no access log (the app logs ``http_request`` through structlog instead). The server
keeps answering while the daemon drains, so ``/readyz`` can say it is shutting down; when the
daemon cancels its side tasks, connections get one second to finish.

Connections are bounded, so that whoever reaches the port cannot use up the process's file
descriptors (which the store, the downloads and the API client need too): a connection must
deliver each request, head and body, within ``WATCHER_HTTP_READ_TIMEOUT`` seconds or it is
closed; beyond ``WATCHER_HTTP_MAX_CONNECTIONS`` (at most a quarter of the descriptor limit),
a new connection replaces one idle for a second or more, or is answered 503 and closed.
Accept errors (``EMFILE`` and the like, which asyncio reports through the loop's exception
handler with a traceback each time) become one JSON warning per burst, as do the connections
shed and uvicorn's complaints about malformed requests.

It also owns :func:`check_settings`, the start-up refusal to listen on a non-loopback address
without ``WATCHER_CONTROL_TOKEN``. The routes are in :mod:`watcher.http.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import logging
import resource
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, ClassVar

import h11
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from watcher.errors import ConfigError
from watcher.http.app import create_app
from watcher.logs import BurstLog
from watcher.settings import configured

if TYPE_CHECKING:
    from watcher.control import Control
    from watcher.metrics import Metrics
    from watcher.settings import Settings
    from watcher.store import Store

log = structlog.get_logger("watcher")

GRACEFUL_SECONDS = 1
STOP_SECONDS = 3.0
EVICT_AFTER_SECONDS = 1.0
# What accept() fails with when the process or the system is out of descriptors or memory.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Request states in which the client still owes us bytes of the request.
RECEIVING = (h11.IDLE, h11.SEND_BODY)


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


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How much of the process the HTTP server's connections may take."""

    max_connections: int
    read_timeout: float

    @property
    def evict_after(self) -> float:
        """How long a connection must have been idle before a newcomer may take its place."""
        return min(EVICT_AFTER_SECONDS, self.read_timeout / 2)

    @classmethod
    def from_settings(
        cls, settings: Settings, descriptor_limit: int | None = None
    ) -> ConnectionLimits:
        """The configured limits, the cap kept within a quarter of ``descriptor_limit`` (default:
        the process's soft ``RLIMIT_NOFILE``)."""
        if descriptor_limit is None:
            descriptor_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = settings.http_max_connections
        if descriptor_limit != resource.RLIM_INFINITY:
            cap = max(1, min(cap, descriptor_limit // 4))
        return cls(cap, settings.http_read_timeout)


def refusal_bytes(status: int, error: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer with a JSON error, sent before any request was read."""
    body = json.dumps({"error": error, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request and a connection cap.

    uvicorn has neither: ``limit_concurrency`` answers 503 only once a request arrives, and
    nothing closes a connection that never sends one. At the cap, a new connection takes the
    place of the longest-idle one (connected or kept alive, no request under way) if that has
    been idle for :attr:`ConnectionLimits.evict_after`, so sockets held open by someone else
    cannot lock a real client out, while a flood of new connections cannot push out clients
    that just connected; otherwise the newcomer is answered 503. :func:`bounded_protocol`
    makes the subclass of one server, carrying its limits, idle connections and burst logs.
    """

    limits: ClassVar[ConnectionLimits]
    idle: ClassVar[dict[BoundedH11Protocol, float]]  # since when (loop time), oldest first
    refused: ClassVar[BurstLog]
    evicted: ClassVar[BurstLog]
    timed_out: ClassVar[BurstLog]
    REFUSAL: ClassVar[bytes] = refusal_bytes(
        503, "too_many_connections", "the server is at its connection limit"
    )

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            self.refused.note(reason="connection_limit", limit=self.limits.max_connections)
            transport.write(self.REFUSAL)
            transport.close()
            return
        self.idle[self] = self.loop.time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        self.idle.pop(self, None)
        super().data_received(data)
        if self.conn.their_state in RECEIVING and not self.transport.is_closing():
            self._arm()  # a request under way (or the next one on a kept-alive connection)
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # closing, or a pipelined request is already under way
        if not self.conn.trailing_data[0]:
            self._disarm()  # idle until the next request: uvicorn's keep-alive timeout applies
            self.idle[self] = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.idle.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def _evict_one(self) -> bool:
        """Close the longest-idle connection to make room; ``False`` if none has been idle for
        long (a client that just connected is about to send its request: under a flood of
        new connections the newcomers are refused instead of pushing real clients out)."""
        victim, since = next(iter(self.idle.items()), (None, 0.0))
        if victim is None or self.loop.time() - since < self.limits.evict_after:
            return False
        del self.idle[victim]
        victim.transport.close()
        self.evicted.note(reason="idle_evicted", limit=self.limits.max_connections)
        return True

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in RECEIVING:
            return
        self.timed_out.note(reason="read_timeout", timeout=self.limits.read_timeout)
        self.transport.close()


def bounded_protocol(limits: ConnectionLimits) -> type[BoundedH11Protocol]:
    """The protocol class of one server with ``limits``."""
    return type(
        "ServerProtocol",
        (BoundedH11Protocol,),
        {
            "limits": limits,
            "idle": {},
            "refused": BurstLog("http_connections_shed"),
            "evicted": BurstLog("http_connections_shed"),
            "timed_out": BurstLog("http_connections_shed"),
        },
    )


class AcceptErrors:
    """The event loop's exception handler while the server runs.

    accept() failing for lack of descriptors or memory is one ``http_accept_failed`` warning
    per burst: asyncio reports it once per queued connection, with a traceback, and retries a
    second later (thousands of lines a second). Anything else goes to the handler it replaced,
    or, if there was none, is one ``event_loop_error`` per burst instead of a plain-text
    traceback on stderr.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.previous = loop.get_exception_handler()
        self.accept_failed = BurstLog("http_accept_failed")
        self.other = BurstLog("event_loop_error", level="error")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS and "socket" in context:
            self.accept_failed.note(
                error=f"{errno.errorcode.get(exc.errno or 0, '?')}: {exc.strerror}"
            )
        elif self.previous is not None:
            self.previous(loop, context)
        else:
            self.other.note(message=str(context.get("message")), exception=repr(exc))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the loop's errors until the block ends, then restore the previous handler."""
        self.loop.set_exception_handler(self)
        try:
            yield
        finally:
            self.loop.set_exception_handler(self.previous)


class UvicornLog(logging.Handler):
    """Where uvicorn's own standard-library log records go while the server runs: its warnings
    (one per malformed request, otherwise plain text on stderr) become one ``http_bad_request``
    warning per burst; its errors are ``http_server_error``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.bad_requests = BurstLog("http_bad_request")

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR:
            self.bad_requests.note(detail=record.getMessage())
        else:
            log.error(
                "http_server_error",
                detail=record.getMessage(),
                exception=repr(record.exc_info[1]) if record.exc_info else None,
            )

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Take uvicorn's records until the block ends."""
        logger = logging.getLogger("uvicorn.error")
        logger.addHandler(self)
        propagate, logger.propagate = logger.propagate, False
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.propagate = propagate


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
        self._protocol: type[BoundedH11Protocol] | None = None

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

    def connection_counts(self) -> tuple[int, int]:
        """(open connections, those of them idle: no request under way)."""
        if self._server is None or self._protocol is None:
            return 0, 0
        return len(self._server.server_state.connections), len(self._protocol.idle)

    @property
    def started(self) -> bool:
        """Whether uvicorn accepts connections."""
        return self._server is not None and self._server.started

    def close(self) -> None:
        """Release the socket. Safe to call twice, and after :meth:`run`."""
        self.state = ServerState.CLOSED
        self._socket.close()

    async def run(self, control: Control, store: Store, metrics: Metrics) -> None:
        """Serve the app of the daemon behind ``control`` until cancelled (a side task)."""
        if self.state is not ServerState.BOUND:
            raise RuntimeError(f"cannot serve an HTTP server that is {self.state.value}")
        self.state = ServerState.SERVING
        limits = ConnectionLimits.from_settings(control.settings)
        self._protocol = bounded_protocol(limits)
        config = uvicorn.Config(
            create_app(control, store, metrics),
            http=self._protocol,
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
            # asyncio accepts up to `backlog` connections per loop turn, each holding a
            # descriptor before the protocol can refuse it: keep that burst to the cap.
            backlog=limits.max_connections,
        )
        self._server = server = _Server(config)
        with AcceptErrors(asyncio.get_running_loop()).installed(), UvicornLog().installed():
            serving = asyncio.create_task(server.serve(sockets=[self._socket]), name="http-server")
            log.info(
                "http_started",
                host=self.host,
                port=self.port,
                max_connections=limits.max_connections,
                read_timeout=limits.read_timeout,
            )
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
