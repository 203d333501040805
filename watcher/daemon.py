"""The daemon: the wiring that turns store, API client and downloader into a running service.

One event loop, one ``asyncio.TaskGroup`` for the long-lived loops (dispatch, lease renewal, and
the HTTP server when enabled): a crash in any of them stops the daemon instead of leaving it half
alive. The dispatch loop claims due projects from the store and runs one task per claimed project:

- ``polling``: GET the project; a non-terminal status is rescheduled with backoff; ``complete``
  records the outputs and goes straight on to download them; ``error``/``canceled``/404 end it.
- ``downloading``: save every output the store lists (earliest ``expires_at`` first across
  projects), refreshing stale URLs with a new GET (which may list outputs the first did not:
  they are saved too); then finish as ``saved`` or go on to delete. It gives up only on a lack
  of progress (:class:`watcher.backoff.GiveUpLimits`), never on a total count of failures.
- ``deleting``: make the store durable, re-check every output is ``saved``, send DELETE.

Crash safety, in one place (see also :mod:`watcher.downloader` for the order of writes of one
file): the store is the source of truth and every transition is one committed transaction made
*after* the side effect it records (a file fsynced and renamed, a DELETE answered), except the
DELETE itself, which is sent only after the store has durably recorded every output ``saved``.
A ``kill -9`` at any instant leaves either the old state (the work is redone: a GET repeated, a
download resumed from its ``.part``, a DELETE re-sent, where a 404 counts as done) or the new one.

A store that does not answer (:class:`StoreUnavailable`; see :mod:`watcher.outage`) ends
nothing: the dispatch loop stops claiming and probes the store with a write after a backoff, the
leases held are renewed first thing when it answers, and a project's work whose store call
failed waits for the store, then goes on from what the store durably holds under the same lease
(:meth:`Daemon._resume`). That is the crash-recovery path without the crash: the failed write
had not been committed, so the step it recorded is redone or finished from disk, as after a
``kill -9`` at that instant, and nothing is lost.

Shutdown (SIGTERM/SIGINT): stop claiming, let running work finish for ``shutdown_grace`` seconds,
cancel the rest (``.part`` files stay for resuming), release our leases, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog

from watcher import __version__, clock
from watcher.api import USER_AGENT, MagicHourClient
from watcher.backoff import GiveUpLimits, PollPolicy, next_attempt, stalled_for_good
from watcher.downloader import (
    Downloader,
    TransferLimits,
    find_parts,
    finish_from_disk,
    remove_files,
)
from watcher.errors import (
    ApiError,
    ApiRejected,
    DiskFull,
    DownloadError,
    DownloadUrlExpired,
    InvalidProjectId,
    ProjectNotFound,
    StoreError,
    StoreUnavailable,
    TransientApiError,
    Unauthorized,
)
from watcher.health import ApiHealth
from watcher.metrics import Metrics
from watcher.models import Kind, ProjectRef, ProjectSnapshot, RemoteStatus, State
from watcher.outage import StoreHealth
from watcher.paths import is_part_name, output_relpath, part_path, resolve_inside
from watcher.priority import PriorityGate
from watcher.schedule import RELOAD_SECONDS, SAMPLE_SIZE, RenderStats, next_poll_delay
from watcher.settings import Settings
from watcher.store import (
    Claim,
    LeaseLost,
    NewOutput,
    NotificationBuilder,
    OutputRecord,
    OutputState,
    ProjectRecord,
    Store,
)
from watcher.throttle import Throttle
from watcher.views import notification_event

log = structlog.get_logger("watcher")

DISK_FULL_RETRY_SECONDS = 60.0
IDLE_CHECK_SECONDS = 1.0
MAX_INTERRUPTIONS = 3
# A project whose work raised an unexpected exception this many times in a row is quarantined
# with that exception as the cause, rather than retried forever.
MAX_CRASHES = 3
CRASH_NOTE_CHARS = 300
_CRASH_NOTE = re.compile(r"crashed \((\d+)x in a row\): ")
# A project whose GET has failed this many times in a row (about a quarter of an hour with the
# default POLL_MAX) while other projects' GETs succeed is poison, not an outage: quarantined.
MAX_POLL_FAILURES = 20
# A run whose first GETs all answer 404, this many projects of them (or every project active at
# start, if fewer), has most likely been pointed at the wrong WATCHER_API_BASE_URL.
BASE_URL_SUSPECT_404S = 3

EXIT_OK = 0
EXIT_NOT_AS_CONFIGURED = 1
EXIT_UNAUTHORIZED = 3


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended: the process's exit code and the states of the run's projects.

    A plain run exits 0 once stopped; ``until_done`` decides over the projects of this run only
    (active when it started, named in ``WATCHER_PROJECTS``, tracked or revived while it ran, or
    worked on by it), never over projects that ended in earlier runs; with ``judge_all``, over
    every project in the store (a fleet's finisher).
    """

    exit_code: int
    counts: dict[State, int]


class Daemon:
    """Tracks projects until final; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        until_done: bool = False,
        judge_all: bool = False,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.store = store
        self.until_done = until_done
        self.judge_all = judge_all  # until_done: every stored project decides, not this run's
        self.rng = rng or random.Random()
        self.metrics = metrics or Metrics()
        self.health = ApiHealth(settings, until_done=until_done, metrics=self.metrics)
        self.health.on_release = self._release_held
        self.policy = PollPolicy(settings.poll_initial, settings.poll_max)
        self.render_stats = RenderStats()
        self.owner = settings.replica_id
        # The replica is named in every request, so the far side (and the fleet test) can tell
        # which process did what.
        self.user_agent = f"{USER_AGENT}/{__version__} (replica {self.owner})"
        self.lease_seconds = settings.lease_seconds
        self.download_dir = settings.download_dir
        self.max_in_flight = (
            max(16, 4 * settings.max_concurrent_requests) + 2 * settings.max_concurrent_downloads
        )
        self._transport = transport
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: dict[str, tuple[asyncio.Task[None], Claim]] = {}
        self._renewals_refused: set[tuple[str, int]] = set()  # (project id, lease version)
        self.max_poll_failures = MAX_POLL_FAILURES
        self.give_up = GiveUpLimits()
        self._last_good_get: tuple[float, str] | None = None  # when, and which project
        self._signals = 0
        self._run_ids: set[str] = set()  # the projects of this run (see Outcome)
        # Projects whose GET answered 404 before any API call succeeded (None once reported).
        self._not_found_at_start: set[str] | None = set()
        self._suspect_after = BASE_URL_SUSPECT_404S
        self._background: set[asyncio.Task[None]] = set()
        self.started = asyncio.Event()
        self.api: MagicHourClient | None = None
        self.downloader: Downloader | None = None
        self.download_gate = PriorityGate(settings.max_concurrent_downloads)
        self.store_health = StoreHealth(
            initial=settings.store_retry_initial,
            maximum=settings.store_retry_max,
            rng=self.rng,
        )
        self.disk_full_retry_seconds = DISK_FULL_RETRY_SECONDS
        # Extra long-lived loops (the HTTP server) started in the daemon's task group.
        self.side_tasks: list[Callable[[Daemon], Coroutine[object, object, None]]] = []

    @property
    def _api(self) -> MagicHourClient:
        if self.api is None:
            raise RuntimeError("the daemon is not running")
        return self.api

    @property
    def _downloader(self) -> Downloader:
        if self.downloader is None:
            raise RuntimeError("the daemon is not running")
        return self.downloader

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Whether shutdown has begun."""
        return self._stopping.is_set()

    def request_stop(self) -> None:
        """Begin a graceful shutdown. Safe to call twice; the signal handler calls this."""
        self._signals += 1
        if not self._stopping.is_set():
            log.info("shutdown_requested", grace_seconds=self.settings.shutdown_grace)
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """Look for due work now (a project was tracked or expedited)."""
        self._wake.set()

    @property
    def settings(self) -> Settings:
        """The settings in force (SIGHUP re-reads the ``*_FILE`` secrets)."""
        return self.health.settings

    @property
    def unauthorized(self) -> bool:
        """Whether polling is stopped by a refused token (or a request refused as invalid)."""
        return self.health.unauthorized

    @property
    def payment_required(self) -> bool:
        """Whether polling is paused by a 402."""
        return self.health.payment_required

    def reload_secrets(self, trigger: str) -> list[str]:
        """Read every ``*_FILE`` secret again; see :meth:`ApiHealth.reload_secrets`."""
        return self.health.reload_secrets(trigger)

    def _release_held(self, held: set[str]) -> None:
        """Make the projects a refused token put off to the next recheck due now."""
        if held:
            task = asyncio.get_running_loop().create_task(self._expedite(held))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self._wake.set()

    async def _expedite(self, project_ids: set[str]) -> None:
        now = clock.now()
        for pid in sorted(project_ids):
            with contextlib.suppress(StoreError):
                await self.store.expedite(pid, now=now)
        self._wake.set()

    def _http_client(self) -> httpx.AsyncClient:
        s = self.settings
        pool = s.max_concurrent_requests + s.max_concurrent_downloads + 4
        return httpx.AsyncClient(
            timeout=httpx.Timeout(s.request_timeout, connect=min(10.0, s.request_timeout)),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            follow_redirects=True,
            transport=self._transport,
        )

    async def run(self) -> Outcome:
        """Run until stopped (or, with ``until_done``, until no project is active)."""
        token = self.settings.require_token()
        async with self._http_client() as http, self.store:
            throttle = Throttle(
                rate=self.settings.max_requests_per_second,
                concurrency=self.settings.max_concurrent_requests,
                shared=self._fleet_budget if self.store.shares_rate_budget else None,
            )
            self.api = MagicHourClient(
                http,
                base_url=str(self.settings.api_base_url),
                token=token,
                throttle=throttle,
                on_retry=self.health.on_retry,
                metrics=self.metrics,
                user_agent=self.user_agent,
                reload_token=self.health.token_after_401,
            )
            self.health.throttle = throttle
            self.health.set_token = self.api.set_token
            self.downloader = Downloader(
                http,
                user_agent=self.user_agent,
                limits=self._transfer_limits(),
                on_bytes=self.metrics.download_bytes.inc,
            )
            await self._start()
            try:
                async with asyncio.TaskGroup() as group:
                    loops = [
                        group.create_task(self._dispatch_loop()),
                        group.create_task(self._renew_loop()),
                        *self._fleet_loops(group),
                        *(group.create_task(starter(self)) for starter in self.side_tasks),
                    ]
                    self.started.set()
                    await self._stopping.wait()
                    await self._drain()
                    for loop in loops:
                        loop.cancel()
            finally:
                with contextlib.suppress(StoreError):
                    await self.store.release_leases(now=clock.now(), owner=self.owner)
            self.store_health.settle(force=True)
            try:
                return await self._outcome()
            except StoreError as exc:  # stopped during an outage: the states cannot be read
                code = EXIT_NOT_AS_CONFIGURED if self.until_done else EXIT_OK
                log.warning("daemon_stopped", exit_code=code, error=str(exc))
                return Outcome(code, {})

    def _transfer_limits(self) -> TransferLimits:
        s = self.settings
        return TransferLimits(
            min_rate=s.download_min_rate,
            rate_window=s.download_rate_window,
            max_seconds=s.download_max_seconds,
            progress_seconds=s.download_progress_seconds,
        )

    async def _fleet_budget(self, want: int) -> int:
        if self.store_health.down:  # no wait on a store that does not answer: our own limit holds
            return want
        rate = self.settings.max_requests_per_second
        return await self.store.take_rate_tokens(
            now=clock.now(), rate=rate, burst=max(1.0, rate), want=want
        )

    async def _start(self) -> None:
        now = clock.now()
        released = await self.store.release_leases(
            now=now, owner=None if self.store.is_exclusive else self.owner
        )
        refs = self.settings.project_refs
        added = await self.track(refs, delete_after_download=self.settings.delete_after_download)
        self._run_ids.update(r.id for r in refs)
        if self.until_done:  # what this run waits for is its own, whoever works on it
            self._run_ids |= await self._active_ids((State.POLLING,))
            self._run_ids |= await self._active_ids()
        counts = await self.store.count_by_state()
        active = sum(n for state, n in counts.items() if not state.is_final)
        self._suspect_after = min(BASE_URL_SUSPECT_404S, active) or BASE_URL_SUSPECT_404S
        swept = await self._sweep_parts(await self._active_ids())
        learned = await self._learn()
        log.info(
            "daemon_started",
            version=__version__,
            replica=self.owner,
            config=self.settings.summary(),
            download_dir=str(self.download_dir),
            projects_from_env=len(refs),
            projects_added=len(added),
            leases_released=released,
            parts_removed=swept,
            render_samples=learned,
            until_done=self.until_done,
        )

    async def _learn(self) -> dict[str, int]:
        """Load the latest render durations of every kind from the store; how many per kind."""
        for kind in Kind:
            durations = await self.store.render_durations(kind, limit=SAMPLE_SIZE)
            self.render_stats.load(kind, durations)
        return {kind.value: self.render_stats.count(kind) for kind in Kind}

    def _fleet_loops(self, group: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        return [] if self.store.is_exclusive else [group.create_task(self._learn_loop())]

    async def _learn_loop(self) -> None:
        """On a shared store, learn from every replica's renders, not only this one's."""
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), RELOAD_SECONDS)
            if not self.stopping:
                with contextlib.suppress(StoreError):
                    await self._learn()

    async def track(
        self, refs: Iterable[ProjectRef], *, delete_after_download: bool, revive: bool = False
    ) -> list[str]:
        """Track ``refs`` (idempotent); with ``revive``, those that ended ``not_found`` are
        tracked again from scratch. Returns the ids that were new or revived."""
        refs = list(refs)
        now = clock.now()
        result = await self.store.track(refs, now=now, delete_after_download=delete_after_download)
        by_id = {r.id: r for r in refs}
        for pid in result.added:
            log.info("project_tracked", project_id=pid, kind=by_id[pid].kind.value)
        revived: list[str] = []
        if revive and result.existing:
            again = [by_id[pid] for pid in dict.fromkeys(result.existing)]
            revived = await self.store.revive(
                again, now=now, delete_after_download=delete_after_download
            )
            for pid in revived:
                log.info("project_revived", project_id=pid, kind=by_id[pid].kind.value)
        started = [*result.added, *revived]
        self._run_ids.update(started)
        if started:
            self.wake()
        return started

    async def _active_ids(
        self, states: tuple[State, ...] = (State.DOWNLOADING, State.DELETING)
    ) -> set[str]:
        ids: set[str] = set()
        for state in states:
            cursor = None
            while True:
                page = await self.store.list_projects(state=state, limit=1000, cursor=cursor)
                ids.update(p.id for p in page.projects)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
        return ids

    async def _sweep_parts(self, active: set[str]) -> int:
        """Remove temporary files of projects no longer downloading (crash leftovers)."""
        found = await asyncio.to_thread(find_parts, self.download_dir, "*/*/*")
        by_project: dict[str, list[Path]] = {}
        for part in found:
            if part.parent.name not in active:
                by_project.setdefault(part.parent.name, []).append(part)
        doomed: list[Path] = []
        for project_id, parts in sorted(by_project.items()):
            doomed += await self._removable_parts(project_id, parts)
        return await asyncio.to_thread(remove_files, doomed)

    async def _removable_parts(self, project_id: str, parts: list[Path]) -> list[Path]:
        """Of ``parts``, files in the project's folder that look temporary, those safe to remove:
        never a path the store records as an output, and a name of an earlier version (which an
        output can have too) only for a project the store knows."""
        recorded = {o.path for o in await self.store.outputs(project_id)}
        known = bool(recorded) or await self.store.get(project_id) is not None
        return [
            part
            for part in parts
            if part.relative_to(self.download_dir).as_posix() not in recorded
            and (known or is_part_name(part.name))
        ]

    async def _drain(self) -> None:
        tasks = [task for task, _ in self._tasks.values()]
        if tasks:
            log.info("shutdown_draining", in_flight=len(tasks))
            # Paused (token refused, payment required), calls wait on a long pause: not worth
            # waiting for; a cancelled download keeps its .part for the next run.
            paused = self.unauthorized or self.payment_required
            grace = 0.0 if paused else self.settings.shutdown_grace
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning("shutdown_cancelled_work", cancelled=len(pending))

    async def _outcome(self) -> Outcome:
        """The exit code (see :class:`Outcome`), logged as the code the process exits with."""
        counts, as_configured = await self._run_counts()
        if not self.until_done:
            code = EXIT_OK
        elif self.unauthorized:
            code = EXIT_UNAUTHORIZED
        else:
            code = EXIT_OK if as_configured else EXIT_NOT_AS_CONFIGURED
        log.info(
            "daemon_stopped",
            exit_code=code,
            **{f"projects_{s.value}": n for s, n in sorted(counts.items())},
        )
        return Outcome(code, counts)

    async def _run_counts(self) -> tuple[dict[State, int], bool]:
        """States of this run's projects (one pass over the store, in pages), and whether every
        one ended as configured (``saved``, or ``deleted`` when deletion was asked)."""
        counts: dict[State, int] = {}
        as_configured = True
        cursor = None
        while True:
            page = await self.store.list_projects(limit=1000, cursor=cursor)
            for p in page.projects:
                if p.id not in self._run_ids and not self.judge_all:
                    continue
                counts[p.state] = counts.get(p.state, 0) + 1
                wanted = State.DELETED if p.delete_after_download else State.SAVED
                as_configured = as_configured and p.state == wanted
            if page.next_cursor is None:
                return counts, as_configured
            cursor = page.next_cursor

    # --- the dispatch loop ---------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self.stopping:
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
        now = clock.now()
        if self.until_done and not self._tasks and await self.store.next_due_at() is None:
            log.info("daemon_done")
            self.request_stop()
            return True
        if self.unauthorized and self.until_done:
            self.request_stop()
            return True
        if not self.health.paused(now):
            await self._claim(now)
        await self._sleep_until_due(now)
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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.store_health.next_delay())
        if self.stopping:
            return
        now = clock.now()
        if any(not task.done() for task, _ in self._tasks.values()):
            await self._renew_all(now)
        else:
            await self.store.release_leases(now=now, owner=self.owner)
        self.store_health.recovered()

    async def _claim(self, now: float) -> None:
        room = self.max_in_flight - len(self._tasks)
        probing = self.health.probing
        if room <= 0 or (probing and self._tasks):
            return
        limit = 1 if probing else room
        for claim in await self.store.claim_due(
            now=now, limit=limit, owner=self.owner, lease_seconds=self.lease_seconds
        ):
            self._run_ids.add(claim.id)
            stale = self._tasks.get(claim.id)
            if stale is not None:
                # Our own lease ran out while the work went on (the store missed renewals, or the
                # loop stalled): that task can no longer write. Stop it and carry on under the
                # new lease once it has stopped (a download's .part stays for resuming).
                log.warning("lease_expired_while_working", project_id=claim.id)
                stale[0].cancel()
            after = None if stale is None else stale[0]
            task = asyncio.create_task(self._work(claim, after=after), name=f"project-{claim.id}")
            self._tasks[claim.id] = (task, claim)
        self.metrics.in_flight.set(len(self._tasks))

    async def _sleep_until_due(self, now: float) -> None:
        """Wait for a wake-up (work finished, project tracked) or until work is due, at most
        ``IDLE_CHECK_SECONDS`` (other processes may have tracked projects meanwhile)."""
        timeout: float | None
        if len(self._tasks) >= self.max_in_flight or (self.health.probing and self._tasks):
            timeout = None
        elif self.health.paused(now):
            timeout = min(self.health.paused_until - now, IDLE_CHECK_SECONDS)
        else:
            due = await self.store.next_due_at()
            timeout = (
                IDLE_CHECK_SECONDS if due is None else min(max(0.0, due - now), IDLE_CHECK_SECONDS)
            )
        if timeout == 0.0:
            await asyncio.sleep(0)  # claimed a full batch: yield, then claim more
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _renew_loop(self) -> None:
        interval = self.lease_seconds / 3
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if self.stopping or self.store_health.down:
                continue  # the dispatch loop's probe renews every lease once the store is back
            try:
                await self._renew_all(clock.now())
            except StoreError as exc:
                self.store_failed(exc, during="lease renewal")

    async def _renew_all(self, now: float) -> None:
        """Renew the lease of every running piece of work; stop work refused twice in a row."""
        refused: set[tuple[str, int]] = set()
        for task, claim in list(self._tasks.values()):
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

    # --- one project ---------------------------------------------------------------------------

    async def _work(self, claim: Claim, *, after: asyncio.Task[None] | None = None) -> None:
        p = claim.project
        try:
            if after is not None:  # the task of our expired lease, being cancelled
                await asyncio.wait([after])
            with structlog.contextvars.bound_contextvars(project_id=p.id, kind=p.kind.value):
                current: Claim | None = claim
                while current is not None:
                    try:
                        await self._step(current)
                    except StoreUnavailable as exc:
                        self.store_failed(exc, during="work")
                        current = await self._resume(current)
                    else:
                        current = None
        except LeaseLost:
            log.warning("lease_lost", project_id=p.id, kind=p.kind.value)
        except StoreError as exc:
            log.error("store_error", project_id=p.id, error=str(exc))  # noqa: TRY400 - no traceback needed
        except Exception as exc:  # a bug must not stop the other projects
            log.exception("project_crashed", project_id=p.id, kind=p.kind.value)
            await self._crashed(claim, exc)
        finally:
            if self._tasks.get(p.id, (None, None))[1] is claim:  # not a successor's entry
                del self._tasks[p.id]
            self.metrics.in_flight.set(len(self._tasks))
            self._wake.set()

    async def _crashed(self, claim: Claim, exc: Exception) -> None:
        """Record what crashed the work on the project (type and a short message), so status
        shows it; retried later, quarantined with that cause after ``MAX_CRASHES`` in a row."""
        p = claim.project
        text = " ".join(str(exc).split())
        secret = self.settings.api_token.get_secret_value() if self.settings.api_token else ""
        if secret:
            text = text.replace(secret, "[redacted]")
        if len(text) > CRASH_NOTE_CHARS:
            text = text[:CRASH_NOTE_CHARS] + "…"
        what = type(exc).__name__ + (f": {text}" if text else "")
        before = _CRASH_NOTE.match(p.failure or "")
        crashes = int(before.group(1)) + 1 if before else 1
        try:
            if crashes >= MAX_CRASHES:
                await self._finish(
                    claim,
                    State.QUARANTINED,
                    failure=f"quarantined after {crashes} crashes in a row: {what}",
                )
            else:
                await self._retry(claim, f"crashed ({crashes}x in a row): {what}", count=True)
        except StoreError as err:  # the lease runs out and the project is tried again
            log.error("store_error", project_id=p.id, error=str(err))  # noqa: TRY400
        except Exception:  # a second bug, while recording the first
            log.exception("project_crashed", project_id=p.id, kind=p.kind.value)

    async def _step(self, claim: Claim) -> None:
        """The work the project's stored state calls for."""
        p = claim.project
        if p.interruptions >= MAX_INTERRUPTIONS:
            last = f"; the last failure recorded: {p.failure}" if p.failure else ""
            await self._finish(
                claim,
                State.QUARANTINED,
                failure=f"quarantined: its work was interrupted {p.interruptions} times "
                f"in a row (a replica died or stalled while holding it){last}",
            )
        elif p.state == State.POLLING:
            await self._poll(claim)
        elif p.state == State.DOWNLOADING:
            await self._download(claim, await self.store.outputs(p.id))
        elif p.state == State.DELETING:
            await self._delete(claim)

    async def _resume(self, claim: Claim) -> Claim | None:
        """After a store call of this work failed: wait for the store, then carry on from what
        it durably holds, under the same lease. ``None`` when the work ends here: the daemon is
        stopping (the lease runs out and the work is redone), the lease was taken over, or the
        failed call's write had in fact been committed and released the project."""
        while await self.store_health.wait_up(self._stopping):
            try:
                record = await self.store.get(claim.id)
            except StoreUnavailable as exc:
                self.store_failed(exc, during="work")
                continue
            if record is not None and record.lease_version == claim.version:
                return Claim(record, claim.version) if record.lease_owner is not None else None
            log.warning(
                "lease_lost", project_id=claim.id, kind=claim.project.kind.value, during="outage"
            )
            return None
        return None

    async def _get(self, claim: Claim, *, for_urls: bool = False) -> ProjectSnapshot | None:
        """GET the project; handle the API's refusals. ``None`` if the work ends here.

        ``for_urls``: the project was complete and we need fresh download URLs, so a 404 means
        its outputs are lost to us: that is a failure, not a project that never existed.
        """
        p = claim.project
        self.metrics.polls.labels(p.kind.value).inc()
        try:
            snapshot = await self._api.get_project(p.ref)
        except ProjectNotFound as exc:
            if for_urls:
                failure = f"outputs can no longer be fetched: the project is gone ({exc})"
                await self._finish(claim, State.FAILED, failure=failure)
            else:
                self._suspect_base_url(p.id, exc)
                await self._finish(claim, State.NOT_FOUND, failure=str(exc), path=exc.path)
            return None
        except ApiError as exc:
            await self._api_trouble(claim, exc)
            return None
        self.health.ok()
        return snapshot

    def _suspect_base_url(self, project_id: str, exc: ProjectNotFound) -> None:
        """Say loudly, once, when the first GETs of this run all answer 404: that is a wrong
        ``WATCHER_API_BASE_URL`` far more often than projects that all vanished."""
        if self.health.answered or self._not_found_at_start is None:
            return
        self._not_found_at_start.add(project_id)
        if len(self._not_found_at_start) < self._suspect_after:
            return
        log.error(
            "api_base_url_suspect",
            base_url=str(self.settings.api_base_url),
            path=exc.path,
            not_found=len(self._not_found_at_start),
            hint="every GET of this run so far answered 404: WATCHER_API_BASE_URL is probably "
            "wrong (it must not end in /v1); once fixed, `watcher track` revives the projects",
        )
        self._not_found_at_start = None

    async def _poll(self, claim: Claim) -> None:
        started = clock.monotonic()
        snapshot = await self._get(claim)
        if snapshot is None:
            return
        p = claim.project
        now = clock.now()
        self._last_good_get = (now, p.id)
        status = snapshot.status
        if status != p.remote_status:
            log.info(
                "project_status_changed",
                project_id=p.id,
                kind=p.kind.value,
                status=status.value,
                previous=p.remote_status.value if p.remote_status else None,
            )
        if status.is_terminal:
            self.metrics.time_to_terminal.observe(max(0.0, now - p.tracked_at))
            if p.polls > 0:  # seen in progress: a render duration worth learning from
                self.render_stats.add(p.kind, now - p.tracked_at)
        if status == RemoteStatus.COMPLETE:
            await self._complete(claim, snapshot, now)
        elif status == RemoteStatus.ERROR:
            err = snapshot.error
            await self._finish(
                claim,
                State.ERROR,
                remote_status=status,
                error_code=err.code if err else None,
                error_message=err.message if err else None,
            )
        elif status == RemoteStatus.CANCELED:
            await self._finish(claim, State.CANCELED, remote_status=status)
        else:
            attempt = next_attempt(p.remote_status, status, p.attempt)
            window = self.render_stats.window(p.kind)
            delay = next_poll_delay(
                self.policy, p.kind, status, age=now - p.tracked_at, rng=self.rng, window=window
            )
            await self.store.record_poll(
                claim, now=now, remote_status=status, attempt=attempt, due_at=now + delay
            )
            log.debug(
                "project_polled",
                project_id=p.id,
                kind=p.kind.value,
                status=status.value,
                attempt=attempt,
                next_poll_in=round(delay, 3),
                elapsed_ms=round((clock.monotonic() - started) * 1000, 1),
            )

    def _new_outputs(self, p_ref: ProjectRef, snapshot: ProjectSnapshot) -> list[NewOutput]:
        return [
            NewOutput(
                index=i,
                url=link.url,
                expires_at=link.expires_at.timestamp(),
                path=output_relpath(p_ref.kind, p_ref.id, i, link.url),
            )
            for i, link in enumerate(snapshot.downloads)
        ]

    async def _complete(self, claim: Claim, snapshot: ProjectSnapshot, now: float) -> None:
        p = claim.project
        if not snapshot.enabled:
            await self._finish(
                claim,
                State.FAILED,
                remote_status=snapshot.status,
                failure="the project was deleted before its outputs were saved",
            )
            return
        if not snapshot.downloads:
            await self._retry(claim, "complete but the API listed no downloads", count=True)
            return
        rows = await self.store.record_complete(
            claim,
            now=now,
            due_at=now + self.lease_seconds,
            outputs=self._new_outputs(p.ref, snapshot),
        )
        log.info("project_complete", project_id=p.id, kind=p.kind.value, outputs=len(rows))
        await self._download(claim, rows)

    async def _refresh_urls(self, claim: Claim) -> list[OutputRecord] | None:
        """GET the project again for fresh download URLs. ``None`` if the work ends here."""
        snapshot = await self._get(claim, for_urls=True)
        if snapshot is None:
            return None
        if snapshot.status != RemoteStatus.COMPLETE or not snapshot.enabled:
            await self._finish(
                claim,
                State.FAILED,
                failure=f"outputs can no longer be fetched: the project is now "
                f"{'deleted' if not snapshot.enabled else snapshot.status.value}",
            )
            return None
        now = clock.now()
        rows = await self.store.record_complete(
            claim,
            now=now,
            due_at=now + self.lease_seconds,
            outputs=self._new_outputs(claim.project.ref, snapshot),
        )
        log.info("download_urls_refreshed", project_id=claim.id, outputs=len(rows))
        return rows

    async def _download(self, claim: Claim, rows: list[OutputRecord]) -> None:
        """Save every output not yet saved, then finish. After a refused link, the outputs
        to save are the ones the store lists after the fresh GET, new ones included."""
        pending = _unsaved(rows)
        refused = 0  # links refused in a row, with no output saved in between
        try:
            while pending:
                row = pending[0]
                before = await self._part_size(row)
                try:
                    await self._save_output(claim, row)
                except DownloadUrlExpired as exc:
                    refused += 1
                    if refused > self.give_up.refused_links:
                        failure = (
                            f"outputs could not be saved: no usable download URL left, {refused} "
                            f"links in a row were refused, fresh ones included; the last: {exc}"
                        )
                        await self._finish(claim, State.FAILED, failure=failure)
                        return
                    log.info(
                        "download_url_stale", project_id=claim.id, index=row.index, reason=str(exc)
                    )
                    fresh = await self._refresh_urls(claim)
                    if fresh is None:
                        return
                    pending = _unsaved(fresh)
                    continue
                except DownloadError as exc:
                    gained = await self._part_size(row) > before
                    await self._download_trouble(claim, exc, gained=gained)
                    return
                pending.pop(0)
                refused = 0
        except InvalidProjectId as exc:
            await self._finish(claim, State.FAILED, failure=str(exc))
            return
        await self._all_saved(claim)

    async def _part_size(self, row: OutputRecord) -> int:
        """How many bytes of the output its ``.part`` file holds (0 without one)."""
        part = part_path(resolve_inside(self.download_dir, row.path))
        with contextlib.suppress(FileNotFoundError):
            return (await asyncio.to_thread(part.stat)).st_size
        return 0

    async def _save_output(self, claim: Claim, row: OutputRecord) -> None:
        final = resolve_inside(self.download_dir, row.path)
        if row.state == OutputState.VERIFIED and row.bytes is not None and row.sha256:
            if await asyncio.to_thread(finish_from_disk, final, row.bytes, row.sha256):
                await self.store.record_output_saved(claim, index=row.index, now=clock.now())
                log.info(
                    "download_recovered", project_id=claim.id, index=row.index, path=str(final)
                )
                return
            await self.store.reset_output(claim, index=row.index)

        async def on_verified(size: int, sha256: str) -> None:
            await self.store.record_output_verified(
                claim, index=row.index, size=size, sha256=sha256
            )

        started = clock.monotonic()
        async with self.download_gate.slot(row.expires_at):
            saved = await self._downloader.fetch(row.url, final, on_verified)
        now = clock.now()
        await self.store.record_output_saved(claim, index=row.index, now=now)
        elapsed = clock.monotonic() - started
        self.metrics.downloads.labels("saved").inc()
        self.metrics.download_seconds.observe(elapsed)
        self.metrics.url_lifetime_left.observe(max(0.0, row.expires_at - now))
        log.info(
            "download_saved",
            project_id=claim.id,
            kind=claim.project.kind.value,
            index=row.index,
            path=str(final),
            bytes=saved.size,
            sha256=saved.sha256,
            resumed_from=saved.resumed_from,
            elapsed_ms=round(elapsed * 1000, 1),
            expires_in=round(row.expires_at - now, 1),
        )

    def _announcer(self) -> NotificationBuilder | None:
        """What builds the event announcing a final state from the row the store writes (in
        the same transaction), if notifications are on."""
        if self.settings.notify_url is None:
            return None
        download_dir = self.download_dir

        def build(record: ProjectRecord, outputs: list[OutputRecord]) -> str:
            event = notification_event(record, outputs, download_dir, now=record.updated_at)
            return json.dumps(event)

        return build

    async def _all_saved(self, claim: Claim) -> None:
        p = claim.project
        now = clock.now()
        delete = p.delete_after_download
        await self.store.record_saved(
            claim,
            now=now,
            due_at=now + self.lease_seconds,
            delete_next=delete,
            notify=self._announcer(),
        )
        if delete:
            await self._delete(claim)
            return
        self.metrics.finished.labels(State.SAVED.value).inc()
        log.info("project_saved", project_id=p.id, kind=p.kind.value, state=State.SAVED.value)

    async def _delete(self, claim: Claim) -> None:
        p = claim.project
        rows = await self.store.outputs(p.id)
        if not rows or any(r.state != OutputState.SAVED for r in rows):
            await self._finish(
                claim, State.FAILED, failure="refusing to delete: not every output is saved"
            )
            return
        await self.store.flush()  # every "saved" is durable before anything is deleted
        try:
            deleted = await self._api.delete_project(p.ref)
        except ApiRejected as exc:
            self.metrics.deletes.labels("refused").inc()
            log.warning(
                "project_delete_refused", project_id=p.id, kind=p.kind.value, error=str(exc)
            )
            await self._finish(claim, State.SAVED, failure=f"not deleted: {exc}")
            return
        except ApiError as exc:
            await self._api_trouble(claim, exc)
            return
        self.health.ok()
        self.metrics.deletes.labels("deleted" if deleted else "already_gone").inc()
        await self._finish(claim, State.DELETED, already_gone=not deleted)

    # --- outcomes ------------------------------------------------------------------------------

    async def _finish(
        self,
        claim: Claim,
        state: State,
        *,
        remote_status: RemoteStatus | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        failure: str | None = None,
        already_gone: bool | None = None,
        path: str | None = None,
    ) -> None:
        p = claim.project
        now = clock.now()
        await self.store.record_final(
            claim,
            now=now,
            state=state,
            remote_status=remote_status,
            error_code=error_code,
            error_message=error_message,
            failure=failure,
            notify=self._announcer(),
        )
        self.metrics.finished.labels(state.value).inc()
        await self._remove_parts(p.kind.value, p.id)
        fields: dict[str, object] = {"project_id": p.id, "kind": p.kind.value, "state": state.value}
        if state == State.ERROR:
            log.warning(
                "project_error", **fields, error_code=error_code, error_message=error_message
            )
        elif state == State.FAILED:
            log.error("project_failed", **fields, cause=failure)
        elif state == State.QUARANTINED:
            log.error("project_quarantined", **fields, cause=failure)
        elif state == State.DELETED:
            log.info("project_deleted", **fields, already_gone=already_gone)
        elif state == State.CANCELED:
            log.info("project_canceled", **fields)
        elif state == State.NOT_FOUND:
            log.warning("project_not_found", **fields, path=path, note=failure)
        else:
            log.info("project_saved", **fields, note=failure)

    async def _remove_parts(self, kind: str, project_id: str) -> None:
        """Remove the temporary files of a project that has reached its final state."""
        parts = await asyncio.to_thread(find_parts, self.download_dir / kind / project_id, "*")
        if parts:
            with contextlib.suppress(StoreError):  # if not now, the next start-up's sweep
                await asyncio.to_thread(
                    remove_files, await self._removable_parts(project_id, parts)
                )

    async def _retry(
        self,
        claim: Claim,
        failure: str,
        *,
        count: bool,
        delay: float | None = None,
        retry_after: float | None = None,
        progressed: bool = False,
        failures: int | None = None,
    ) -> None:
        """Try again later. ``failures`` (the failures in a row, this one included) defaults to
        the claimed count plus this one if ``count``; ``progressed`` starts the run over."""
        p = claim.project
        if failures is None:
            failures = 0 if progressed else p.failures + (1 if count else 0)
        if delay is None:
            delay = self.policy.retry_delay(failures, self.rng, retry_after)
        now = clock.now()
        await self.store.record_retry(
            claim,
            now=now,
            due_at=now + delay,
            failure=failure,
            count_failure=count,
            progressed=progressed,
        )
        log.warning(
            "project_retry_scheduled",
            project_id=p.id,
            kind=p.kind.value,
            cause=failure,
            failures=failures,
            retry_in=round(delay, 3),
        )

    async def _api_trouble(self, claim: Claim, exc: ApiError) -> None:
        refusal = self.health.refused(exc)
        if refusal is not None:
            if refusal.first:
                await self.store.note_active(refusal.note, now=clock.now())
            await self._retry(claim, refusal.note, count=False, delay=refusal.retry_in)
            if isinstance(exc, Unauthorized):
                self.health.hold(claim.id)
        elif isinstance(exc, TransientApiError):
            failures = claim.project.failures + 1
            if (
                claim.project.state == State.POLLING
                and failures >= self.max_poll_failures
                and self._others_answered(claim.id)
            ):
                await self._finish(
                    claim,
                    State.QUARANTINED,
                    failure=f"quarantined: its GET failed {failures} times in a row while other "
                    f"projects' GETs succeeded; the last failure: {exc}",
                )
            else:
                await self._retry(claim, str(exc), count=True, retry_after=exc.retry_after)
        else:
            await self._finish(claim, State.FAILED, failure=str(exc))

    def _others_answered(self, project_id: str) -> bool:
        """Whether another project's GET succeeded lately: the API works, this project does not.
        (In an outage nothing succeeds, and no project is quarantined for it.)"""
        if self._last_good_get is None:
            return False
        at, other = self._last_good_get
        return other != project_id and clock.now() - at <= 2 * self.settings.poll_max

    async def _download_trouble(self, claim: Claim, exc: DownloadError, *, gained: bool) -> None:
        """A download failed: retry, or give up if the project has stopped making progress.

        ``gained``: the failed transfer added bytes to its ``.part`` (a cut that resumes). The
        run of failures so far is read from the store, which clears it on every saved output
        and on the good GET that ended polling (the claimed record predates those).
        """
        self.metrics.downloads.labels(type(exc).__name__).inc()
        if isinstance(exc, DiskFull):
            log.error("disk_full", project_id=claim.id, error=str(exc))
            await self._retry(claim, str(exc), count=False, delay=self.disk_full_retry_seconds)
            return
        if gained:
            self.metrics.retries.labels(type(exc).__name__).inc()
            await self._retry(claim, str(exc), count=False, progressed=True)
            return
        p, now = await self.store.get(claim.id) or claim.project, clock.now()
        failures = p.failures + 1
        since = now if p.stalled_since is None else p.stalled_since
        if stalled_for_good(self.give_up, failures=failures, stalled_since=since, now=now):
            failure = (
                f"outputs could not be saved: {failures} tries in a row over "
                f"{now - since:.0f} s gained no byte; the last: {exc}"
            )
            await self._finish(claim, State.FAILED, failure=failure)
            return
        self.metrics.retries.labels(type(exc).__name__).inc()
        await self._retry(claim, str(exc), count=True, failures=failures)


def _unsaved(rows: list[OutputRecord]) -> list[OutputRecord]:
    """The outputs still to save, the one whose link expires first at the head."""
    return sorted((r for r in rows if r.state != OutputState.SAVED), key=lambda r: r.expires_at)
