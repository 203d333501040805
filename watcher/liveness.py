"""This replica's proof of life on a store shared with other replicas, and what losing it means.

On PostgreSQL each replica holds a session of its own (:class:`watcher.store.Liveness`: an
advisory lock the server frees the moment the process dies), so the other replicas take a dead
one's projects over at once instead of at their lease's expiry. The other side of that promise
is this module's: a replica whose session is lost (its connection cut, the server gone) cannot
prove any claim it holds, since another replica may be taking it over right now. So:

- :meth:`LivenessKeeper.run` takes the session and keeps it: it checks it every ``check_every``
  seconds and hears the wake-ups of the other replicas on it (``on_due``: tracking, webhooks,
  released leases, a dead replica's leases made due), a burst of them making one wake-up; the
  dispatcher claims nothing before the session is taken;
- when the session is lost, :attr:`LivenessKeeper.proven` turns false and ``on_lost`` runs at
  once: the dispatcher stops the work it holds (nothing more is sent or written for it; a
  download's ``.part`` stays, for whoever resumes it) and claims nothing; ``liveness_lost`` is
  logged once per loss;
- it takes a new session with backoff (the store-outage delays: ``retry_initial`` doubling up to
  ``retry_max``, jittered), and once it holds one again ``on_back`` runs (the dispatcher releases
  what is still leased in its name, so it is due at once, and claims again), and
  ``liveness_restored`` is logged.

- :meth:`LivenessKeeper.find_dead` looks for the other side: every ``takeover_every`` seconds
  it makes the leases of replicas whose session ended due at once
  (:meth:`watcher.store.Store.expire_dead_leases`), logs ``replica_found_dead`` and wakes the
  fleet, which claims them as after a lease expiry.

Leases stay the fence throughout: a write under a claim that another replica took over is
refused (:class:`watcher.store.LeaseLost`), as after a lease expiry. SQLite and the in-memory
store have no session to keep (one process works on them): the daemon makes no keeper for them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field

import structlog

from watcher import clock
from watcher.errors import StoreError
from watcher.metrics import Metrics
from watcher.outage import retry_delay
from watcher.store import Liveness, Store

log = structlog.get_logger("watcher")

# How often the session is checked (a heartbeat write on it): a server that stopped answering
# is noticed within this plus the store's call timeout. A server that ends the session (it
# restarts, an operator or a proxy cuts it) is noticed at once: the session is always reading.
LIVENESS_CHECK_SECONDS = 1.0
# How often a live replica looks for dead ones: a replica killed is taken over within about this
# (the server frees its lock within milliseconds), plus a claim.
TAKEOVER_CHECK_SECONDS = 0.5


@dataclass(eq=False, repr=False)  # compared and shown as itself, as before
class LivenessKeeper:
    """Keeps ``session``, and finds the replicas that died; see the module docstring."""

    session: Liveness
    _: KW_ONLY
    store: Store
    on_due: Callable[[], None]
    on_lost: Callable[[], int]  # stop the work that can no longer be proven; how many stopped
    on_back: Callable[[], Awaitable[None]]
    store_down: Callable[[], bool]
    stopping: asyncio.Event
    retry_initial: float
    retry_max: float
    rng: random.Random
    metrics: Metrics = field(default_factory=Metrics)
    check_every: float = LIVENESS_CHECK_SECONDS
    takeover_every: float = TAKEOVER_CHECK_SECONDS
    now: Callable[[], float] = clock.now
    _held: bool = field(default=False, init=False)

    @property
    def proven(self) -> bool:
        """Whether this replica holds its session now: it may claim, and its claims hold."""
        return self._held

    async def run(self) -> None:
        """Take the session, keep it until the daemon stops, take it again after each loss."""
        try:
            await self._take(first=True)
            while not self.stopping.is_set():
                try:
                    await self.session.watch(self.on_due, every=self.check_every)
                except StoreError as exc:
                    self._lost(exc)
                    await self._take(first=False)
        finally:
            self._set_held(held=False)

    def _lost(self, exc: StoreError, *, stopped: int | None = None) -> None:
        self._set_held(held=False)
        log.warning(
            "liveness_lost",
            error=str(exc),
            stopped=self.on_lost() if stopped is None else stopped,
            action="claiming stopped and the work held stopped (another replica may take it "
            f"over now); taking a new session with backoff up to {self.retry_max:g} s",
        )

    async def _take(self, *, first: bool) -> None:
        """Take a session (at once the first time, else after a backoff), trying until it is
        taken or the daemon stops; then let the dispatcher claim (again)."""
        since = clock.monotonic()
        failures = 0 if first else 1
        while not self.stopping.is_set():
            if failures:
                delay = retry_delay(
                    failures, self.rng, initial=self.retry_initial, maximum=self.retry_max
                )
                await clock.wait(self.stopping, delay)
                if self.stopping.is_set():
                    return
            try:
                await self.session.take()
            except StoreError as exc:
                if first and not failures:
                    self._lost(exc, stopped=0)
                failures += 1
                continue
            if failures:
                log.info(
                    "liveness_restored",
                    down_seconds=round(clock.monotonic() - since, 1),
                    attempts=failures,
                )
                await self.on_back()  # before any claim: what it releases is no claim's
            self._set_held(held=True)
            self.on_due()
            return

    async def find_dead(self) -> None:
        """Every ``takeover_every`` seconds, while this replica is alive and the store answers:
        make the leases of replicas found dead due now, waking the fleet to take them over."""
        while not self.stopping.is_set():
            await clock.wait(self.stopping, self.takeover_every)
            if self.stopping.is_set() or not self._held or self.store_down():
                continue
            try:
                expired = await self.store.expire_dead_leases(now=self.now())
            except StoreError:
                continue  # the dispatcher's next call finds the outage, if it is one
            by_owner: dict[str, int] = {}
            for owner in expired.values():
                by_owner[owner] = by_owner.get(owner, 0) + 1
            for owner, count in sorted(by_owner.items()):
                log.warning("replica_found_dead", replica=owner, leases=count)
                self.metrics.leases_taken_over.inc(count)
            if expired:
                self.on_due()

    def _set_held(self, *, held: bool) -> None:
        self._held = held
        self.metrics.liveness_held.set(1 if held else 0)

    async def close(self) -> None:
        """End the session (after the leases were released, at shutdown)."""
        self._set_held(held=False)
        await self.session.close()
