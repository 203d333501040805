"""The HTTP server's bounds without sockets: burst logging on a fake clock, the loop's accept
error handler, and the connection cap kept within the descriptor limit."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from structlog.testing import capture_logs

from watcher.http.server import AcceptErrors, ConnectionLimits
from watcher.logs import BurstLog
from watcher.settings import load_settings


class FakeMonotonic:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_one_line_then_one_line_per_period_with_its_count() -> None:
    """The first occurrence is logged at once; the next ones are held back and counted until
    the period has passed, then logged as one line carrying how many there were."""
    clock = FakeMonotonic()
    burst = BurstLog("http_accept_failed", every=60, monotonic=clock)
    with capture_logs() as logs:
        for _ in range(500):
            burst.note(error="EMFILE")
            clock.now += 0.01  # 5 s of a flood
        clock.now += 60
        burst.note(error="EMFILE")
    assert [(e["event"], e["occurrences"]) for e in logs] == [
        ("http_accept_failed", 1),
        ("http_accept_failed", 500),
    ]
    assert logs[0]["log_level"] == "warning"


def test_accept_errors_become_one_warning_and_other_errors_pass_on() -> None:
    """``EMFILE`` from accept(), reported by asyncio a thousand times, is one JSON warning; an
    unrelated loop error reaches the handler that was installed before."""
    loop = asyncio.new_event_loop()
    others: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: others.append(context))
    handler = AcceptErrors(loop)
    emfile = OSError(errno.EMFILE, "Too many open files")
    try:
        with capture_logs() as logs, handler.installed():
            for _ in range(1000):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": emfile,
                        "socket": object(),
                    }
                )
            loop.call_exception_handler({"message": "something else", "exception": ValueError("x")})
        assert loop.get_exception_handler() is not handler  # restored
    finally:
        loop.close()
    assert [(e["event"], e["error"]) for e in logs] == [
        ("http_accept_failed", "EMFILE: Too many open files")
    ]
    assert [c["message"] for c in others] == ["something else"]


@pytest.mark.parametrize(
    ("configured", "soft", "expected"), [(100, 1024, 100), (5000, 1024, 256), (3, 1, 1)]
)
def test_the_connection_cap_leaves_most_descriptors_to_the_daemon(
    configured: int, soft: int, expected: int
) -> None:
    """However high ``WATCHER_HTTP_MAX_CONNECTIONS`` is set, connections may take at most a
    quarter of the descriptor limit: a burst of accepts holds descriptors before any of them is
    refused, and the store, downloads and API calls need the rest."""
    settings = load_settings({"WATCHER_HTTP_MAX_CONNECTIONS": str(configured)})
    assert ConnectionLimits.from_settings(settings, soft).max_connections == expected


def test_other_loop_errors_without_a_handler_are_json_not_tracebacks() -> None:
    """With no handler installed before, an error the loop catches is one ``event_loop_error``
    per burst rather than asyncio's traceback on stderr."""
    loop = asyncio.new_event_loop()
    try:
        with capture_logs() as logs, AcceptErrors(loop).installed():
            for _ in range(50):
                loop.call_exception_handler(
                    {"message": "Exception in callback", "exception": KeyError("k")}
                )
    finally:
        loop.close()
    assert [(e["event"], e["log_level"], e["message"]) for e in logs] == [
        ("event_loop_error", "error", "Exception in callback")
    ]
