"""The client-wide brake on API calls: a request-rate budget, a concurrency cap, and the pause
after a 429.

With ``shared`` (several replicas on PostgreSQL), every call also takes a token from the fleet's
budget in the store, so ``rate`` holds for the fleet, not per replica.

A 429 slows the whole client, not only the project that got it: every call waits until the
server's ``Retry-After`` has passed, and afterwards the rate climbs back from a tenth of the
budget to all of it over ``ramp_seconds``, so a fleet of waiting polls does not stampede the API
the moment the pause ends.

The clock and the sleep are injected, so the arithmetic is testable without waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from watcher import clock
from watcher.errors import StoreError

RESUME_FRACTION = 0.1
# With a fleet-wide budget, tokens are taken from the store this many seconds' worth at a time.
SHARED_BATCH_SECONDS = 0.1

SharedBudget = Callable[[int], Awaitable[int]]
"""Ask the fleet's budget for up to n tokens; returns how many were granted."""
# Float rounding: after sleeping exactly the deficit, the refill can come out a hair under one
# token; without this slack an exact (injected) clock would loop on ever tinier sleeps.
TOKEN_SLACK = 1e-6


class Throttle:
    """Admits API calls at no more than ``rate`` per second (bursts of up to one second's worth)
    and ``concurrency`` at once."""

    def __init__(
        self,
        *,
        rate: float,
        concurrency: int,
        ramp_seconds: float = 10.0,
        now: Callable[[], float] = clock.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        shared: SharedBudget | None = None,
    ) -> None:
        self.rate = rate
        self._shared = shared
        self._shared_tokens = 0
        self._shared_batch = max(1, int(rate * SHARED_BATCH_SECONDS))
        self.ramp_seconds = ramp_seconds
        self._now = now
        self._sleep = sleep
        self._semaphore = asyncio.Semaphore(concurrency)
        self._lock = asyncio.Lock()
        self._capacity = max(1.0, rate)  # one second of budget may be spent at once
        self._tokens = self._capacity
        self._stamp = now()
        self._paused_until = 0.0
        self._resumed = asyncio.Event()
        self.pauses = 0

    def current_rate(self, at: float) -> float:
        """The admitted rate at monotonic time ``at``, lowered while recovering from a pause."""
        if at < self._paused_until:
            return 0.0
        since = at - self._paused_until
        if self.pauses == 0 or since >= self.ramp_seconds:
            return self.rate
        fraction = RESUME_FRACTION + (1 - RESUME_FRACTION) * since / self.ramp_seconds
        return self.rate * fraction

    def pause(self, seconds: float) -> bool:
        """Stop admitting calls for ``seconds`` (a 429's hint). True if this extended the pause."""
        until = self._now() + max(seconds, 0.0)
        if until <= self._paused_until:
            return False
        self._paused_until = until
        self._tokens = 0.0
        self._stamp = until  # the budget refills from the end of the pause, not during it
        self.pauses += 1
        return True

    def resume(self) -> None:
        """End the current pause now (the refused API token was replaced): calls waiting it out
        go on at once, and the rate climbs back as after any pause."""
        at = self._now()
        if at >= self._paused_until:
            return
        self._paused_until = at
        self._tokens = 0.0
        self._stamp = at
        self._resumed.set()

    async def _wait_out_pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if :meth:`resume` ends the pause first."""
        self._resumed.clear()
        waits = {
            asyncio.ensure_future(self._sleep(seconds)),
            asyncio.ensure_future(self._resumed.wait()),
        }
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    @property
    def paused_for(self) -> float:
        """Seconds left in the current pause (0 if none)."""
        return max(0.0, self._paused_until - self._now())

    async def _take_token(self) -> None:
        async with self._lock:
            while True:
                at = self._now()
                if at < self._paused_until:
                    await self._wait_out_pause(self._paused_until - at)
                    self._stamp = min(self._paused_until, self._now())
                    continue
                rate = self.current_rate(at)
                self._tokens = min(self._capacity, self._tokens + (at - self._stamp) * rate)
                self._stamp = at
                if self._tokens >= 1.0 - TOKEN_SLACK:
                    if not await self._take_shared():
                        # The fleet spent the budget: ask again when a batch may have refilled.
                        await self._sleep(self._shared_batch / rate)
                        continue
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                await self._sleep((1.0 - self._tokens) / rate)

    async def _take_shared(self) -> bool:
        """One token of the fleet's budget (always granted without a shared budget)."""
        if self._shared is None:
            return True
        if self._shared_tokens < 1:
            try:
                self._shared_tokens += await self._shared(self._shared_batch)
            except StoreError:
                return True  # the database blinked: this replica's own limit still holds
        if self._shared_tokens < 1:
            return False
        self._shared_tokens -= 1
        return True

    def slot(self) -> Throttle:
        """``async with throttle.slot():`` waits for a concurrency slot and the rate budget,
        and holds the slot for one call (the throttle is its own context manager: no
        generator is made per call)."""
        return self

    async def __aenter__(self) -> None:
        await self._semaphore.acquire()
        try:
            await self._take_token()
        except BaseException:
            self._semaphore.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._semaphore.release()
