"""Fixtures shared by every test suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support import FAST
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio, the loop the daemon uses."""
    return "asyncio"


@pytest.fixture
def serve() -> Iterator[Callable[[SimConfig], SimulatorServer]]:
    """Start simulator servers on 127.0.0.1 (port 0) and stop them after the test."""
    servers: list[SimulatorServer] = []

    def start(config: SimConfig = FAST) -> SimulatorServer:
        server = SimulatorServer(Simulator(config)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
