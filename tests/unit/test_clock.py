"""The clock's one wait: an event or a timeout, and a cancellation never lost."""

from __future__ import annotations

import asyncio

import pytest

from watcher import clock

pytestmark = pytest.mark.anyio


async def test_the_wait_says_whether_the_event_was_set() -> None:
    """It returns True once the event is set and False when the time runs out first."""
    event = asyncio.Event()
    assert await clock.wait(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await clock.wait(event, None) is True


async def test_a_cancellation_as_the_event_is_set_is_not_lost() -> None:
    """A shutdown sets the stop event and cancels the waiting task in the same moment: the
    task is cancelled (Python 3.11's asyncio.wait_for returned normally here, and the loop
    around it ran on)."""
    event = asyncio.Event()
    task = asyncio.create_task(clock.wait(event, 10.0))
    await asyncio.sleep(0)  # the task is waiting on the event
    event.set()  # the waiter is woken, and in the same loop turn:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
