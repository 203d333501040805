"""Store outages: whether the store answers, what is logged about it, how long to wait.

The daemon asks the store for everything, so a store that does not answer (PostgreSQL stopped or
failing over, SQLite locked by another process past its busy timeout, a full or read-only volume)
must not end it. :class:`StoreHealth` is the one place that knows an outage is under way:

- the first failure logs ``store_unavailable`` (once per outage, however many calls fail);
- while it lasts the dispatch loop claims nothing and probes the store with a *write* after each
  backoff delay (:func:`retry_delay`), since SQLite can still be read while another process holds
  its write lock; work in flight waits for :meth:`StoreHealth.wait_up` at its next store call;
- the first successful probe ends the pause and wakes the waiting work; ``store_recovered``
  (how long the store was away) is logged once the store has stayed up for ``maximum``
  seconds (:meth:`StoreHealth.settle`). A failure before that continues the same outage,
  silently: a store that flaps (a full volume where small writes fit and large ones do not)
  still makes one warning and one recovery line.

Readiness (``/readyz``) reads :attr:`StoreHealth.down`. This module decides nothing about what a
project's work does after an outage (see :mod:`watcher.workflow`), and reads the clock
only through :mod:`watcher.clock`.
"""

from __future__ import annotations

import asyncio
import random

import structlog

from watcher import clock
from watcher.errors import StoreError

log = structlog.get_logger("watcher")

MAX_EXPONENT = 30


def retry_delay(failures: int, rng: random.Random, *, initial: float, maximum: float) -> float:
    """Seconds before the next probe after ``failures`` failed ones in a row: exponential from
    ``initial``, capped at ``maximum``, jittered between half and all of that."""
    ceiling = min(maximum, initial * 2.0 ** min(max(failures - 1, 0), MAX_EXPONENT))
    return ceiling * (0.5 + 0.5 * rng.random())


class StoreHealth:
    """Whether the store answers; see the module docstring."""

    def __init__(self, *, initial: float, maximum: float, rng: random.Random) -> None:
        self.initial = initial
        self.maximum = maximum
        self.rng = rng
        self._up = asyncio.Event()
        self._up.set()
        self._since: float | None = None
        self._back_at: float | None = None  # up again, not yet settled
        self._failures = 0
        self._last_error = ""

    @property
    def down(self) -> bool:
        """Whether an outage is under way."""
        return not self._up.is_set()

    @property
    def problem(self) -> str | None:
        """What readiness says while the store is away, or ``None``."""
        if not self.down or self._since is None:
            return None
        away = max(0.0, clock.now() - self._since)
        return f"the store does not answer (for {away:.0f} s): {self._last_error}"

    def failed(self, exc: StoreError, *, during: str) -> None:
        """A store call failed: the outage starts (logged once) or goes on."""
        self._failures += 1
        self._last_error = str(exc)
        if self.down:
            return
        self._up.clear()
        if self._back_at is not None:  # a relapse: the same outage goes on
            self._back_at = None
            return
        self._since = clock.now()
        log.warning(
            "store_unavailable",
            error=self._last_error,
            during=during,
            action="claiming paused; work in flight waits for the store; retrying with backoff"
            f" up to {self.maximum:g} s",
        )

    def next_delay(self) -> float:
        """How long to wait before the next probe."""
        return retry_delay(self._failures, self.rng, initial=self.initial, maximum=self.maximum)

    def recovered(self) -> None:
        """A write went through: the pause is over and waiting work goes on."""
        if self.down:
            self._back_at = clock.now()
            self._up.set()

    def settle(self, *, force: bool = False) -> None:
        """Log ``store_recovered`` once the store has stayed up for ``maximum`` seconds (or now,
        with ``force``: the daemon is stopping)."""
        if self._back_at is None or self.down:
            return
        if not force and clock.now() - self._back_at < self.maximum:
            return
        since = self._since if self._since is not None else self._back_at
        log.info(
            "store_recovered",
            down_seconds=round(max(0.0, self._back_at - since), 1),
            failures=self._failures,
        )
        self._since = self._back_at = None
        self._failures = 0

    async def wait_up(self, stopping: asyncio.Event) -> bool:
        """Wait until the store is back (``True``) or the daemon stops (``False``)."""
        if not self.down:
            return True
        up = asyncio.ensure_future(self._up.wait())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait([up, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            stop.cancel()
        return self._up.is_set() and not stopping.is_set()
