"""The polling schedule: when to look at a project next, given how long renders usually take.

A fixed backoff must choose between many requests early (when nothing has happened yet) and a long
lag late (when the render has just ended). This schedule learns instead: it keeps the recent
render durations of each kind (seconds from tracking a project to seeing it terminal) and polls

- *before the usual window* (younger than the 2nd percentile): not at all, waking when the window
  opens (at most ``POLL_MAX`` later);
- *inside the window* (2nd to 98th percentile): densely, at the interval of
  :meth:`PollPolicy.interval <watcher.backoff.PollPolicy.interval>`: ``POLL_INITIAL`` seconds
  scaled by kind and status just after the status changed, then 20 % longer with each poll that
  finds it unchanged, up to ``LAG_FACTOR`` (1.4) times that: a rendering project is seen within
  at most 1.4 ``POLL_INITIAL`` of its end, and usually sooner, while one that keeps rendering
  costs about 30 % fewer polls than at a fixed ``POLL_INITIAL``. 10 % jitter, downwards only
  (the longest interval stays the lag bound), spreads projects tracked together. A queued one
  waits twice as long: it must still render before it can finish, so as long as renders take
  at least one longest interval it is seen within that bound too (a draft, documented as
  unused, waits four times as long);
- *past the window*: with a delay that grows in proportion to the overrun (half of it, between the
  dense interval and ``POLL_MAX``), so a very long render costs a logarithmic number of polls.

The durations are read back from the store at start-up, so a restart does not start cold, and
reloaded every ``RELOAD_SECONDS`` from a shared store, so every replica of a fleet learns from all
renders. Until a kind has ``MIN_SAMPLES`` durations, the window is taken to be the first
``COLD_WINDOW`` seconds (scaled by kind): watch closely while nothing is known, back off after.

Everything here is pure: the caller passes ``age`` and a random source.
"""

from __future__ import annotations

import bisect
import random
from collections import deque

from watcher.backoff import KIND_FACTOR, PollPolicy
from watcher.models import Kind, RemoteStatus

MIN_SAMPLES = 12
SAMPLE_SIZE = 512
RELOAD_SECONDS = 60.0
LOW_QUANTILE = 0.02
HIGH_QUANTILE = 0.98
COLD_WINDOW = 30.0
JITTER = 0.25
DENSE_JITTER = 0.1
OVERRUN_FACTOR = 0.5


class RenderStats:
    """The last ``SAMPLE_SIZE`` render durations of each kind, and their usual window."""

    def __init__(self, size: int = SAMPLE_SIZE) -> None:
        self._size = size
        self._recent: dict[Kind, deque[float]] = {k: deque(maxlen=size) for k in Kind}
        self._sorted: dict[Kind, list[float]] = {k: [] for k in Kind}

    def add(self, kind: Kind, seconds: float) -> None:
        """Record that a project of ``kind`` became terminal ``seconds`` after it was tracked."""
        if seconds < 0:
            return
        recent, ordered = self._recent[kind], self._sorted[kind]
        if len(recent) == self._size:
            oldest = recent[0]
            del ordered[bisect.bisect_left(ordered, oldest)]
        recent.append(seconds)
        bisect.insort(ordered, seconds)

    def load(self, kind: Kind, durations: list[float]) -> None:
        """Replace ``kind``'s durations with ``durations`` (oldest first; the latest are kept)."""
        recent = self._recent[kind]
        recent.clear()
        recent.extend(d for d in durations if d >= 0)
        self._sorted[kind] = sorted(recent)

    def count(self, kind: Kind) -> int:
        """How many durations of ``kind`` are known."""
        return len(self._recent[kind])

    def window(self, kind: Kind) -> tuple[float, float] | None:
        """(2nd, 98th) percentile of ``kind``'s durations, or ``None`` with too few samples."""
        ordered = self._sorted[kind]
        if len(ordered) < MIN_SAMPLES:
            return None
        last = len(ordered) - 1
        return ordered[round(LOW_QUANTILE * last)], ordered[round(HIGH_QUANTILE * last)]


def next_poll_delay(
    policy: PollPolicy,
    kind: Kind,
    status: RemoteStatus | None,
    *,
    age: float,
    attempt: int,
    rng: random.Random,
    window: tuple[float, float] | None,
) -> float:
    """Seconds until the next poll of a project tracked ``age`` seconds ago, whose ``attempt``
    polls in a row (0: this one saw a new status) found ``status`` unchanged."""
    dense = policy.interval(kind, status, attempt)
    if window is None:
        window = (0.0, COLD_WINDOW * KIND_FACTOR[kind])
    low, high = window
    if age + dense < low:
        return min(low - age, policy.maximum)
    if age <= high:
        return rng.uniform(dense * (1 - DENSE_JITTER), dense)
    overrun = min(policy.maximum, max(dense, (age - high) * OVERRUN_FACTOR))
    return rng.uniform(max(dense, overrun * (1 - JITTER)), overrun)
