"""The learned polling schedule: sparse before renders usually end, dense while they do (backing
off gently at an unchanged status, up to the lag bound), logarithmic after.

Each simulation is driven by a fake clock: the project's age, advanced by the delays the schedule
returns, with the attempt counter kept as the workflow keeps it (:func:`next_attempt`)."""

from __future__ import annotations

import random

from watcher.backoff import LAG_FACTOR, PollPolicy, next_attempt
from watcher.models import Kind, RemoteStatus
from watcher.schedule import COLD_WINDOW, MIN_SAMPLES, RenderStats, next_poll_delay

POLICY = PollPolicy(initial=1.0, maximum=60.0)
LAG_BOUND = LAG_FACTOR * POLICY.initial  # the longest interval inside the window, for images


def polls_until(
    finish: float,
    window: tuple[float, float] | None,
    seed: int = 1,
    *,
    backoff: bool = True,
    queued_until: float = 0.0,
) -> tuple[int, float]:
    """Simulate one project, queued until ``queued_until`` and rendering until ``finish``, polled
    first at age 0: (GETs spent, lag after the finish). ``backoff=False`` keeps the attempt
    counter at 0: the fixed interval the schedule used before it backed off."""
    rng = random.Random(seed)
    age, polls, attempt, seen = 0.0, 1, 0, RemoteStatus.QUEUED
    if queued_until <= 0:
        seen = RemoteStatus.RENDERING
    while age < finish:
        age += next_poll_delay(
            POLICY, Kind.IMAGE, seen, age=age, attempt=attempt, rng=rng, window=window
        )
        polls += 1
        status = RemoteStatus.QUEUED if age < queued_until else RemoteStatus.RENDERING
        attempt = next_attempt(seen, status, attempt) if backoff else 0
        seen = status
    return polls, age - finish


def test_window_needs_enough_samples_and_follows_the_percentiles() -> None:
    """No window until MIN_SAMPLES durations are known; then the 2nd and 98th percentiles."""
    stats = RenderStats()
    for i in range(MIN_SAMPLES - 1):
        stats.add(Kind.IMAGE, 5.0 + i)
    assert stats.window(Kind.IMAGE) is None
    for i in range(100):
        stats.add(Kind.IMAGE, 5.0 + i * 0.03)
    low, high = stats.window(Kind.IMAGE) or (0, 0)
    assert 5.0 <= low < 5.2
    assert 7.5 < high <= 16.0
    assert stats.window(Kind.VIDEO) is None


def test_old_samples_leave_the_window() -> None:
    """Only the most recent durations count: a kind that became slow is learned again."""
    stats = RenderStats(size=20)
    for _ in range(20):
        stats.add(Kind.AUDIO, 2.0)
    for _ in range(20):
        stats.add(Kind.AUDIO, 50.0)
    assert stats.window(Kind.AUDIO) == (50.0, 50.0)
    assert stats.count(Kind.AUDIO) == 20


def test_loading_replaces_a_kinds_samples_and_keeps_the_latest() -> None:
    """Durations read back from the store replace that kind's samples; the newest are kept."""
    stats = RenderStats(size=20)
    for _ in range(20):
        stats.add(Kind.IMAGE, 99.0)
    stats.add(Kind.VIDEO, 7.0)
    stats.load(Kind.IMAGE, [1.0] * 10 + [3.0] * 20 + [-1.0])  # oldest first; a negative is noise
    assert stats.count(Kind.IMAGE) == 20
    assert stats.window(Kind.IMAGE) == (3.0, 3.0)
    assert stats.count(Kind.VIDEO) == 1
    stats.add(Kind.IMAGE, 4.0)  # learning goes on after a load
    assert stats.count(Kind.IMAGE) == 20
    assert stats.window(Kind.IMAGE) == (3.0, 4.0)


def test_sleeps_until_the_window_opens() -> None:
    """A young project waits for the usual window instead of polling, capped at POLL_MAX."""
    rng = random.Random(0)
    assert (
        next_poll_delay(
            POLICY,
            Kind.IMAGE,
            RemoteStatus.QUEUED,
            age=1.0,
            attempt=0,
            rng=rng,
            window=(20.0, 30.0),
        )
        == 19.0
    )
    assert (
        next_poll_delay(
            POLICY, Kind.IMAGE, None, age=0.0, attempt=0, rng=rng, window=(500.0, 900.0)
        )
        == 60.0
    )


def test_dense_inside_the_window_and_scaled_by_kind() -> None:
    """Inside the window the delay is the initial interval (jittered down by at most 25 %)."""
    rng = random.Random(0)
    for age in (20.0, 25.0, 30.0):
        image = next_poll_delay(
            POLICY,
            Kind.IMAGE,
            RemoteStatus.RENDERING,
            age=age,
            attempt=0,
            rng=rng,
            window=(20.0, 30.0),
        )
        video = next_poll_delay(
            POLICY,
            Kind.VIDEO,
            RemoteStatus.RENDERING,
            age=age,
            attempt=0,
            rng=rng,
            window=(20.0, 30.0),
        )
        assert 0.75 <= image <= 1.0
        assert 0.75 * 2.5 <= video <= 2.5


def test_past_the_window_delays_grow_with_the_overrun() -> None:
    """A render far past its usual end is polled less and less often, never beyond POLL_MAX."""
    rng = random.Random(0)
    delays = [
        next_poll_delay(
            POLICY,
            Kind.IMAGE,
            RemoteStatus.RENDERING,
            age=age,
            attempt=0,
            rng=rng,
            window=(5.0, 10.0),
        )
        for age in (12.0, 30.0, 100.0, 10_000.0)
    ]
    assert delays == sorted(delays)
    assert delays[0] <= 1.0
    assert 45.0 <= delays[-1] <= 60.0


def test_cold_start_watches_closely_then_backs_off() -> None:
    """Without samples, the first COLD_WINDOW seconds are dense, later ones sparse."""
    rng = random.Random(0)
    early = next_poll_delay(
        POLICY, Kind.IMAGE, RemoteStatus.RENDERING, age=3.0, attempt=0, rng=rng, window=None
    )
    late = next_poll_delay(
        POLICY,
        Kind.IMAGE,
        RemoteStatus.RENDERING,
        age=COLD_WINDOW * 10,
        attempt=0,
        rng=rng,
        window=None,
    )
    assert early <= 1.0
    assert late >= 30.0


def test_learned_window_spends_fewer_requests_for_the_same_lag() -> None:
    """Renders that end between 6 and 8 s: the learned window saves GETs and keeps the lag
    within the bound."""
    cold = [polls_until(6 + i / 50, None, seed=i) for i in range(100)]
    learned = [polls_until(6 + i / 50, (6.0, 8.0), seed=i) for i in range(100)]
    assert max(lag for _, lag in learned) <= LAG_BOUND
    assert sum(p for p, _ in learned) < 0.5 * sum(p for p, _ in cold)


def test_a_queued_project_waits_twice_as_long_and_is_still_seen_in_time() -> None:
    """Queued: polled half as often, yet a render of at least the longest interval is seen
    within the lag bound."""
    rng = random.Random(3)
    queued = [
        next_poll_delay(
            POLICY, Kind.IMAGE, RemoteStatus.QUEUED, age=5.0, attempt=0, rng=rng, window=None
        )
        for _ in range(200)
    ]
    assert min(queued) >= 1.8
    assert max(queued) <= 2.0
    for seed in range(500):  # queued until q, then rendering for r: ends at q + r
        draw = random.Random(seed)
        q, r = draw.uniform(0, 3), draw.uniform(LAG_BOUND, 4)
        _, lag = polls_until(q + r, None, seed, queued_until=q)
        assert lag <= LAG_BOUND + 1e-9


def test_each_unchanged_poll_waits_longer_up_to_the_lag_bound() -> None:
    """Inside the window the interval starts at POLL_INITIAL after a status change and grows
    with every poll that finds the status unchanged, never past LAG_FACTOR times it."""
    for attempt, low, high in [(0, 0.9, 1.0), (1, 1.08, 1.2), (2, 1.26, 1.4), (50, 1.26, 1.4)]:
        for seed in range(50):
            delay = next_poll_delay(
                POLICY,
                Kind.IMAGE,
                RemoteStatus.RENDERING,
                age=10.0,
                attempt=attempt,
                rng=random.Random(seed),
                window=(5.0, 30.0),
            )
            assert low - 1e-9 <= delay <= high + 1e-9


def test_a_status_change_restarts_the_interval() -> None:
    """The first poll that sees a project rendering after many queued ones waits POLL_INITIAL
    again, not the queued interval backed off."""
    rng = random.Random(4)
    age, seen, attempt = 0.0, RemoteStatus.QUEUED, 0
    delays = []
    for status in [RemoteStatus.QUEUED] * 5 + [RemoteStatus.RENDERING] * 4:
        attempt = next_attempt(seen, status, attempt)
        seen = status
        delays.append(
            next_poll_delay(
                POLICY, Kind.IMAGE, status, age=age, attempt=attempt, rng=rng, window=None
            )
        )
        age += delays[-1]
    queued, rendering = delays[:5], delays[5:]
    assert max(queued) <= 2 * LAG_BOUND
    assert min(queued[2:]) >= 0.9 * 2 * LAG_BOUND
    assert 0.9 <= rendering[0] <= 1.0
    assert 0.9 * LAG_BOUND <= rendering[-1] <= LAG_BOUND


def test_a_long_render_costs_fewer_polls_within_the_lag_bound() -> None:
    """Against the fixed interval of POLL_INITIAL: renders of 5-25 s cost over a fifth fewer
    GETs, none is seen later than the bound after it ends, and the mean lag stays below
    three quarters of it."""
    finishes = [5 + i / 5 for i in range(100)]
    fixed = [polls_until(f, None, seed=i, backoff=False) for i, f in enumerate(finishes)]
    backed = [polls_until(f, None, seed=i) for i, f in enumerate(finishes)]
    assert sum(p for p, _ in backed) < 0.8 * sum(p for p, _ in fixed)
    lags = [lag for _, lag in backed]
    assert max(lags) <= LAG_BOUND
    assert sum(lags) / len(lags) < 0.75 * LAG_BOUND


def test_a_render_that_ends_soon_after_it_starts_is_seen_within_one_initial_interval() -> None:
    """A render ending within POLL_INITIAL of the poll that first saw it rendering is seen as
    promptly as with a fixed interval: the backoff only stretches intervals that found nothing."""
    for seed in range(200):
        finish = random.Random(seed).uniform(0.0, 0.9)
        _, lag = polls_until(finish, None, seed)
        assert lag <= POLICY.initial


def test_past_the_window_is_never_denser_than_inside_it() -> None:
    """Leaving the window keeps the backed-off interval as the floor of the overrun delay."""
    for seed in range(50):
        delay = next_poll_delay(
            POLICY,
            Kind.IMAGE,
            RemoteStatus.RENDERING,
            age=10.5,
            attempt=9,
            rng=random.Random(seed),
            window=(5.0, 10.0),
        )
        assert 0.9 * LAG_BOUND <= delay <= LAG_BOUND


def test_draft_is_polled_rarely() -> None:
    """A project sitting in the unused ``draft`` status is looked at four times less often."""
    rng = random.Random(0)
    draft = next_poll_delay(
        POLICY, Kind.IMAGE, RemoteStatus.DRAFT, age=5.0, attempt=0, rng=rng, window=None
    )
    assert draft >= 3.0
