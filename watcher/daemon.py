"""The daemon: the lifecycle of the running service (start, the task group, drain, outcome).

It is built by :func:`watcher.wiring.build`, which makes every part it runs.

One event loop, one ``asyncio.TaskGroup`` for the long-lived loops (dispatch, lease renewal, and
the HTTP server when enabled): a crash in any of them stops the daemon instead of leaving it half
alive. The dispatch loop claims due projects from the store and runs one task per claimed
project; what that task does to its project, and the order of writes that makes it crash-safe,
is :mod:`watcher.workflow`'s. API-wide refusals (401, 402) are :mod:`watcher.health`'s.

A store that does not answer (:class:`StoreUnavailable`; see :mod:`watcher.outage`) ends
nothing: the dispatch loop stops claiming and probes the store with a write after a backoff, and
the leases held are renewed first thing when it answers; work in flight waits for the store and
goes on under the same lease (:mod:`watcher.workflow`).

Shutdown (SIGTERM/SIGINT): stop claiming, let running work finish for ``shutdown_grace`` seconds,
cancel the rest (``.part`` files stay for resuming), release our leases, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass

import httpx
import structlog

from watcher import __version__, clock
from watcher.control import Readiness
from watcher.dispatcher import Dispatcher
from watcher.errors import StoreError
from watcher.learning import RenderLearning
from watcher.liveness import LivenessKeeper
from watcher.models import Kind, ProjectRef, ProjectSnapshot, State
from watcher.schedule import RenderStats
from watcher.settings import Settings
from watcher.store import ProjectRecord
from watcher.workflow import Workflow

log = structlog.get_logger("watcher")

EXIT_OK = 0
EXIT_NOT_AS_CONFIGURED = 1
EXIT_UNAUTHORIZED = 3
EXIT_SECOND_SIGNAL = 130  # a second SIGTERM/SIGINT ended the run at once


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
    """Tracks projects until final; see the module docstring. It is the
    :class:`~watcher.control.Control` the HTTP app and the notifier are given."""

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        workflow: Workflow,
        http: httpx.AsyncClient,
        render_stats: RenderStats,
        rate_paused: Callable[[], float],
        judge_all: bool = False,
    ) -> None:
        # The daemon runs what its dispatcher claims: the same store, API and store health,
        # stop event, metrics and until_done, taken from it rather than handed in twice.
        self.dispatcher = dispatcher
        self.store, self.health = dispatcher.store, dispatcher.health
        self.store_health, self._stopping = dispatcher.store_health, dispatcher.stopping
        self.metrics, self.until_done = dispatcher.metrics, dispatcher.until_done
        self.judge_all = judge_all  # until_done: every stored project decides, not this run's
        self.workflow = workflow
        self.http = http
        self.render_stats = render_stats
        self.learning = RenderLearning(self.store, render_stats, self._stopping)
        self._rate_paused = rate_paused
        self._run_ids: set[str] = set()  # the projects of this run (see Outcome)
        self.started = asyncio.Event()
        # Extra long-lived loops (the HTTP server, the notifier) run in the daemon's task group,
        # and what to release when the run ends (the server's socket, if it never served).
        self.side_tasks: list[Callable[[], Coroutine[object, object, None]]] = []
        self.closers: list[Callable[[], None]] = []
        self.liveness: LivenessKeeper | None = None  # a shared store's proof of life

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Whether shutdown has begun."""
        return self._stopping.is_set()

    def request_stop(self) -> None:
        """Begin a graceful shutdown. Safe to call twice; the signal handler calls this."""
        if not self._stopping.is_set():
            log.info("shutdown_requested", grace_seconds=self.settings.shutdown_grace)
        self._stopping.set()
        self.dispatcher.wake()

    def wake(self) -> None:
        """Look for due work now (a project was tracked or expedited)."""
        self.dispatcher.wake()

    def store_failed(self, exc: StoreError, *, during: str) -> None:
        """A store call failed: the outage begins (or goes on); the dispatcher probes."""
        self.dispatcher.store_failed(exc, during=during)

    @property
    def settings(self) -> Settings:
        """The settings in force (SIGHUP re-reads the ``*_FILE`` secrets)."""
        return self.health.settings

    def readiness(self) -> Readiness:
        """The facts readiness reports: the API's refusals, the store's outage, the 429 pause."""
        return Readiness(
            unauthorized=self.health.unauthorized,
            payment_required=self.health.payment_required,
            store_problem=self.store_health.problem,
            store_down=self.store_health.down,
            rate_limit_paused=self._rate_paused(),
        )

    def heard(self, kind: Kind) -> None:
        """A verified event arrived: polling of ``kind`` relaxes while they do."""
        self.dispatcher.announcements.heard(kind)

    async def untrack(self, project_id: str) -> bool:
        """Forget the project here; nothing is deleted remotely."""
        if not await self.store.untrack(project_id):
            return False
        log.info("project_untracked", project_id=project_id)
        return True

    async def expedite(self, record: ProjectRecord) -> bool:
        """Make the project due now; see :meth:`Dispatcher.expedite`."""
        return await self.dispatcher.expedite(record)

    async def announce(
        self, record: ProjectRecord, snapshot: ProjectSnapshot
    ) -> tuple[str, str | None]:
        """Act on a webhook's payload; see :meth:`Dispatcher.announce`."""
        return await self.dispatcher.announce(record, snapshot)

    def reload_secrets(self, trigger: str) -> list[str]:
        """Read every ``*_FILE`` secret again; see :meth:`ApiHealth.reload_secrets`."""
        return self.health.reload_secrets(trigger)

    async def run(self) -> Outcome:
        """Run until stopped (or, with ``until_done``, until no project is active)."""
        try:
            return await self._run()
        finally:
            for close in self.closers:
                close()

    async def _run(self) -> Outcome:
        async with self.http, self.store:
            await self._start()
            try:
                async with asyncio.TaskGroup() as group:
                    loops = [
                        group.create_task(self.dispatcher.claim_loop()),
                        group.create_task(self.dispatcher.renew_loop()),
                        group.create_task(self.learning.run()),
                        *(group.create_task(starter()) for starter in self.side_tasks),
                    ]
                    self.started.set()
                    await self._stopping.wait()
                    await self.dispatcher.drain(self.settings.shutdown_grace)
                    for loop in loops:
                        loop.cancel()
            finally:
                with contextlib.suppress(StoreError):
                    await self.store.release_leases(now=clock.now(), owner=self.settings.replica_id)
                if self.liveness is not None:  # after the release: none of ours is found dead
                    await self.liveness.close()
            self.store_health.settle(force=True)
            try:
                return await self._outcome()
            except StoreError as exc:  # stopped during an outage: the states cannot be read
                code = EXIT_NOT_AS_CONFIGURED if self.until_done else EXIT_OK
                log.warning("daemon_stopped", exit_code=code, error=str(exc))
                return Outcome(code, {})

    async def _start(self) -> None:
        await self.workflow.check_outputs(self.settings.replica_id)  # before any claim
        now = clock.now()
        released = await self.store.release_leases(
            now=now, owner=None if self.store.is_exclusive else self.settings.replica_id
        )
        refs = self.settings.project_refs
        added = await self.track(refs, delete_after_download=self.settings.delete_after_download)
        self._run_ids.update(r.id for r in refs)
        if self.until_done:  # what this run waits for is its own, whoever works on it
            self._run_ids |= await self._active_ids((State.POLLING,))
            self._run_ids |= await self._active_ids()
        counts = await self.store.count_by_state()
        active = sum(n for state, n in counts.items() if not state.is_final)
        suspect = self.workflow.limits.base_url_suspect_404s
        self.workflow.suspect_after = min(suspect, active) or suspect
        swept = await self.workflow.sweep(await self._active_ids())
        learned = await self.learning.load()
        log.info(
            "daemon_started",
            version=__version__,
            replica=self.settings.replica_id,
            config=self.settings.summary(),
            download_dir=str(self.settings.download_dir),
            projects_from_env=len(refs),
            projects_added=len(added),
            leases_released=released,
            parts_removed=swept,
            render_samples=learned,
            until_done=self.until_done,
        )

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

    async def _outcome(self) -> Outcome:
        """The exit code (see :class:`Outcome`), logged as the code the process exits with."""
        counts, as_configured = await self._run_counts()
        if not self.until_done:
            code = EXIT_OK
        elif self.health.unauthorized:
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
        run_ids = self._run_ids | self.dispatcher.claimed
        cursor = None
        while True:
            page = await self.store.list_projects(limit=1000, cursor=cursor)
            for p in page.projects:
                if p.id not in run_ids and not self.judge_all:
                    continue
                counts[p.state] = counts.get(p.state, 0) + 1
                wanted = State.DELETED if p.delete_after_download else State.SAVED
                as_configured = as_configured and p.state == wanted
            if page.next_cursor is None:
                return counts, as_configured
            cursor = page.next_cursor

    # --- the dispatch loop ---------------------------------------------------------------------
