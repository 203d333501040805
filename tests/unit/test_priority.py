"""Unit tests of :mod:`watcher.priority`: a slot limit that admits the lowest priority first."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from watcher.priority import PriorityGate

pytestmark = pytest.mark.anyio


async def _settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_free_slots_are_taken_at_once() -> None:
    """Below capacity, a slot is granted without waiting."""
    gate = PriorityGate(2)
    async with gate.slot(5.0), gate.slot(1.0):
        assert gate.active == 2
        assert gate.waiting == 0
    assert gate.active == 0


async def test_waiters_are_admitted_lowest_priority_first() -> None:
    """When a slot frees, the waiter with the lowest priority goes next, whatever its arrival."""
    gate = PriorityGate(1)
    order: list[str] = []
    release = {name: asyncio.Event() for name in ("late", "first", "middle", "tie-a", "tie-b")}

    async def use(name: str, priority: float) -> None:
        async with gate.slot(priority):
            order.append(name)
            await release[name].wait()

    async with AsyncExitStack() as holder:
        await holder.enter_async_context(gate.slot(0.0))
        async with asyncio.TaskGroup() as group:
            for name, priority in [
                ("late", 300.0),
                ("tie-a", 20.0),
                ("first", 10.0),
                ("middle", 100.0),
                ("tie-b", 20.0),
            ]:
                group.create_task(use(name, priority))
                await _settle()
            assert gate.waiting == 5
            assert order == []
            await holder.aclose()
            for _ in range(5):
                await _settle()
                assert gate.active == 1
                release[order[-1]].set()
    assert order == ["first", "tie-a", "tie-b", "middle", "late"]
    assert gate.active == 0


async def test_capacity_is_never_exceeded() -> None:
    """Many concurrent users never hold more than ``capacity`` slots at once."""
    gate = PriorityGate(3)
    inside = 0
    peak = 0
    done = 0

    async def use(priority: float) -> None:
        nonlocal inside, peak, done
        async with gate.slot(priority):
            inside += 1
            peak = max(peak, inside, gate.active)
            for _ in range(3):
                await asyncio.sleep(0)
            inside -= 1
        done += 1

    async with asyncio.TaskGroup() as group:
        for n in range(40):
            group.create_task(use(float(n % 7)))
    assert peak == 3
    assert done == 40
    assert gate.active == 0
    assert gate.waiting == 0


async def test_slot_is_returned_when_the_holder_fails() -> None:
    """A holder that raises frees its slot for the next waiter."""
    gate = PriorityGate(1)
    with pytest.raises(RuntimeError, match="boom"):
        async with gate.slot(1.0):
            raise RuntimeError("boom")
    assert gate.active == 0
    async with asyncio.timeout(1), gate.slot(1.0):
        assert gate.active == 1


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    """A waiter cancelled while queued takes no slot, and later users still get in."""
    gate = PriorityGate(1)
    async with AsyncExitStack() as holder:
        await holder.enter_async_context(gate.slot(0.0))
        waiter = asyncio.create_task(_hold(gate, 1.0))
        await _settle()
        assert gate.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.waiting == 0
    assert gate.active == 0
    async with asyncio.timeout(1), gate.slot(5.0):
        assert gate.active == 1


async def test_waiter_cancelled_just_after_admission_gives_the_slot_on() -> None:
    """A waiter admitted and cancelled before it resumes passes its slot to the next waiter."""
    gate = PriorityGate(1)
    entered: list[str] = []
    holder = AsyncExitStack()
    await holder.enter_async_context(gate.slot(0.0))
    admitted = asyncio.create_task(_hold(gate, 1.0, entered, "admitted"))
    next_in_line = asyncio.create_task(_hold(gate, 2.0, entered, "next"))
    await _settle()
    assert gate.waiting == 2

    await holder.aclose()  # frees the slot: the priority-1 waiter is granted it...
    admitted.cancel()  # ...but is cancelled before it gets to run
    with pytest.raises(asyncio.CancelledError):
        await admitted
    async with asyncio.timeout(1):
        await next_in_line
    assert entered == ["next"]
    assert gate.active == 0
    assert gate.waiting == 0


async def test_cancelled_waiters_do_not_block_a_fresh_arrival() -> None:
    """Once all holders leave, stale cancelled entries do not make a newcomer wait forever."""
    gate = PriorityGate(2)
    holder = AsyncExitStack()
    await holder.enter_async_context(gate.slot(0.0))
    await holder.enter_async_context(gate.slot(0.0))
    waiters = [asyncio.create_task(_hold(gate, float(n))) for n in range(4)]
    await _settle()
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await holder.aclose()
    assert gate.active == 0
    async with asyncio.timeout(1), gate.slot(9.0), gate.slot(9.0):
        assert gate.active == 2


async def _hold(
    gate: PriorityGate, priority: float, log: list[str] | None = None, name: str = ""
) -> None:
    """Take a slot, note the entry, and give the slot back."""
    async with gate.slot(priority):
        if log is not None:
            log.append(name)
