"""Pure decisions about *when*: the next poll of a project and the next try after a fault.

Nothing here reads the clock or a global random source: callers pass ``rng`` (and ``now`` where
it matters), so the schedule is testable without sleeping.

``PollPolicy.base`` is the shortest delay between two polls of one project: the initial delay
scaled by how slow its kind and status usually are (a queued video waits longer than a rendering
image). ``PollPolicy.interval`` backs off from it gently: each poll that finds the status
unchanged waits ``GROWTH`` times longer than the one before, up to ``LAG_FACTOR`` times the base,
the longest interval and so the bound on detection lag; the attempt counter (polls at the same
status) restarts when the status changes, and with it the interval. :mod:`watcher.schedule`
decides how the intervals are laid out around a render's usual window. Retries after a fault use
exponential backoff with full jitter, with a server's ``Retry-After`` as a floor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from watcher.models import Kind, RemoteStatus

# How much slower than an image each kind usually renders (the docs suggest polling images every
# 2-3 s and videos every 5-10 s).
KIND_FACTOR: dict[Kind, float] = {Kind.IMAGE: 1.0, Kind.AUDIO: 1.5, Kind.VIDEO: 2.5}

# How much longer a project in each status can wait. ``draft`` is documented as not used; a
# project sitting in it is polled rarely.
STATUS_FACTOR: dict[RemoteStatus | None, float] = {
    None: 1.0,
    RemoteStatus.DRAFT: 4.0,
    RemoteStatus.QUEUED: 2.0,
    RemoteStatus.RENDERING: 1.0,
}

MAX_EXPONENT = 30

# The gentle backoff of polls at an unchanged status: 20 % longer each time, up to 1.4 times the
# base. A status that just changed is looked at again soon (a short render ends within an
# interval or two of starting); one that keeps not changing costs at most 1 / LAG_FACTOR of the
# polls of a fixed interval, and is seen at most LAG_FACTOR times the base after it changes.
GROWTH = 1.2
LAG_FACTOR = 1.4


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """Bounds: ``initial`` and ``maximum`` seconds between polls, and between retries."""

    initial: float
    maximum: float

    def base(self, kind: Kind, status: RemoteStatus | None) -> float:
        """The shortest delay for this kind and status."""
        factor = KIND_FACTOR[kind] * STATUS_FACTOR.get(status, 1.0)
        return min(self.maximum, self.initial * factor)

    def interval(self, kind: Kind, status: RemoteStatus | None, attempt: int) -> float:
        """The delay after ``attempt`` polls in a row found ``status`` unchanged: the base,
        ``GROWTH`` times longer per such poll, at most ``LAG_FACTOR`` times the base (and
        ``maximum``)."""
        growth = min(LAG_FACTOR, GROWTH ** min(max(attempt, 0), MAX_EXPONENT))
        return min(self.maximum, self.base(kind, status) * growth)

    def retry_delay(
        self, failures: int, rng: random.Random, retry_after: float | None = None
    ) -> float:
        """Seconds until the next try after ``failures`` consecutive faults.

        A server's ``Retry-After`` is a floor: we never come back sooner than it asked.
        """
        ceiling = min(self.maximum, self.initial * 2.0 ** min(max(failures, 0), MAX_EXPONENT))
        delay = rng.uniform(min(self.initial, ceiling), ceiling)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


@dataclass(frozen=True, slots=True)
class GiveUpLimits:
    """When downloading a project's outputs stops being worth another try.

    Only a lack of progress gives up, never a total count of failures: ``stalled_tries`` tries
    in a row that gained no byte and saved no output, over at least ``stalled_seconds`` (so an
    outage of the CDN is waited out, with backoff), or ``refused_links`` fresh links in a row
    refused (no usable URL is left). A try that gained bytes, or saved an output, starts over.
    """

    stalled_tries: int = 8
    stalled_seconds: float = 1800.0
    refused_links: int = 3


def stalled_for_good(
    limits: GiveUpLimits, *, failures: int, stalled_since: float, now: float
) -> bool:
    """Whether ``failures`` tries in a row without progress, the first at ``stalled_since``,
    are reason enough to give the project up."""
    return failures >= limits.stalled_tries and now - stalled_since >= limits.stalled_seconds


def next_attempt(previous: RemoteStatus | None, current: RemoteStatus, attempt: int) -> int:
    """The attempt counter after a poll: it restarts when the status changed."""
    return 0 if previous != current else attempt + 1
