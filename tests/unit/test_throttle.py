"""Unit tests of :mod:`watcher.throttle`, on a fake clock whose sleeps return at once."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.unit.fake_time import FakeClock
from watcher.errors import StoreError
from watcher.throttle import RESUME_FRACTION, SHARED_BATCH_SECONDS, Throttle

pytestmark = pytest.mark.anyio


def _throttle(
    clock: FakeClock, *, rate: float, concurrency: int = 100, ramp: float = 10.0
) -> Throttle:
    return Throttle(
        rate=rate, concurrency=concurrency, ramp_seconds=ramp, now=clock.now, sleep=clock.sleep
    )


async def _admit(throttle: Throttle, clock: FakeClock, calls: int) -> list[float]:
    """Pass ``calls`` calls through the throttle one after another; return when each got in."""
    times = []
    for _ in range(calls):
        async with throttle.slot():
            times.append(clock.now())
    return times


async def test_burst_of_one_seconds_budget_then_the_rate() -> None:
    """A fresh throttle admits one second's budget at once, then one call per ``1/rate``."""
    clock = FakeClock(start=0.0)
    throttle = _throttle(clock, rate=5)
    times = await _admit(throttle, clock, 20)
    assert times[:5] == [0.0] * 5
    assert times[5:] == pytest.approx([0.2 * n for n in range(1, 16)])
    assert all(s > 0 for s in clock.sleeps)


async def test_no_more_than_rate_per_second_over_a_long_run() -> None:
    """Over many calls the admitted rate converges to the budget."""
    clock = FakeClock(start=0.0)
    throttle = _throttle(clock, rate=50)
    times = await _admit(throttle, clock, 550)
    assert times[-1] == pytest.approx((550 - 50) / 50)


async def test_budget_below_one_per_second() -> None:
    """A rate under 1/s still admits one call at once, then one every ``1/rate`` seconds."""
    clock = FakeClock(start=0.0)
    throttle = _throttle(clock, rate=0.5)
    assert await _admit(throttle, clock, 3) == pytest.approx([0.0, 2.0, 4.0])


async def test_idle_time_refills_the_budget_only_up_to_one_second() -> None:
    """A long idle spell refills at most one second's budget, not an unbounded burst."""
    clock = FakeClock(start=0.0)
    throttle = _throttle(clock, rate=4)
    await _admit(throttle, clock, 4)
    clock.advance(3_600)
    start = clock.now()
    times = await _admit(throttle, clock, 6)
    assert times[:4] == [start] * 4
    assert times[4:] == pytest.approx([start + 0.25, start + 0.5])


async def test_pause_reports_whether_it_extended() -> None:
    """A pause is extended only by a later end; a shorter hint changes nothing."""
    clock = FakeClock(start=100.0)
    throttle = _throttle(clock, rate=10)
    assert throttle.paused_for == 0.0
    assert throttle.pause(3.0) is True
    assert throttle.paused_for == pytest.approx(3.0)
    assert throttle.pause(1.0) is False
    assert throttle.pauses == 1
    clock.advance(1.0)
    assert throttle.paused_for == pytest.approx(2.0)
    assert throttle.pause(5.0) is True
    assert throttle.pauses == 2
    assert throttle.paused_for == pytest.approx(5.0)
    clock.advance(10.0)
    assert throttle.paused_for == 0.0


async def test_calls_wait_until_the_pause_ends() -> None:
    """No call is admitted while paused; the first one gets in only after the pause."""
    clock = FakeClock(start=0.0)
    throttle = _throttle(clock, rate=100)
    throttle.pause(7.0)
    async with throttle.slot():
        admitted = clock.now()
    assert clock.sleeps[0] == pytest.approx(7.0)
    assert admitted >= 7.0


async def test_current_rate_ramps_up_after_a_pause() -> None:
    """The admitted rate is 0 while paused, a tenth at the end, and climbs linearly to the full."""
    clock = FakeClock(start=0.0)
    throttle = _throttle(clock, rate=20, ramp=10.0)
    assert throttle.current_rate(0.0) == 20
    throttle.pause(5.0)
    assert throttle.current_rate(0.0) == 0.0
    assert throttle.current_rate(4.999) == 0.0
    assert throttle.current_rate(5.0) == pytest.approx(20 * RESUME_FRACTION)
    assert throttle.current_rate(10.0) == pytest.approx(20 * (0.1 + 0.9 * 0.5))
    assert throttle.current_rate(15.0) == 20
    assert throttle.current_rate(1_000.0) == 20
    rates = [throttle.current_rate(5.0 + t / 10) for t in range(101)]
    assert rates == sorted(rates)


async def test_waiters_resume_slowly_after_a_pause() -> None:
    """Calls held by a pause trickle in after it instead of stampeding at its end."""
    clock = FakeClock(start=0.0)
    throttle = _throttle(clock, rate=10, ramp=10.0)
    await _admit(throttle, clock, 3)
    throttle.pause(5.0)
    times = await _admit(throttle, clock, 20)
    assert times[0] >= 5.0 + 0.9  # at a tenth of the rate, the first token takes ~1 s
    assert sum(1 for t in times if t < 7.0) <= 5  # the full rate would admit 20 by then
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sum(gaps[-5:]) < sum(gaps[1:6])  # the pace quickens as the ramp climbs
    assert min(gaps[-5:]) > 1 / 10  # but never beyond the budget


async def test_late_arrival_after_a_pause_gets_no_burst() -> None:
    """Time spent paused does not refill the budget: a call arriving after the pause still ramps."""
    clock = FakeClock(start=0.0)
    throttle = _throttle(clock, rate=10, ramp=10.0)
    await _admit(throttle, clock, 10)  # spend the opening burst
    throttle.pause(5.0)
    clock.advance(5.0)  # nobody was waiting; the first call arrives as the pause ends
    times = await _admit(throttle, clock, 5)
    assert times[0] > 5.0, "a full burst was admitted the instant the pause ended"
    clock.advance(2.0)
    arrived = clock.now()
    immediate = sum(1 for t in await _admit(throttle, clock, 10) if t == arrived)
    assert immediate < 10


async def test_concurrency_cap() -> None:
    """No more than ``concurrency`` calls hold a slot at once; the rest wait their turn."""
    clock = FakeClock()
    throttle = _throttle(clock, rate=1_000, concurrency=2)
    release = asyncio.Event()
    inside = 0
    peak = 0
    finished = 0

    async def call() -> None:
        nonlocal inside, peak, finished
        async with throttle.slot():
            inside += 1
            peak = max(peak, inside)
            await release.wait()
            inside -= 1
        finished += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(5):
            group.create_task(call())
        for _ in range(20):
            await asyncio.sleep(0)
        assert inside == 2
        release.set()
    assert peak == 2
    assert finished == 5


async def test_slot_is_returned_when_the_call_fails() -> None:
    """A call that raises gives its concurrency slot back."""
    clock = FakeClock()
    throttle = _throttle(clock, rate=1_000, concurrency=1)
    with pytest.raises(RuntimeError, match="boom"):
        async with throttle.slot():
            raise RuntimeError("boom")
    async with asyncio.timeout(1):
        async with throttle.slot():
            pass


class FleetBucket:
    """A fake shared budget: a token bucket on the same fake clock, shared by several throttles."""

    def __init__(self, clock: FakeClock, rate: float) -> None:
        self.clock, self.rate = clock, rate
        self.tokens, self.stamp = rate, clock.now()
        self.asked = 0

    async def take(self, want: int) -> int:
        self.asked += 1
        now = self.clock.now()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        granted = min(want, int(self.tokens))
        self.tokens -= granted
        return granted


async def test_a_shared_budget_holds_for_the_whole_fleet() -> None:
    """Three replicas sharing a budget of 20/s admit about 20/s together, not 60/s."""
    clock = FakeClock(start=0.0)
    fleet = FleetBucket(clock, rate=20)
    replicas = [
        Throttle(rate=20, concurrency=100, now=clock.now, sleep=clock.sleep, shared=fleet.take)
        for _ in range(3)
    ]
    admitted: list[float] = []

    async def run(throttle: Throttle) -> None:
        while clock.now() < 10.0:
            async with throttle.slot():
                admitted.append(clock.now())

    await asyncio.gather(*(run(t) for t in replicas))
    in_window = [t for t in admitted if t < 10.0]
    assert len(in_window) <= 20 * 10 + 20 + 3 * 2  # rate x time + one burst + batches in hand
    assert len(in_window) >= 20 * 10 * 0.8
    # The store is asked about once per batch interval per replica, not once per call.
    assert fleet.asked <= 3 * 10 / SHARED_BATCH_SECONDS + 10


async def test_a_failing_shared_budget_falls_back_to_the_local_limit() -> None:
    """If the store cannot answer, the replica keeps to its own budget instead of stopping."""

    async def broken(want: int) -> int:
        raise StoreError("database unreachable")

    clock = FakeClock(start=0.0)
    throttle = Throttle(rate=5, concurrency=10, now=clock.now, sleep=clock.sleep, shared=broken)
    times = await _admit(throttle, clock, 10)
    assert times[:5] == [0.0] * 5
    assert times[-1] == pytest.approx(1.0)


async def test_resume_lets_a_call_waiting_out_a_pause_through_at_once() -> None:
    """A call waiting out a long pause goes on as soon as ``resume`` ends it (a replaced API
    token), not when the pause would have ended."""
    clock = FakeClock()
    never = asyncio.Event()

    async def sleep(seconds: float) -> None:
        if seconds > 60:  # the pause: only resume can end it in this test
            await never.wait()
        await clock.sleep(seconds)

    throttle = Throttle(rate=100, concurrency=4, now=clock.now, sleep=sleep)
    throttle.pause(300)

    async def call() -> float:
        async with throttle.slot():
            return clock.now()

    waiting = asyncio.create_task(call())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    resumed_at = clock.now()
    throttle.resume()
    admitted = await asyncio.wait_for(waiting, 5)
    assert admitted - resumed_at < 1.0  # at the resumed ramp's rate, not 300 s later
    assert throttle.paused_for == 0.0
