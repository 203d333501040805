"""The one place that reads the clock.

Every decision elsewhere takes ``now`` as a parameter, so it can be tested without sleeping.
Times are Unix seconds as floats (wall clock), because they are stored and shared between
processes; ``monotonic`` is for measuring durations inside one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


def now() -> float:
    """Return the current wall-clock time in Unix seconds."""
    return time.time()


def monotonic() -> float:
    """Return a monotonic reading for measuring elapsed time."""
    return time.monotonic()


async def wait(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait until ``event`` is set or ``seconds`` have passed (``None``: no limit); whether it
    was set.

    Not ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that arrives just as the
    event is set (a shutdown sets the stop event and cancels at once), and the task runs on."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
