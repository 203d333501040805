"""Serving a simulator over real HTTP from a background thread, for tests and the CLI.

This module owns :class:`SimulatorServer`: it binds a socket (port 0 picks a free one), runs
uvicorn on its own event loop in a daemon thread and stops it quickly; with a ``webhook_url``
configured it also delivers the simulator's webhook events (:mod:`watcher.simulator.hooks`).
It installs no signal handlers and leaves logging configuration alone, so it can run many
times in one process.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import threading
import time
from typing import Self

import uvicorn

from watcher.simulator.app import create_app
from watcher.simulator.hooks import WebhookSender
from watcher.simulator.state import Simulator

_STARTUP_TIMEOUT = 10.0
_TICK = 0.02


class _QuickServer(uvicorn.Server):
    """uvicorn, checking for the exit flag every 20 ms instead of every 100 ms."""

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            await asyncio.sleep(_TICK)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket.

    The protocol is given explicitly: asyncio sets ``TCP_NODELAY`` only on sockets whose
    ``proto`` is TCP, and without it every response waits ~40 ms for a delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class ServerState(enum.Enum):
    """Where a :class:`SimulatorServer` is in its life; it is used once."""

    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


class SimulatorServer:
    """A :class:`Simulator` served by uvicorn on ``host:port`` in a background thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (safe to call twice).
    """

    def __init__(
        self,
        simulator: Simulator | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        graceful_timeout: int = 1,
    ) -> None:
        self.simulator = simulator or Simulator()
        self.state = ServerState.UNOPENED
        self._host, self._port = host, port
        self._graceful_timeout = graceful_timeout
        self._socket: socket.socket | None = None
        self._bound_port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._hooks: WebhookSender | None = None

    @property
    def port(self) -> int:
        """The port the server listens on (known once started)."""
        if self._bound_port is None:
            raise RuntimeError("the simulator server is not started")
        return self._bound_port

    @property
    def base_url(self) -> str:
        """``http://host:port``, without a trailing slash."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def start(self) -> Self:
        """Bind, start serving in a thread and wait until requests are accepted."""
        if self.state is not ServerState.UNOPENED:
            raise RuntimeError(f"cannot start a simulator server that is {self.state.value}")
        self._socket = _bind(self._host, self._port)
        self._bound_port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.simulator),
            http="h11",
            ws="none",
            lifespan="off",
            loop="asyncio",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=self._graceful_timeout,
        )
        self._server = _QuickServer(config)
        self._thread = threading.Thread(target=self._run, name="simulator-server", daemon=True)
        self.state = ServerState.RUNNING
        self._thread.start()
        self._wait_started()
        if self.simulator.config.webhook_url is not None:  # events about this server's URLs
            self._hooks = WebhookSender(self.simulator, self.base_url)
            self._hooks.start()
        return self

    def _run(self) -> None:
        assert self._server is not None  # noqa: S101 - set by start() before the thread runs
        assert self._socket is not None  # noqa: S101
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # noqa: BLE001 - reported to the thread that waits
            self._failure = exc

    def _wait_started(self) -> None:
        assert self._server is not None  # noqa: S101
        assert self._thread is not None  # noqa: S101
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the simulator server failed to start") from self._failure
            time.sleep(0.005)

    def stop(self) -> None:
        """Stop serving and release the port; in-flight downloads get ``graceful_timeout``."""
        if self.state is not ServerState.RUNNING:
            self.state = ServerState.CLOSED
            return
        self.state = ServerState.CLOSED
        if self._hooks is not None:
            self._hooks.stop()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(self._graceful_timeout + 5.0)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5.0)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
