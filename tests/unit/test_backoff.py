"""Unit tests of :mod:`watcher.backoff`: the shortest poll delay, and retry delays drawn from a
seeded random source.

hypothesis is not installed, so the properties are checked over an exhaustive grid of kinds,
statuses and attempts and a range of seeds instead.
"""

from __future__ import annotations

import itertools
import random

import pytest

from watcher.backoff import (
    GROWTH,
    KIND_FACTOR,
    LAG_FACTOR,
    STATUS_FACTOR,
    GiveUpLimits,
    PollPolicy,
    next_attempt,
    stalled_for_good,
)
from watcher.models import Kind, RemoteStatus

POLICY = PollPolicy(initial=2.0, maximum=60.0)
STATUSES: list[RemoteStatus | None] = [None, *RemoteStatus]
ATTEMPTS = [-3, -1, 0, 1, 2, 3, 5, 8, 13, 29, 30, 31, 64, 1_000, 10**9]
SEEDS = range(25)


def _base(kind: Kind, status: RemoteStatus | None, policy: PollPolicy = POLICY) -> float:
    """The documented lower bound, computed independently of the policy's own method."""
    return min(policy.maximum, policy.initial * KIND_FACTOR[kind] * STATUS_FACTOR.get(status, 1.0))


@pytest.mark.parametrize(("kind", "status"), list(itertools.product(Kind, STATUSES)))
def test_base_is_the_initial_delay_scaled_by_kind_and_status(
    kind: Kind, status: RemoteStatus | None
) -> None:
    """The shortest delay is the initial one times the kind's and the status's factors."""
    assert POLICY.base(kind, status) == _base(kind, status)


@pytest.mark.parametrize("kind", list(Kind))
def test_queued_waits_longer_than_rendering(kind: Kind) -> None:
    """A queued project must still render before it can finish: it waits twice as long."""
    assert POLICY.base(kind, RemoteStatus.QUEUED) == 2 * POLICY.base(kind, RemoteStatus.RENDERING)


@pytest.mark.parametrize("status", STATUSES)
def test_video_waits_longer_than_audio_longer_than_image(status: RemoteStatus | None) -> None:
    """Videos render slowest and images fastest, and are polled accordingly."""
    image, audio, video = (
        POLICY.base(kind, status) for kind in (Kind.IMAGE, Kind.AUDIO, Kind.VIDEO)
    )
    assert image < audio < video


def test_draft_is_polled_rarely_and_terminal_statuses_like_unknown() -> None:
    """A draft waits longest; statuses without a factor use the plain kind factor."""
    assert POLICY.base(Kind.IMAGE, RemoteStatus.DRAFT) == 8.0
    assert POLICY.base(Kind.IMAGE, RemoteStatus.COMPLETE) == 2.0
    assert POLICY.base(Kind.VIDEO, None) == 5.0


def test_base_above_the_maximum_is_clamped() -> None:
    """When kind and status factors push the base past the maximum, it is the maximum."""
    policy = PollPolicy(initial=10.0, maximum=12.0)
    assert policy.base(Kind.VIDEO, RemoteStatus.DRAFT) == 12.0


@pytest.mark.parametrize(("kind", "status"), list(itertools.product(Kind, STATUSES)))
def test_the_interval_backs_off_from_the_base_to_the_lag_bound(
    kind: Kind, status: RemoteStatus | None
) -> None:
    """Each poll at an unchanged status waits GROWTH times longer, never below the base nor
    above LAG_FACTOR times it, whatever the attempt counter says (a negative or huge one too)."""
    base = _base(kind, status)
    intervals = [POLICY.interval(kind, status, attempt) for attempt in ATTEMPTS]
    assert intervals == sorted(intervals)
    for attempt, interval in zip(ATTEMPTS, intervals, strict=True):
        assert base <= interval <= min(POLICY.maximum, LAG_FACTOR * base)
        if attempt <= 0:
            assert interval == base
    assert intervals[-1] == min(POLICY.maximum, LAG_FACTOR * base)


def test_the_interval_grows_by_a_fifth_per_unchanged_poll() -> None:
    """1, 1.2, then the bound of 1.4 times the base: a gentle backoff, reached in two polls."""
    policy = PollPolicy(initial=1.0, maximum=60.0)
    steps = [policy.interval(Kind.IMAGE, RemoteStatus.RENDERING, a) for a in range(5)]
    assert steps == pytest.approx([1.0, GROWTH, LAG_FACTOR, LAG_FACTOR, LAG_FACTOR])
    assert policy.interval(Kind.VIDEO, RemoteStatus.QUEUED, 9) == pytest.approx(2.5 * 2 * 1.4)


def test_the_interval_never_exceeds_the_maximum() -> None:
    """A base near POLL_MAX backs off no further than POLL_MAX."""
    policy = PollPolicy(initial=10.0, maximum=12.0)
    assert policy.interval(Kind.IMAGE, RemoteStatus.RENDERING, 0) == 10.0
    assert policy.interval(Kind.IMAGE, RemoteStatus.RENDERING, 5) == 12.0


@pytest.mark.parametrize(
    ("previous", "current", "attempt", "expected"),
    [
        (None, RemoteStatus.QUEUED, 0, 0),
        (None, RemoteStatus.QUEUED, 9, 0),
        (RemoteStatus.QUEUED, RemoteStatus.QUEUED, 0, 1),
        (RemoteStatus.QUEUED, RemoteStatus.QUEUED, 6, 7),
        (RemoteStatus.QUEUED, RemoteStatus.RENDERING, 6, 0),
        (RemoteStatus.RENDERING, RemoteStatus.QUEUED, 3, 0),
    ],
)
def test_attempt_counter_restarts_on_a_status_change(
    previous: RemoteStatus | None, current: RemoteStatus, attempt: int, expected: int
) -> None:
    """The attempt counter grows at one status and restarts when the status changes."""
    assert next_attempt(previous, current, attempt) == expected


@pytest.mark.parametrize("failures", [-1, 0, 1, 2, 3, 4, 5, 6, 10, 31, 10**9])
def test_retry_delay_stays_within_its_bounds(failures: int) -> None:
    """A retry waits between the initial delay and ``min(maximum, initial * 2**failures)``."""
    ceiling = min(POLICY.maximum, POLICY.initial * 2.0 ** min(max(failures, 0), 30))
    for seed in SEEDS:
        delay = POLICY.retry_delay(failures, random.Random(seed))
        assert POLICY.initial <= delay <= ceiling


def test_retry_delay_grows_with_failures() -> None:
    """More consecutive failures give longer waits on average, up to the cap."""
    rng = random.Random(5)
    means = [sum(POLICY.retry_delay(f, rng) for _ in range(300)) / 300 for f in range(6)]
    assert means == sorted(means)
    assert means[-1] > 4 * means[0]


def test_retry_after_is_a_floor() -> None:
    """A server's Retry-After is honoured even past the maximum, and never shortens the wait."""
    assert POLICY.retry_delay(0, random.Random(1), retry_after=500.0) == 500.0
    for seed in SEEDS:
        drawn = POLICY.retry_delay(4, random.Random(seed))
        assert POLICY.retry_delay(4, random.Random(seed), retry_after=0.0) == drawn
        assert POLICY.retry_delay(4, random.Random(seed), retry_after=drawn + 1) == drawn + 1


def test_a_download_is_given_up_only_on_a_run_both_long_and_lasting() -> None:
    """Neither many quick tries (a short outage) nor a few slow ones give up: it takes the
    limit's number of tries in a row spanning at least its seconds."""
    limits = GiveUpLimits(stalled_tries=8, stalled_seconds=1800.0, refused_links=3)
    t0 = 1_000_000.0

    def gives_up(failures: int, seconds: float) -> bool:
        return stalled_for_good(limits, failures=failures, stalled_since=t0, now=t0 + seconds)

    assert not gives_up(1_000, 120.0)  # a two-minute outage, however many tries it took
    assert not gives_up(7, 86_400.0)  # slow tries, but too few of them
    assert gives_up(8, 1800.0)
    assert gives_up(50, 7200.0)


def test_the_default_limits_wait_out_a_two_minute_outage() -> None:
    """The shipped limits keep trying through an outage of minutes with the default backoff."""
    limits = GiveUpLimits()
    assert limits.stalled_seconds >= 600.0
    policy = PollPolicy(initial=2.0, maximum=60.0)
    rng = random.Random(1)
    elapsed, failures = 0.0, 0
    while elapsed < 120.0:
        failures += 1
        assert not stalled_for_good(limits, failures=failures, stalled_since=0.0, now=elapsed)
        elapsed += policy.retry_delay(failures, rng)
