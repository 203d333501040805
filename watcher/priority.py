"""A concurrency cap that admits waiters by priority (lowest first), not by arrival.

Downloads wait on one of these keyed by their URL's ``expires_at``, so when the cap is reached the
output whose link expires first goes next.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PriorityGate:
    """At most ``capacity`` holders at once; waiters are admitted in priority order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.active = 0
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    @property
    def waiting(self) -> int:
        """How many are queued."""
        return sum(1 for *_, fut in self._waiters if not fut.done())

    def _admit(self) -> None:
        while self._waiters and self.active < self.capacity:
            *_, fut = heapq.heappop(self._waiters)
            if not fut.done():
                self.active += 1
                fut.set_result(None)

    @asynccontextmanager
    async def slot(self, priority: float) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block."""
        if self.active < self.capacity and not self._waiters:
            self.active += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, next(self._counter), fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self.active -= 1  # admitted just as we were cancelled: give the slot back
                    self._admit()
                raise
        try:
            yield
        finally:
            self.active -= 1
            self._admit()
