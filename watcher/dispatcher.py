"""The dispatcher: claiming due work, the registry of running work, and its leases.

:class:`Dispatcher` is the daemon's producer (River's word): its claim loop asks the store for
due projects, as many as there is room for (one alone while :mod:`watcher.health` probes after a
refusal), and starts one task per claim running :meth:`watcher.workflow.Workflow.run`; its renew
loop renews every running task's lease each third of a lease. A task whose lease is refused
twice in a row is stopped (another replica holds the project now); a claim of a project whose
own task still runs (our lease ran out meanwhile) stops that task first and carries on under the
new lease.

It owns the store-outage pause too (:class:`watcher.outage.StoreHealth` keeps the facts): while
the store does not answer it claims nothing and probes with a write after a backoff, renewing
the leases held first. What the work does to a project is :mod:`watcher.workflow`'s; when the
daemon starts and stops is :mod:`watcher.daemon`'s.

On a store shared by replicas it claims only while this replica can prove it is alive
(:mod:`watcher.liveness`): when that proof is lost it stops all the work it runs at once
(:meth:`Dispatcher.stop_all_work`: another replica may be taking it over), and once it is back
it releases what is still leased in its name and claims again (:meth:`Dispatcher.carry_on`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

import structlog

from watcher import clock
from watcher.announcements import Announcements, Verdict
from watcher.errors import StoreError
from watcher.health import ApiHealth
from watcher.metrics import Metrics
from watcher.models import ProjectSnapshot, State
from watcher.outage import StoreHealth
from watcher.store import Claim, Claimed, ProjectRecord, Store
from watcher.workflow import Workflow

log = structlog.get_logger("watcher")

IDLE_CHECK_SECONDS = 1.0
RELEASE_CHECK_SECONDS = 0.2  # how often a webhook's follow-up looks whether the GET ended
# An announced project (a webhook payload waits for it) is due at the epoch: first in the claim
# order, ahead of every project merely overdue, since acting on it needs no GET.
ANNOUNCED_DUE_AT = 0.0


@dataclass(kw_only=True, eq=False, repr=False)
class Dispatcher:
    """Claims due work and runs it; see the module docstring."""

    store: Store
    health: ApiHealth
    store_health: StoreHealth
    owner: str
    lease_seconds: float
    max_in_flight: int
    claim_interval: float = IDLE_CHECK_SECONDS
    stopping: asyncio.Event
    until_done: bool = False
    on_done: Callable[[], None] = lambda: None  # until_done: nothing is left
    metrics: Metrics = field(default_factory=Metrics)
    announcements: Announcements
    now: Callable[[], float] = clock.now
    # Whether this replica can prove it is alive (always, on a store one process works on).
    proven: Callable[[], bool] = lambda: True
    workflow: Workflow | None = field(init=False, default=None)  # set before the loops start
    claimed: set[str] = field(init=False, default_factory=set)  # every project claimed here
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _running: dict[str, tuple[asyncio.Task[None], Claim]] = field(init=False, default_factory=dict)
    # (project id, lease version)
    _renewals_refused: set[tuple[str, int]] = field(init=False, default_factory=set)
    _background: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def wake(self) -> None:
        """Look for due work now (a project was tracked or expedited, or work ended)."""
        self._wake.set()

    def working_on(self, project_id: str) -> bool:
        """Whether work on ``project_id`` runs here now."""
        return project_id in self._running

    @property
    def _workflow(self) -> Workflow:
        if self.workflow is None:
            raise RuntimeError("the dispatcher has no workflow to run")
        return self.workflow

    @property
    def _stopping(self) -> bool:
        return self.stopping.is_set()

    async def claim_loop(self) -> None:
        """Claim due work until the daemon stops (or, ``until_done``, nothing is left)."""
        while not self._stopping:
            self._wake.clear()
            self.store_health.settle()
            try:
                if self.store_health.down:
                    await self._probe_store()
                elif await self._dispatch_once():
                    return
            except StoreError as exc:
                self.store_failed(exc, during="claim")

    async def _dispatch_once(self) -> bool:
        """Claim what is due, then wait until more is; ``True`` when the run is over."""
        now = self.now()
        if self.until_done and not self._running and await self.store.next_due_at() is None:
            log.info("daemon_done")
            self.on_done()
            return True
        if self.health.unauthorized and self.until_done:
            self.on_done()
            return True
        claimed = None
        if not self.health.paused(now) and self.proven():
            claimed = await self._claim(now)
        await self._sleep_until_due(now, claimed)
        return False

    def store_failed(self, exc: StoreError, *, during: str) -> None:
        """A store call failed: the outage begins (or goes on); the dispatch loop probes."""
        self.store_health.failed(exc, during=during)
        self._wake.set()

    async def _probe_store(self) -> None:
        """During an outage: after the backoff, try a write (SQLite may be readable while another
        process holds its write lock). It renews the leases held, first, so that no claim of
        ours (nor another replica's) takes over the work in flight; with no work running, it
        releases whatever lease is still in this replica's name (none, or a crashed task's).
        Raises :class:`StoreError` while the store still does not answer."""
        await clock.wait(self.stopping, self.store_health.next_delay())
        if self._stopping:
            return
        now = self.now()
        if any(not task.done() for task, _ in self._running.values()):
            await self._renew_all(now)
        else:
            await self.store.release_leases(now=now, owner=self.owner)
        self.store_health.recovered()

    async def _claim(self, now: float) -> Claimed | None:
        """Lease what is due, as much as there is room for, and start its work; ``None`` when
        there is no room (nothing was asked of the store)."""
        room = self.max_in_flight - len(self._running)
        probing = self.health.probing
        if room <= 0 or (probing and self._running):
            return None
        limit = 1 if probing else room
        claimed = await self.store.claim_due_and_next(
            now=now, limit=limit, owner=self.owner, lease_seconds=self.lease_seconds
        )
        for claim in claimed.claims:
            self.claimed.add(claim.id)
            stale = self._running.get(claim.id)
            if stale is not None:
                # Our own lease ran out while the work went on (the store missed renewals, or the
                # loop stalled): that task can no longer write. Stop it and carry on under the
                # new lease once it has stopped (a download's .part stays for resuming).
                log.warning("lease_expired_while_working", project_id=claim.id)
                stale[0].cancel()
            after = None if stale is None else stale[0]
            task = asyncio.create_task(self._work(claim, after=after), name=f"project-{claim.id}")
            self._running[claim.id] = (task, claim)
        self.metrics.in_flight.set(len(self._running))
        return claimed

    async def _sleep_until_due(self, now: float, claimed: Claimed | None) -> None:
        """Wait for a wake-up (work finished, project tracked, here or, on PostgreSQL, on any
        replica) or until work is due, at most ``claim_interval`` (another process may have
        tracked projects in a SQLite database meanwhile). When work is next due comes with
        the claim just made, if one was."""
        timeout: float | None
        if len(self._running) >= self.max_in_flight or (self.health.probing and self._running):
            timeout = None
        elif self.health.paused(now):
            timeout = min(self.health.paused_until - now, self.claim_interval)
        else:
            due = claimed.next_due_at if claimed is not None else await self.store.next_due_at()
            idle = self.claim_interval
            timeout = idle if due is None else min(max(0.0, due - now), idle)
        if timeout == 0.0:
            await asyncio.sleep(0)  # claimed a full batch: yield, then claim more
            return
        await clock.wait(self._wake, timeout)

    async def renew_loop(self) -> None:
        """Renew the leases of the work running, every third of a lease."""
        interval = self.lease_seconds / 3
        while not self._stopping:
            await clock.wait(self.stopping, interval)
            if self._stopping or self.store_health.down:
                continue  # the dispatch loop's probe renews every lease once the store is back
            try:
                await self._renew_all(self.now())
            except StoreError as exc:
                self.store_failed(exc, during="lease renewal")

    async def _renew_all(self, now: float) -> None:
        """Renew the lease of every running piece of work; stop work refused twice in a row."""
        refused: set[tuple[str, int]] = set()
        for task, claim in list(self._running.values()):
            if task.done():
                continue
            if await self.store.renew(claim, now=now, lease_seconds=self.lease_seconds):
                continue
            refused.add((claim.id, claim.version))
            if (claim.id, claim.version) in self._renewals_refused and not task.done():
                self._stop_lost_work(task, claim)
        self._renewals_refused = refused

    def _stop_lost_work(self, task: asyncio.Task[None], claim: Claim) -> None:
        """Two renewals in a row were refused and the work still runs: another replica holds
        the project now (or it was untracked), so stop at once, as two replicas must never
        download one output together. (One refusal alone proves nothing: work that has just
        released its lease, and is finishing, is refused once too.)"""
        log.warning(
            "lease_lost", project_id=claim.id, kind=claim.project.kind.value, during="renewal"
        )
        task.cancel()

    def stop_all_work(self) -> int:
        """This replica can no longer prove it is alive, so another may be taking its projects
        over right now: stop every piece of work at once (nothing more is sent or written for
        it; a download's ``.part`` stays). Returns how many were stopped."""
        running = [task for task, _ in self._running.values() if not task.done()]
        for task in running:
            task.cancel()
        return len(running)

    async def carry_on(self) -> None:
        """This replica proves it is alive again: once the stopped work has ended, release what
        is still leased in its name (due now, for whoever claims first) and claim again."""
        running = [task for task, _ in self._running.values()]
        if running:
            await asyncio.wait(running)
        try:
            await self.store.release_leases(now=self.now(), owner=self.owner)
        except StoreError as exc:  # the outage probe releases them once the store answers
            self.store_failed(exc, during="claim")
        self._wake.set()

    async def _work(self, claim: Claim, *, after: asyncio.Task[None] | None = None) -> None:
        p = claim.project
        try:
            if after is not None:  # the task of our expired lease, being cancelled
                await asyncio.wait([after])
            await self._workflow.run(claim)
        finally:
            if self._running.get(p.id, (None, None))[1] is claim:  # not a successor's entry
                del self._running[p.id]
                if self.announcements.waiting(p.id):  # it came while the work was writing
                    self._in_background(self._expedite({p.id}, now=ANNOUNCED_DUE_AT))
            self.metrics.in_flight.set(len(self._running))
            self._wake.set()

    async def drain(self, grace: float) -> None:
        """Let the running work finish for ``grace`` seconds, then cancel the rest."""
        tasks = [task for task, _ in self._running.values()]
        if tasks:
            log.info("shutdown_draining", in_flight=len(tasks))
            # Paused (token refused, payment required), calls wait on a long pause: not worth
            # waiting for; a cancelled download keeps its .part for the next run.
            grace = 0.0 if self.health.stopped else grace
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning("shutdown_cancelled_work", cancelled=len(pending))
        for task in self._background:  # expedites: the projects are due again anyway
            task.cancel()

    def release_held(self, held: set[str]) -> None:
        """Make the projects a refused token put off to the next recheck due now."""
        if held:
            self._in_background(self._expedite(held))
        self._wake.set()

    async def expedite(self, record: ProjectRecord) -> bool:
        """Make the active project of ``record`` due now. If a GET of it is in flight (here or
        on another replica), that GET may have been answered before the change that made it
        due: poll once more as soon as that work releases the project, instead of after a long
        backoff. Returns whether such a follow-up is arranged."""
        await self.store.expedite(record.id, now=self.now())
        self._wake.set()
        if record.state == State.POLLING and record.lease_owner is not None:
            self._in_background(self._expedite_when_released(record.id))
            return True
        return False

    async def announce(
        self, record: ProjectRecord, snapshot: ProjectSnapshot
    ) -> tuple[str, str | None]:
        """A verified webhook's payload about the ``polling`` project of ``record``: act on it
        as on a GET's answer (:mod:`watcher.announcements`). The payload waits for the
        project's next claim, which is made due first; the work that claims it takes the
        payload instead of a GET. A poll of it in flight here takes the payload once its GET
        is answered; one on another replica is followed as :meth:`expedite` follows it.
        Returns the webhook's (action, note): ``announced``; ``expedited`` when the payload
        lacks what a GET gives; ``ignored`` when it is stale."""
        verdict = self.announcements.put(record, snapshot)
        if verdict == Verdict.STALE:
            known = record.remote_status.value if record.remote_status else None
            return "ignored", f"stale: {snapshot.status.value}, and {known} is known"
        if verdict == Verdict.LACKING:
            await self.expedite(record)
            return "expedited", "the payload lacks what a GET gives: a GET follows at once"
        await self.store.expedite(record.id, now=ANNOUNCED_DUE_AT)
        self._wake.set()
        if record.lease_owner is not None and not self.working_on(record.id):
            self._in_background(self._expedite_when_released(record.id, due=ANNOUNCED_DUE_AT))
        return "announced", None

    async def _expedite_when_released(self, project_id: str, due: float | None = None) -> None:
        deadline = clock.monotonic() + self.lease_seconds
        while not self._stopping and clock.monotonic() < deadline:
            await asyncio.sleep(RELEASE_CHECK_SECONDS)
            record = await self.store.get(project_id)
            if record is None or record.state != State.POLLING:
                return
            if record.lease_owner is None:
                await self.store.expedite(project_id, now=self.now() if due is None else due)
                self._wake.set()
                return

    def _in_background(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _expedite(self, project_ids: set[str], now: float | None = None) -> None:
        now = self.now() if now is None else now
        for pid in sorted(project_ids):
            with contextlib.suppress(StoreError):
                await self.store.expedite(pid, now=now)
        self._wake.set()
