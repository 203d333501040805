"""Store outages: logged once each, backoff bounds, and the settings that shape them."""

from __future__ import annotations

import asyncio
import random
import sqlite3

import psycopg
import pytest
from structlog.testing import capture_logs

from watcher.errors import ConfigError, StoreError, StoreUnavailable
from watcher.outage import StoreHealth, retry_delay
from watcher.settings import load_settings
from watcher.store.postgres_connector import PostgresConnector
from watcher.store.sqlite_connector import wrap_error as sqlite_wrap

pytestmark = pytest.mark.anyio


def test_retry_delay_doubles_from_initial_up_to_the_cap_with_jitter() -> None:
    """Between half and all of ``initial * 2**(failures-1)``, never above ``maximum``."""
    rng = random.Random(1)
    for failures in range(1, 40):
        ceiling = min(5.0, 0.5 * 2 ** (failures - 1))
        delay = retry_delay(failures, rng, initial=0.5, maximum=5.0)
        assert ceiling / 2 <= delay <= ceiling


async def test_an_outage_is_logged_once_and_its_end_once() -> None:
    """Many failed calls make one warning; the first success one recovery line, and waiting
    work is released."""
    health = StoreHealth(initial=0.1, maximum=1.0, rng=random.Random(2))
    stopping = asyncio.Event()
    with capture_logs() as logs:
        for _ in range(5):
            health.failed(StoreUnavailable("down"), during="claim")
        assert health.down
        assert health.problem is not None
        assert "down" in health.problem
        waiter = asyncio.create_task(health.wait_up(stopping))
        await asyncio.sleep(0)
        assert not waiter.done()
        health.recovered()
        assert await waiter is True
        health.recovered()
        health.settle(force=True)
    assert [e["event"] for e in logs] == ["store_unavailable", "store_recovered"]
    assert logs[1]["failures"] == 5
    assert not health.down
    assert health.problem is None


def test_a_store_that_flaps_is_one_outage() -> None:
    """Up again, then failing before it has stayed up a while: the same outage goes on, so one
    warning and, once it holds, one recovery line."""
    health = StoreHealth(initial=0.1, maximum=60.0, rng=random.Random(4))
    with capture_logs() as logs:
        for _ in range(3):
            health.failed(StoreUnavailable("disk full"), during="work")
            health.recovered()
            health.settle()  # not yet: it has not stayed up for a minute
        assert not health.down
        health.settle(force=True)
    assert [e["event"] for e in logs] == ["store_unavailable", "store_recovered"]
    assert logs[1]["failures"] == 3


async def test_waiting_work_is_released_when_the_daemon_stops() -> None:
    """Work waiting for the store gives up (``False``) when shutdown begins."""
    health = StoreHealth(initial=0.1, maximum=1.0, rng=random.Random(3))
    health.failed(StoreUnavailable("down"), during="work")
    stopping = asyncio.Event()
    waiter = asyncio.create_task(health.wait_up(stopping))
    await asyncio.sleep(0)
    stopping.set()
    assert await waiter is False


def test_the_retry_cap_must_not_be_below_the_first_delay() -> None:
    """WATCHER_STORE_RETRY_MAX below WATCHER_STORE_RETRY_INITIAL is refused, naming both."""
    with pytest.raises(ConfigError, match=r"WATCHER_STORE_RETRY_MAX.*WATCHER_STORE_RETRY_INITIAL"):
        load_settings({"WATCHER_STORE_RETRY_INITIAL": "2", "WATCHER_STORE_RETRY_MAX": "1"})


@pytest.mark.parametrize(
    ("code", "unavailable"),
    [(5, True), (517, True), (13, True), (10, True), (8, True), (1, False), (19, False)],
)
def test_sqlite_errors_that_mean_not_now_are_unavailable(code: int, unavailable: bool) -> None:
    """BUSY (and BUSY_SNAPSHOT), FULL, IOERR, READONLY: worth retrying; a bad query or a
    constraint is a plain StoreError."""
    exc = sqlite3.OperationalError("boom")
    exc.sqlite_errorcode = code
    assert isinstance(sqlite_wrap("w.db", exc), StoreUnavailable) is unavailable


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (psycopg.OperationalError("connection refused"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.DiskFull("no space"), True),
        (psycopg.errors.ReadOnlySqlTransaction("read-only transaction"), True),
        (psycopg.errors.UndefinedTable("no such table"), False),
        (psycopg.errors.UniqueViolation("duplicate"), False),
    ],
)
def test_postgres_errors_that_mean_not_now_are_unavailable(
    error: psycopg.Error, unavailable: bool
) -> None:
    """A lost or refused connection, a shutdown, a full disk, a read-only server after a
    failover: worth retrying; a bad statement is a plain StoreError."""
    connector = PostgresConnector("postgresql://watcher:pw@db/watcher")
    with pytest.raises(StoreError) as raised, connector.wrap_errors():
        raise error
    assert isinstance(raised.value, StoreUnavailable) is unavailable
    assert "pw" not in str(raised.value)
