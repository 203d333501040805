"""Unit tests of :mod:`watcher.store.serial_thread`: calls run in order on one thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from watcher.store.serial_thread import SerialThread

pytestmark = pytest.mark.anyio


async def test_calls_run_in_order_on_one_thread_and_return_their_results() -> None:
    """Many calls made at once run one after another, in the order made, on the named thread."""
    thread = SerialThread("serial-test")
    seen: list[tuple[int, str]] = []

    def record(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    try:
        results = await asyncio.gather(*(thread.run(record, i) for i in range(200)))
    finally:
        thread.stop()
    assert results == [i * i for i in range(200)]
    assert seen == [(i, "serial-test") for i in range(200)]


async def test_an_error_reaches_the_caller_and_the_thread_goes_on() -> None:
    """A call that raises hands its exception to its caller; the next call still runs."""
    thread = SerialThread("serial-test")

    def fail() -> None:
        raise KeyError("boom")

    try:
        with pytest.raises(KeyError, match="boom"):
            await thread.run(fail)
        assert await thread.run(lambda: 7) == 7
    finally:
        thread.stop()


async def test_a_call_cancelled_before_it_begins_is_not_run() -> None:
    """A call whose caller gave up while it waited in the queue is skipped, as an executor
    skips a cancelled work item; the one running meanwhile finishes."""
    thread = SerialThread("serial-test")
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def block() -> None:
        started.set()
        release.wait()
        ran.append("block")

    try:
        first = thread.run(block)
        second = thread.run(ran.append, "skipped")
        await asyncio.to_thread(started.wait)
        second.cancel()
        release.set()
        await first
        await thread.run(ran.append, "after")
    finally:
        thread.stop()
    assert ran == ["block", "after"]


def test_a_loop_closed_with_a_call_running_does_not_stall_the_next_loop() -> None:
    """A call still running when its loop closes (its caller gone) is dropped; calls made
    from the next loop (a CLI command's second asyncio.run) are still answered."""
    thread = SerialThread("serial-test")
    started, release = threading.Event(), threading.Event()

    def block() -> int:
        started.set()
        release.wait()
        return 1

    async def leave_running() -> None:
        thread.run(block)  # never awaited: the loop closes while it runs
        await asyncio.to_thread(started.wait)

    async def ask() -> int:
        return await thread.run(lambda: 5)

    try:
        asyncio.run(leave_running())
        release.set()
        assert asyncio.run(ask()) == 5
    finally:
        thread.stop()


def test_stop_is_safe_twice() -> None:
    """Stopping ends the thread; a second stop does nothing."""
    thread = SerialThread("serial-test")
    thread.stop()
    thread.stop()
