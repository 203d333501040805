"""A fake clock for unit tests: sleeping advances it instantly and records how long was asked."""

from __future__ import annotations

import asyncio


class FakeClock:
    """A monotonic clock that only moves when someone sleeps on it (or a test advances it)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.time = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        """The current fake time."""
        return self.time

    def advance(self, seconds: float) -> None:
        """Move the clock forward without anyone sleeping."""
        self.time += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the request, advance the clock by it, and let other tasks run once."""
        self.sleeps.append(seconds)
        self.time += max(seconds, 0.0)
        await asyncio.sleep(0)

    @property
    def slept(self) -> float:
        """Total seconds slept so far."""
        return sum(self.sleeps)
