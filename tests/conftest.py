"""Fixtures shared by every test suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests import pg, s3
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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[s3.S3Server]:
    """moto's S3 server on 127.0.0.1 (a free port), for the session."""
    server = s3.start()
    yield server
    server.server.stop()


@pytest.fixture
def s3_env(s3_server: s3.S3Server, monkeypatch: pytest.MonkeyPatch) -> s3.S3Server:
    """The standard AWS variables of this process pointing at moto (for in-process stores)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """The name of a database migrated once per session, which per-test databases copy."""
    name = pg.unique_name("watcher_template")
    pg.create_database(name)
    try:
        pg.migrate(pg.database_url(name))
        yield name
    finally:
        pg.drop_database(name)


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """The URL of a migrated PostgreSQL database of the test's own, dropped afterwards."""
    name = pg.unique_name("watcher_test")
    pg.create_database(name, template=pg_template)
    yield pg.database_url(name)
    pg.drop_database(name)


@pytest.fixture
def pg_empty_url() -> Iterator[str]:
    """The URL of an empty PostgreSQL database (no migration yet), dropped afterwards."""
    name = pg.unique_name("watcher_empty")
    pg.create_database(name)
    yield pg.database_url(name)
    pg.drop_database(name)


@pytest.fixture
def own_postgres() -> Iterator[pg.OwnServer]:
    """A started PostgreSQL server of the test's own, which it may stop and start; removed after."""
    server = pg.OwnServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()
