"""The store interface: everything the watcher must remember across restarts.

A store owns the tracked projects (their state, schedule and lease) and their outputs (URL,
target path, size, checksum, whether saved). It makes no decisions: the daemon decides, the store
records. Backends: :mod:`watcher.store.memory` (the fake for tests), and one SQL store
(:mod:`watcher.store.sql_store`) over a connector (:mod:`watcher.store.connector`) for
:mod:`watcher.store.sqlite` (one daemon) and :mod:`watcher.store.postgres` (any number of
replicas).

Work is handed out by :meth:`Store.claim_due`: it takes the active projects whose ``due_at`` has
come, in ``due_at`` order, through an index (O(log n) per claimed project, never a scan), and
leases them to the caller: their ``due_at`` moves to the lease's end and their ``lease_version``
increases. Every write that ends a piece of work passes the :class:`Claim` back; the store
refuses it with :class:`LeaseLost` if the lease was taken over since, so a paused worker can
never overwrite a newer result. A worker that dies simply lets its lease run out: the project is
due again when it does. On a store shared by replicas, each replica also proves it is alive
(:meth:`Store.liveness`, a :class:`Liveness` session), so the leases of one that died are taken
over at once (:meth:`Store.expire_dead_leases`) instead of at their expiry.

A store shared by replicas also holds the fleet's API request budget
(:meth:`Store.take_rate_tokens`), so ``WATCHER_MAX_REQUESTS_PER_SECOND`` bounds the whole fleet.

The records a store hands out are :mod:`watcher.store.records`; the writes that change a
project's state (``record_poll``, ``record_retry``, ``record_saved``, ``record_final``) are
:class:`~watcher.store.writes.TransitionWrites`', which :class:`Store` extends, written once over
the two persistence hooks each backend gives.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Self

from watcher.models import Kind, ProjectRef, State
from watcher.store.records import (
    Claim,
    Claimed,
    NewOutput,
    Notification,
    OutputRecord,
    ProjectPage,
    ProjectRecord,
    TrackResult,
)
from watcher.store.writes import TransitionWrites


class Liveness(abc.ABC):
    """One replica's proof of life on a store shared with other replicas, and its ear for work
    that they make due.

    While :meth:`watch` runs, the store knows the replica is alive (PostgreSQL: a session-level
    advisory lock on a connection of its own): when its session ends (the process died, or was
    cut off from the database) the other replicas may take its leases over at once. The same
    session hears the other replicas' wake-ups (PostgreSQL: ``LISTEN``).
    """

    @abc.abstractmethod
    async def take(self) -> None:
        """Open a new session and prove life in it (after a loss too). Raises
        :class:`StoreError` (:class:`~watcher.errors.StoreUnavailable` while the database does
        not answer)."""

    @abc.abstractmethod
    async def watch(self, on_due: Callable[[], None], *, every: float) -> None:
        """Keep the session taken by :meth:`take`: call ``on_due`` when another process has
        made work due, check the session every ``every`` seconds (each check allowed the
        store's call timeout). Returns never; raises :class:`StoreError` once the session is
        lost (it is closed then: the caller must assume its leases may be taken over)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """End the session (its proof of life with it). Safe to call twice."""


class Store(TransitionWrites):
    """Durable state of the watcher. Methods are coroutines; implementations must be safe to
    call from one event loop concurrently."""

    @property
    def is_exclusive(self) -> bool:
        """Whether only this process can be working on the store (so every lease in it is a
        leftover of ours and can be released at start-up)."""
        return False

    @property
    def shares_rate_budget(self) -> bool:
        """Whether :meth:`take_rate_tokens` is a budget shared with other processes."""
        return False

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply migrations. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Safe to call twice."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""

    # --- tracking -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def track(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> TrackResult:
        """Start tracking ``refs`` (due at once); already tracked ids are left as they are."""

    @abc.abstractmethod
    async def revive(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> list[str]:
        """Track again, from scratch and due now, those of ``refs`` that ended ``not_found``
        (same id and kind): a wrong base URL, or a project looked for before it existed, must
        not be lost for good. Other projects are left as they are. Returns the revived ids."""

    @abc.abstractmethod
    async def untrack(self, project_id: str) -> bool:
        """Forget a project and its outputs' records (files stay). True if it was tracked."""

    @abc.abstractmethod
    async def get(self, project_id: str) -> ProjectRecord | None:
        """The project, or ``None``."""

    @abc.abstractmethod
    async def list_projects(
        self, *, state: State | None = None, limit: int = 100, cursor: str | None = None
    ) -> ProjectPage:
        """Projects in id order, ``limit`` at a time, after ``cursor``."""

    @abc.abstractmethod
    async def count_by_state(self) -> dict[State, int]:
        """How many projects are in each state."""

    @abc.abstractmethod
    async def outputs(self, project_id: str) -> list[OutputRecord]:
        """The project's outputs in index order."""

    @abc.abstractmethod
    async def outputs_of(self, project_ids: list[str]) -> dict[str, list[OutputRecord]]:
        """The outputs of every project of ``project_ids`` in one query (a page of a list),
        each in index order; a project without outputs maps to an empty list."""

    # --- scheduling ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def note_active(self, failure: str, *, now: float) -> int:
        """Record ``failure`` on every active project (the API refused the token, or wants
        payment): what holds them all up shows in their record. Their next good poll or saved
        output clears it. Returns how many projects it touched."""

    @abc.abstractmethod
    async def render_durations(self, kind: Kind, *, limit: int) -> list[float]:
        """How long the latest ``limit`` renders of ``kind`` took, oldest first.

        Seconds from tracking to the first terminal answer, for projects that were seen in
        progress at least once (``polls >= 2``: a project already finished when first polled
        says nothing about render times). The schedule learns from these at start-up, and on a
        shared store from every replica's renders.
        """

    @abc.abstractmethod
    async def claim_due(
        self, *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> list[Claim]:
        """Lease up to ``limit`` active projects whose ``due_at <= now``, earliest first."""

    @abc.abstractmethod
    async def next_due_at(self) -> float | None:
        """The earliest ``due_at`` of an active project, or ``None`` if none is active."""

    async def claim_due_and_next(
        self, *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> Claimed:
        """:meth:`claim_due`, then :meth:`next_due_at`: a backend that can answers both in one
        round trip (SQLite: one call on its thread, not two)."""
        claims = await self.claim_due(
            now=now, limit=limit, owner=owner, lease_seconds=lease_seconds
        )
        return Claimed(claims, await self.next_due_at())

    @abc.abstractmethod
    async def release_leases(self, *, now: float, owner: str | None = None) -> int:
        """Make leased projects due ``now`` (those of ``owner``, or all). Returns how many."""

    def liveness(self, owner: str) -> Liveness | None:
        """A new (untaken) :class:`Liveness` session of replica ``owner``, or ``None`` for a
        store that one daemon alone works on (SQLite, memory): nobody else could take over."""
        del owner
        return None

    async def expire_dead_leases(self, *, now: float) -> dict[str, str]:
        """Make due ``now`` the projects leased to replicas whose liveness session has ended
        (they died, or were cut off from the store), keeping the lease's owner, so the next
        claim takes them over as after a lease expiry. Returns ``{project id: dead owner}``.

        This default finds none: without :meth:`liveness` there is nobody to find dead."""
        del now
        return {}

    @abc.abstractmethod
    async def renew(self, claim: Claim, *, now: float, lease_seconds: float) -> bool:
        """Extend a lease still held under ``claim``. False if it was released or taken over."""

    @abc.abstractmethod
    async def expedite(self, project_id: str, *, now: float) -> bool:
        """Make an active project due now (e.g. a webhook said it changed). True if active."""

    # --- writes that end a piece of work (fenced by the claim) -------------------------------
    # (and the state changes of TransitionWrites: record_poll, _retry, _saved, _final)

    @abc.abstractmethod
    async def record_complete(
        self, claim: Claim, *, now: float, due_at: float, outputs: list[NewOutput]
    ) -> list[OutputRecord]:
        """The project is complete: store its outputs (refreshing URLs of pending ones, keeping
        the others, adding the ones listed for the first time) and move it to ``downloading``.
        Coming from ``polling`` (a good GET), the failures in a row are cleared; a GET for fresh
        URLs keeps them. The caller keeps the lease (until ``due_at``) and goes on to download.
        Returns all its outputs."""

    @abc.abstractmethod
    async def record_output_verified(
        self, claim: Claim, *, index: int, size: int, sha256: str
    ) -> None:
        """The output's temporary file is complete and fsynced; its size and digest are known."""

    @abc.abstractmethod
    async def record_output_uploading(self, claim: Claim, *, index: int, key: str) -> None:
        """The output is about to be uploaded under the temporary object key ``key`` (object
        storage): recorded before the first byte is sent, so a restart finds the upload."""

    @abc.abstractmethod
    async def record_output_saved(self, claim: Claim, *, index: int, now: float) -> None:
        """The output is under its final name, fsynced. That is progress: the project's failures
        in a row, ``stalled_since`` and failure note are cleared with it."""

    @abc.abstractmethod
    async def reset_output(self, claim: Claim, *, index: int) -> None:
        """Mark an output pending again (its file was found missing or wrong at recovery).

        Fenced like every output write: a replica that lost its lease cannot undo the output
        the new holder has verified.
        """

    # --- the notification outbox ---------------------------------------------------------------

    @abc.abstractmethod
    async def claim_notifications(
        self, *, now: float, limit: int, lease_seconds: float
    ) -> list[Notification]:
        """Due, unsent notifications, oldest first; each is hidden for ``lease_seconds``."""

    @abc.abstractmethod
    async def notification_sent(self, notification_id: int, *, now: float) -> None:
        """The receiver acknowledged it."""

    @abc.abstractmethod
    async def notification_failed(self, notification_id: int, *, due_at: float, error: str) -> None:
        """Delivery failed; try again at ``due_at``."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every committed write durable against power loss (before a DELETE)."""

    # --- the fleet's request budget --------------------------------------------------------------

    async def take_rate_tokens(self, *, now: float, rate: float, burst: float, want: int) -> int:
        """Take up to ``want`` tokens from the API budget every user of this store shares.

        The budget is a token bucket refilled at ``rate`` tokens per second up to ``burst``;
        ``now`` is wall-clock Unix seconds (replicas compare them, so their clocks must roughly
        agree). Returns how many tokens were granted, from 0 to ``want``: the caller sends that
        many requests and asks again later for the rest.

        This default grants all of ``want``: a store that one daemon alone works on (SQLite,
        memory) leaves the budget to the process's own limiter. Shared backends override it.
        """
        del now, rate, burst
        return max(want, 0)

    # --- the fleet's gauges ----------------------------------------------------------------------

    async def reports_fleet_gauges(self) -> bool:
        """Whether this process is the one that reports the gauges read from this store.

        Every replica of a shared store reads the same rows, so if each reported them a ``sum``
        over replicas would multiply them: a shared backend lets exactly one process at a time
        say yes (PostgreSQL: whoever holds an advisory lock; it passes on when that process
        dies). This default says yes: a store that one daemon alone works on is its own fleet.
        """
        return True
