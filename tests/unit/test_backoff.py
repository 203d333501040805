"""Unit tests of :mod:`watcher.backoff`: poll and retry delays, drawn from a seeded random source.

hypothesis is not installed, so the properties are checked over an exhaustive grid of kinds,
statuses and attempts and a range of seeds instead.
"""

from __future__ import annotations

import itertools
import random

import pytest

from watcher.backoff import KIND_FACTOR, STATUS_FACTOR, PollPolicy, next_attempt
from watcher.models import Kind, RemoteStatus

POLICY = PollPolicy(initial=2.0, maximum=60.0)
STATUSES: list[RemoteStatus | None] = [None, *RemoteStatus]
ATTEMPTS = [-3, -1, 0, 1, 2, 3, 5, 8, 13, 29, 30, 31, 64, 1_000, 10**9]
SEEDS = range(25)


def _base(kind: Kind, status: RemoteStatus | None, policy: PollPolicy = POLICY) -> float:
    """The documented lower bound, computed independently of the policy's own method."""
    return min(policy.maximum, policy.initial * KIND_FACTOR[kind] * STATUS_FACTOR.get(status, 1.0))


@pytest.mark.parametrize(("kind", "status"), list(itertools.product(Kind, STATUSES)))
def test_poll_delay_stays_within_its_bounds(kind: Kind, status: RemoteStatus | None) -> None:
    """Every delay lies in ``[base, min(maximum, base * 2**attempt)]`` for any attempt and seed."""
    base = _base(kind, status)
    for seed, attempt in itertools.product(SEEDS, ATTEMPTS):
        delay = POLICY.poll_delay(kind, status, attempt, random.Random(seed))
        ceiling = min(POLICY.maximum, base * 2.0 ** min(max(attempt, 0), 30))
        assert base <= delay <= ceiling, (seed, attempt, delay)


@pytest.mark.parametrize(("kind", "status"), list(itertools.product(Kind, STATUSES)))
def test_first_poll_waits_exactly_the_base(kind: Kind, status: RemoteStatus | None) -> None:
    """Right after a status change (attempt 0, or a bogus negative one) the delay is the base."""
    for seed in SEEDS:
        assert POLICY.poll_delay(kind, status, 0, random.Random(seed)) == _base(kind, status)
        assert POLICY.poll_delay(kind, status, -5, random.Random(seed)) == _base(kind, status)


def test_poll_delay_is_jittered_across_the_whole_window() -> None:
    """Later attempts are spread over the window instead of all landing on one value."""
    rng = random.Random(7)
    delays = [POLICY.poll_delay(Kind.IMAGE, RemoteStatus.RENDERING, 4, rng) for _ in range(500)]
    assert min(delays) < 2.0 + 3.0
    assert max(delays) > 32.0 - 3.0
    assert len(set(delays)) > 400


def test_same_seed_gives_the_same_schedule() -> None:
    """The schedule is reproducible from the seed alone."""
    first = [POLICY.poll_delay(Kind.VIDEO, None, a, random.Random(3)) for a in range(10)]
    again = [POLICY.poll_delay(Kind.VIDEO, None, a, random.Random(3)) for a in range(10)]
    assert first == again


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("attempt", [0, 1, 2, 4, 10])
def test_queued_waits_longer_than_rendering(kind: Kind, attempt: int) -> None:
    """With the same random draw, a queued project is never polled sooner than a rendering one."""
    for seed in SEEDS:
        queued = POLICY.poll_delay(kind, RemoteStatus.QUEUED, attempt, random.Random(seed))
        rendering = POLICY.poll_delay(kind, RemoteStatus.RENDERING, attempt, random.Random(seed))
        assert queued >= rendering
    assert POLICY.base(kind, RemoteStatus.QUEUED) == 2 * POLICY.base(kind, RemoteStatus.RENDERING)


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("attempt", [0, 1, 3])
def test_video_waits_longer_than_audio_longer_than_image(
    status: RemoteStatus | None, attempt: int
) -> None:
    """With the same random draw, videos wait longest and images least."""
    for seed in SEEDS:
        image, audio, video = (
            POLICY.poll_delay(kind, status, attempt, random.Random(seed))
            for kind in (Kind.IMAGE, Kind.AUDIO, Kind.VIDEO)
        )
        assert image <= audio <= video
    assert POLICY.base(Kind.IMAGE, status) < POLICY.base(Kind.VIDEO, status)


def test_draft_is_polled_rarely_and_terminal_statuses_like_unknown() -> None:
    """A draft waits longest; statuses without a factor use the plain kind factor."""
    assert POLICY.base(Kind.IMAGE, RemoteStatus.DRAFT) == 8.0
    assert POLICY.base(Kind.IMAGE, RemoteStatus.COMPLETE) == 2.0
    assert POLICY.base(Kind.VIDEO, None) == 5.0


def test_delays_are_capped_at_the_maximum() -> None:
    """However many polls at one status, no delay exceeds the maximum, and it is reached."""
    rng = random.Random(1)
    delays = [POLICY.poll_delay(Kind.VIDEO, RemoteStatus.QUEUED, 10**6, rng) for _ in range(2_000)]
    assert max(delays) <= POLICY.maximum
    assert max(delays) > POLICY.maximum - 1.0


def test_base_above_the_maximum_is_clamped() -> None:
    """When kind and status factors push the base past the maximum, every delay is the maximum."""
    policy = PollPolicy(initial=10.0, maximum=12.0)
    for attempt in (0, 1, 50):
        delay = policy.poll_delay(Kind.VIDEO, RemoteStatus.DRAFT, attempt, random.Random(attempt))
        assert delay == 12.0


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


def test_project_that_starts_rendering_is_looked_at_promptly() -> None:
    """After many queued polls, the first delay at ``rendering`` is back to the short base."""
    attempt = 0
    previous: RemoteStatus | None = None
    for _ in range(12):
        attempt = next_attempt(previous, RemoteStatus.QUEUED, attempt)
        previous = RemoteStatus.QUEUED
    assert attempt == 11
    attempt = next_attempt(previous, RemoteStatus.RENDERING, attempt)
    delay = POLICY.poll_delay(Kind.IMAGE, RemoteStatus.RENDERING, attempt, random.Random(0))
    assert delay == 2.0


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
