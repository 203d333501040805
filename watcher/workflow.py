"""The per-project workflow: what happens to one claimed project, from its GET to its end.

:class:`Workflow` is given a claim (a project and the lease version that fences its writes)
and does the work its stored state calls for, then returns; the dispatcher
(:mod:`watcher.dispatcher`) decides when and how many run. Each step is a decision over what
the store holds, the API's answer and ``now``:

- ``polling``: GET the project, or take the verified webhook payload waiting for it
  (:mod:`watcher.announcements`: the same object a GET answers, acted on the same way); a
  non-terminal status is rescheduled with backoff (no sooner than the webhook fallback while
  events arrive); ``complete`` records the outputs and goes straight on to download them;
  ``error``/``canceled``/404 end it.
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
nothing: a project's work whose store call failed waits for the store, then goes on from what
the store durably holds under the same lease (:meth:`Workflow._resume`). That is the
crash-recovery path without the crash: the failed write had not been committed, so the step it
recorded is redone or finished from disk, as after a ``kill -9`` at that instant, and nothing
is lost.

Faults of one project are its own: a transient API error is retried with backoff (or, for a GET
that fails :attr:`WorkflowLimits.max_poll_failures` times in a row while others succeed,
quarantined), a bug is noted and retried (quarantined after
:attr:`WorkflowLimits.max_crashes` in a row). Refusals that concern every project (401, 402) are
:mod:`watcher.health`'s. The tunable limits are one frozen :class:`WorkflowLimits`; the clock is
read through ``now`` and randomness drawn from ``rng``, so a test drives all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Unpack

import structlog

from watcher import clock
from watcher.announcements import RANK, Announcements
from watcher.api import MagicHourClient
from watcher.backoff import GiveUpLimits, PollPolicy, next_attempt, stalled_for_good
from watcher.downloader import (
    Downloader,
    OnVerified,
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
    ObjectStorageError,
    ProjectNotFound,
    StoreError,
    StoreUnavailable,
    TransientApiError,
    Unauthorized,
)
from watcher.health import ApiHealth
from watcher.logs import LogContext
from watcher.metrics import Metrics
from watcher.models import ProjectRef, ProjectSnapshot, RemoteStatus, State
from watcher.objects import (
    StorageLocation,
    Uploader,
    check_storage,
    remove_uploads,
    sweep_uploads,
    upload_key,
)
from watcher.outage import StoreHealth
from watcher.paths import is_part_name, output_relpath, part_path, resolve_inside
from watcher.priority import PriorityGate
from watcher.schedule import RenderStats, next_poll_delay
from watcher.store import (
    Claim,
    Ending,
    LeaseLost,
    NewOutput,
    NotificationBuilder,
    OutputRecord,
    OutputState,
    ProjectRecord,
    Store,
)
from watcher.views import notification_event

log = structlog.get_logger("watcher")

DISK_FULL_RETRY_SECONDS = 60.0
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


class StoreFailed(Protocol):
    """Told when a store call of the work failed (the dispatcher pauses claiming)."""

    def __call__(self, exc: StoreError, *, during: str) -> None: ...


@dataclass(frozen=True, slots=True)
class WorkflowLimits:
    """When the workflow stops trying: the limits a test (or an operator's patch) tunes.

    ``max_poll_failures`` GETs failed in a row (while others succeed) quarantine a project;
    ``max_crashes`` crashes in a row, or ``max_interruptions`` leases that ran out in a row,
    quarantine it too; a full disk is retried after ``disk_full_retry_seconds``; ``give_up``
    says when downloads stop making progress; ``base_url_suspect_404s`` first GETs all 404 make
    the run suspect its base URL.
    """

    max_poll_failures: int = MAX_POLL_FAILURES
    disk_full_retry_seconds: float = DISK_FULL_RETRY_SECONDS
    give_up: GiveUpLimits = field(default_factory=GiveUpLimits)
    max_crashes: int = MAX_CRASHES
    max_interruptions: int = MAX_INTERRUPTIONS
    base_url_suspect_404s: int = BASE_URL_SUSPECT_404S


class Workflow:
    """Works on one claimed project at a time (many concurrently); see the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        api: MagicHourClient,
        downloader: Downloader,
        health: ApiHealth,
        store_health: StoreHealth,
        policy: PollPolicy,
        limits: WorkflowLimits,
        lease_seconds: float,
        download_dir: Path,
        stopping: asyncio.Event,
        on_store_failed: StoreFailed,
        metrics: Metrics | None = None,
        render_stats: RenderStats | None = None,
        download_gate: PriorityGate | None = None,
        notify: bool = False,
        announcements: Announcements | None = None,
        uploader: Uploader | None = None,
        now: Callable[[], float] = clock.now,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.api = api
        self.downloader = downloader
        self.health = health
        self.store_health = store_health
        self.policy = policy
        self.limits = limits
        self.lease_seconds = lease_seconds
        self.download_dir = download_dir
        self.stopping = stopping
        self.on_store_failed = on_store_failed
        self.metrics = metrics or Metrics()
        self.render_stats = render_stats or RenderStats()
        self.download_gate = download_gate or PriorityGate(1)
        self.announcements = announcements or Announcements(now=now)
        self.now = now
        self.rng = rng or random.Random()
        # Object storage (WATCHER_STORAGE_URL) instead of download_dir: see watcher.objects.
        self.uploader = uploader
        storage = uploader.bucket.location if uploader is not None else None
        self._announce = announcer(download_dir, storage) if notify else None
        self._last_good_get: tuple[float, str] | None = None  # when, and which project
        # Projects whose GET answered 404 before any API call succeeded (None once reported).
        self._not_found_at_start: set[str] | None = set()
        self.suspect_after = limits.base_url_suspect_404s

    async def check_outputs(self, replica_id: str) -> None:
        """Start-up, before any claim: in object storage, :class:`ConfigError` unless the bucket
        exists and these credentials may write to it."""
        if self.uploader is not None:
            await check_storage(self.uploader.bucket, replica_id)

    async def sweep(self, active: set[str]) -> int:
        """Start-up: remove the temporary files (or objects) of projects not in ``active``."""
        if self.uploader is not None:
            return await sweep_uploads(self.uploader.bucket, active)
        return await sweep_parts(self.store, self.download_dir, active)

    async def run(self, claim: Claim) -> None:
        """Do the work ``claim`` calls for, until the project is released (rescheduled or
        final). A bug is recorded on the project, never raised; cancellation is."""
        p = claim.project
        try:
            with LogContext(project_id=p.id, kind=p.kind.value):
                current: Claim | None = claim
                while current is not None:
                    try:
                        await self._step(current)
                    except StoreUnavailable as exc:
                        self.on_store_failed(exc, during="work")
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

    async def _crashed(self, claim: Claim, exc: Exception) -> None:
        """Record what crashed the work on the project (type and a short message), so status
        shows it; retried later, quarantined with that cause after ``MAX_CRASHES`` in a row."""
        p = claim.project
        text = " ".join(str(exc).split())
        secret = (
            self.health.settings.api_token.get_secret_value()
            if self.health.settings.api_token
            else ""
        )
        if secret:
            text = text.replace(secret, "[redacted]")
        if len(text) > CRASH_NOTE_CHARS:
            text = text[:CRASH_NOTE_CHARS] + "…"
        what = type(exc).__name__ + (f": {text}" if text else "")
        before = _CRASH_NOTE.match(p.failure or "")
        crashes = int(before.group(1)) + 1 if before else 1
        try:
            if crashes >= self.limits.max_crashes:
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
        if p.interruptions >= self.limits.max_interruptions:
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
        while await self.store_health.wait_up(self.stopping):
            try:
                record = await self.store.get(claim.id)
            except StoreUnavailable as exc:
                self.on_store_failed(exc, during="work")
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
        self.metrics.child(self.metrics.polls, p.kind.value).inc()
        try:
            snapshot = await self.api.get_project(p.ref)
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
        if len(self._not_found_at_start) < self.suspect_after:
            return
        log.error(
            "api_base_url_suspect",
            base_url=str(self.health.settings.api_base_url),
            path=exc.path,
            not_found=len(self._not_found_at_start),
            hint="every GET of this run so far answered 404: WATCHER_API_BASE_URL is probably "
            "wrong (it must not end in /v1); once fixed, `watcher track` revives the projects",
        )
        self._not_found_at_start = None

    async def _poll(self, claim: Claim) -> None:
        started = clock.monotonic()
        p = claim.project
        snapshot = self._announced(claim)
        if snapshot is None:
            snapshot = await self._get(claim)
            if snapshot is None:
                return
            self._last_good_get = (self.now(), p.id)
            # An event that arrived while the GET was in flight may know more than its answer.
            later = self._announced(claim)
            if later is not None and RANK[later.status] > RANK[snapshot.status]:
                snapshot = later
        now = self.now()
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
                self.policy,
                p.kind,
                status,
                age=now - p.tracked_at,
                attempt=attempt,
                rng=self.rng,
                window=window,
            )
            delay = self.announcements.poll_delay(p.kind, delay)
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

    def _announced(self, claim: Claim) -> ProjectSnapshot | None:
        """The verified webhook payload waiting for the project, taken (``None``: none)."""
        snapshot = self.announcements.take(claim.project)
        if snapshot is not None:
            self.metrics.webhook_payloads.labels(claim.project.kind.value).inc()
            log.debug(
                "webhook_payload_used",
                project_id=claim.id,
                kind=claim.project.kind.value,
                status=snapshot.status.value,
            )
        return snapshot

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
            outputs=new_outputs(p.ref, snapshot),
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
        now = self.now()
        rows = await self.store.record_complete(
            claim,
            now=now,
            due_at=now + self.lease_seconds,
            outputs=new_outputs(claim.project.ref, snapshot),
        )
        log.info("download_urls_refreshed", project_id=claim.id, outputs=len(rows))
        return rows

    async def _download(self, claim: Claim, rows: list[OutputRecord]) -> None:
        """Save every output not yet saved, then finish. After a refused link, the outputs
        to save are the ones the store lists after the fresh GET, new ones included."""
        pending = _unsaved(rows)
        refused = 0  # links refused in a row, with no output saved in between
        recorded = False  # whether the last save recorded the project saved with it
        try:
            while pending:
                row = pending[0]
                last = len(pending) == 1
                final = output_file(None if self.uploader else self.download_dir, row)
                before = part_bytes(final)
                try:
                    await self._save_output(claim, row, final, last=last)
                except DownloadUrlExpired as exc:
                    refused += 1
                    if refused > self.limits.give_up.refused_links:
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
                    gained = part_bytes(final) > before
                    await self._download_trouble(claim, exc, gained=gained)
                    return
                pending.pop(0)
                refused = 0
                recorded = last
        except InvalidProjectId as exc:
            await self._finish(claim, State.FAILED, failure=str(exc))
            return
        if not recorded:  # nothing was left to save
            await self._output_saved(claim, None, last=True)
        p = claim.project
        if p.delete_after_download:
            await self._delete(claim)
            return
        self.metrics.finished.labels(State.SAVED.value).inc()
        log.info("project_saved", project_id=p.id, kind=p.kind.value, state=State.SAVED.value)

    async def _save_output(
        self, claim: Claim, row: OutputRecord, final: Path | None, *, last: bool
    ) -> None:
        """Save one output to ``final`` (from :func:`output_file`); ``last``: the project's last one
        to save (see :meth:`_output_saved`)."""
        if self.uploader is not None:
            await self._save_object(claim, row, self.uploader, last=last)
            return
        assert final is not None  # noqa: S101 - None only into object storage
        if row.state == OutputState.VERIFIED and row.bytes is not None and row.sha256:
            if await asyncio.to_thread(finish_from_disk, final, row.bytes, row.sha256):
                await self._output_saved(claim, row.index, last=last)
                log.info(
                    "download_recovered", project_id=claim.id, index=row.index, path=str(final)
                )
                return
            await self.store.reset_output(claim, index=row.index)
        on_verified = verified_recorder(self.store, claim, row.index)

        started = clock.monotonic()
        async with self.download_gate.slot(row.expires_at):
            saved = await self.downloader.fetch(row.url, final, on_verified)
        where = {"path": str(final), "resumed_from": saved.resumed_from}
        await self._saved(
            claim, row, started, last=last, size=saved.size, sha256=saved.sha256, **where
        )

    async def _save_object(
        self, claim: Claim, row: OutputRecord, uploader: Uploader, *, last: bool
    ) -> None:
        """Save one output into object storage, in the order of writes of
        :mod:`watcher.objects`: a verified one is finished from the bucket if it can be; any
        other starts again under a new temporary key, recorded before the first byte."""
        url = uploader.url(row.path)
        size, sha256 = row.bytes, row.sha256
        verified = row.state == OutputState.VERIFIED and size is not None and sha256
        if verified and await uploader.finish(row.upload_key, row.path, size or 0, sha256 or ""):
            await self._output_saved(claim, row.index, last=last)
            log.info("download_recovered", project_id=claim.id, index=row.index, url=url)
            return
        if row.upload_key is not None:  # an upload of an earlier attempt: gone for good
            await uploader.bucket.delete(row.upload_key)
        if row.state != OutputState.PENDING:
            await self.store.reset_output(claim, index=row.index)
        key = upload_key(row.path)
        await self.store.record_output_uploading(claim, index=row.index, key=key)
        on_verified = verified_recorder(self.store, claim, row.index)

        started = clock.monotonic()
        async with self.download_gate.slot(row.expires_at):
            saved = await uploader.upload(row.url, row.path, key, on_verified)
        await self._saved(
            claim, row, started, last=last, size=saved.size, sha256=saved.sha256, url=saved.url
        )

    async def _saved(
        self,
        claim: Claim,
        row: OutputRecord,
        started: float,
        *,
        last: bool,
        size: int,
        sha256: str,
        **where: object,
    ) -> None:
        """Record an output saved (the last step of either order of writes); count and log it
        with ``where`` it is (its ``path`` on disk, or its object's ``url``)."""
        await self._output_saved(claim, row.index, last=last)
        now = self.now()
        elapsed = clock.monotonic() - started
        self.metrics.downloads.labels("saved").inc()
        self.metrics.download_seconds.observe(elapsed)
        self.metrics.url_lifetime_left.observe(max(0.0, row.expires_at - now))
        log.info(
            "download_saved",
            project_id=claim.id,
            kind=claim.project.kind.value,
            index=row.index,
            **where,
            bytes=size,
            sha256=sha256,
            elapsed_ms=round(elapsed * 1000, 1),
            expires_in=round(row.expires_at - now, 1),
        )

    async def _output_saved(self, claim: Claim, index: int | None, *, last: bool) -> None:
        """Record output ``index`` saved. The project's ``last`` one to save (or ``None``, when
        none was left to save) ends the project ``saved``, or moves it on to ``deleting``, in
        the same transaction: one commit, not two, and the same rows written."""
        now = self.now()
        if not last and index is not None:
            await self.store.record_output_saved(claim, index=index, now=now)
            return
        await self.store.record_saved(
            claim,
            now=now,
            due_at=now + self.lease_seconds,
            delete_next=claim.project.delete_after_download,
            notify=self._announce,
            last_output=index,
        )

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
            deleted = await self.api.delete_project(p.ref)
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
        already_gone: bool | None = None,
        path: str | None = None,
        **ending: Unpack[Ending],
    ) -> None:
        p = claim.project
        failure = ending.get("failure")
        await self.store.record_final(
            claim, now=self.now(), state=state, notify=self._announce, **ending
        )
        self.metrics.finished.labels(state.value).inc()
        await self._remove_parts(p.kind.value, p.id)
        fields: dict[str, object] = {"project_id": p.id, "kind": p.kind.value, "state": state.value}
        if state == State.ERROR:
            log.warning(
                "project_error",
                **fields,
                error_code=ending.get("error_code"),
                error_message=ending.get("error_message"),
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
        """Remove the temporary files (or objects) of a project that has reached its final
        state."""
        if self.uploader is not None:
            with contextlib.suppress(StoreError, ObjectStorageError):  # if not now, at start-up
                await remove_uploads(self.store, self.uploader.bucket, project_id)
            return
        parts = await asyncio.to_thread(find_parts, self.download_dir / kind / project_id, "*")
        if parts:
            with contextlib.suppress(StoreError):  # if not now, the next start-up's sweep
                doomed = await removable_parts(self.store, self.download_dir, project_id, parts)
                await asyncio.to_thread(remove_files, doomed)

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
        now = self.now()
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
                await self.store.note_active(refusal.note, now=self.now())
            await self._retry(claim, refusal.note, count=False, delay=refusal.retry_in)
            if isinstance(exc, Unauthorized):
                self.health.hold(claim.id)
        elif isinstance(exc, TransientApiError):
            failures = claim.project.failures + 1
            if (
                claim.project.state == State.POLLING
                and failures >= self.limits.max_poll_failures
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
        return other != project_id and self.now() - at <= 2 * self.policy.maximum

    async def _download_trouble(self, claim: Claim, exc: DownloadError, *, gained: bool) -> None:
        """A download failed: retry, or give up if the project has stopped making progress.

        ``gained``: the failed transfer added bytes to its ``.part`` (a cut that resumes). The
        run of failures so far is read from the store, which clears it on every saved output
        and on the good GET that ended polling (the claimed record predates those).
        """
        self.metrics.downloads.labels(type(exc).__name__).inc()
        if isinstance(exc, DiskFull):
            log.error("disk_full", project_id=claim.id, error=str(exc))
            delay = self.limits.disk_full_retry_seconds
            await self._retry(claim, str(exc), count=False, delay=delay)
            return
        if gained:
            self.metrics.retries.labels(type(exc).__name__).inc()
            await self._retry(claim, str(exc), count=False, progressed=True)
            return
        p, now = await self.store.get(claim.id) or claim.project, self.now()
        failures = p.failures + 1
        since = now if p.stalled_since is None else p.stalled_since
        if stalled_for_good(self.limits.give_up, failures=failures, stalled_since=since, now=now):
            failure = (
                f"outputs could not be saved: {failures} tries in a row over "
                f"{now - since:.0f} s gained no byte; the last: {exc}"
            )
            await self._finish(claim, State.FAILED, failure=failure)
            return
        self.metrics.retries.labels(type(exc).__name__).inc()
        await self._retry(claim, str(exc), count=True, failures=failures)


def verified_recorder(store: Store, claim: Claim, index: int) -> OnVerified:
    """What records output ``index`` verified once its bytes are complete (size, sha256)."""

    async def on_verified(size: int, sha256: str) -> None:
        await store.record_output_verified(claim, index=index, size=size, sha256=sha256)

    return on_verified


def new_outputs(ref: ProjectRef, snapshot: ProjectSnapshot) -> list[NewOutput]:
    """The outputs a ``complete`` snapshot lists, with the path each is saved under."""
    return [
        NewOutput(
            index=i,
            url=link.url,
            expires_at=link.expires_at.timestamp(),
            path=output_relpath(ref.kind, ref.id, i, link.url),
        )
        for i, link in enumerate(snapshot.downloads)
    ]


def announcer(download_dir: Path, storage: StorageLocation | None = None) -> NotificationBuilder:
    """What builds the event announcing a final state from the row the store writes (in the
    same transaction); with ``storage``, outputs are named by their objects' URLs."""

    def build(record: ProjectRecord, outputs: list[OutputRecord]) -> str:
        event = notification_event(
            record, outputs, download_dir, now=record.updated_at, storage=storage
        )
        return json.dumps(event)

    return build


async def sweep_parts(store: Store, download_dir: Path, active: set[str]) -> int:
    """Remove temporary files of projects no longer downloading (crash leftovers)."""
    found = await asyncio.to_thread(find_parts, download_dir, "*/*/*")
    by_project: dict[str, list[Path]] = {}
    for part in found:
        if part.parent.name not in active:
            by_project.setdefault(part.parent.name, []).append(part)
    doomed: list[Path] = []
    for project_id, parts in sorted(by_project.items()):
        doomed += await removable_parts(store, download_dir, project_id, parts)
    return await asyncio.to_thread(remove_files, doomed)


async def removable_parts(
    store: Store, download_dir: Path, project_id: str, parts: list[Path]
) -> list[Path]:
    """Of ``parts``, files in the project's folder that look temporary, those safe to remove:
    never a path the store records as an output, and a name of an earlier version (which an
    output can have too) only for a project the store knows."""
    recorded = {o.path for o in await store.outputs(project_id)}
    known = bool(recorded) or await store.get(project_id) is not None
    return [
        part
        for part in parts
        if part.relative_to(download_dir).as_posix() not in recorded
        and (known or is_part_name(part.name))
    ]


def output_file(download_dir: Path | None, row: OutputRecord) -> Path | None:
    """The path on disk ``row`` is saved under, inside ``download_dir`` (resolved once per save:
    a ``realpath``); ``None`` into object storage."""
    return None if download_dir is None else resolve_inside(download_dir, row.path)


def part_bytes(final: Path | None) -> int:
    """How many bytes the ``.part`` file of ``final`` holds (0 without one, and for ``None``:
    in object storage an interrupted upload starts over). On the loop: a ``stat`` costs less
    than a trip to a thread."""
    if final is None:
        return 0
    with contextlib.suppress(FileNotFoundError):
        return part_path(final).stat().st_size
    return 0


def _unsaved(rows: list[OutputRecord]) -> list[OutputRecord]:
    """The outputs still to save, the one whose link expires first at the head."""
    return sorted((r for r in rows if r.state != OutputState.SAVED), key=lambda r: r.expires_at)
