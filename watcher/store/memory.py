"""The in-memory store: a fake for unit tests, with the same contract as the real backends.

It keeps everything in dictionaries and scans them to claim work, which is fine for the small
sets tests use; the real backends claim through an index.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

from watcher.models import ACTIVE_STATES, Kind, ProjectRef, RemoteStatus, State
from watcher.store.base import (
    Claim,
    LeaseLost,
    NewOutput,
    Notification,
    NotificationBuilder,
    OutputRecord,
    OutputState,
    ProjectPage,
    ProjectRecord,
    Store,
    TrackResult,
    require_saved,
)


class InMemoryStore(Store):
    """A :class:`Store` in memory; nothing survives the process."""

    def __init__(self) -> None:
        self.projects: dict[str, ProjectRecord] = {}
        self.output_rows: dict[str, dict[int, OutputRecord]] = {}
        self.notifications: dict[int, tuple[Notification, float, float | None]] = {}
        self._lock = asyncio.Lock()
        self._versions = itertools.count(1)  # fencing versions, never issued twice
        self.opened = False

    @property
    def is_exclusive(self) -> bool:
        return True

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.opened = False

    async def ping(self) -> None:
        return None

    async def track(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> TrackResult:
        result = TrackResult()
        for ref in refs:
            if ref.id in self.projects:
                result.existing.append(ref.id)
                continue
            self.projects[ref.id] = ProjectRecord(
                id=ref.id,
                kind=ref.kind,
                state=State.POLLING,
                remote_status=None,
                delete_after_download=delete_after_download,
                due_at=now,
                attempt=0,
                polls=0,
                tracked_at=now,
                updated_at=now,
            )
            result.added.append(ref.id)
        return result

    async def revive(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> list[str]:
        revived: list[str] = []
        for ref in refs:
            p = self.projects.get(ref.id)
            if p is None or p.kind != ref.kind or p.state != State.NOT_FOUND:
                continue
            self.projects[ref.id] = ProjectRecord(
                id=ref.id,
                kind=ref.kind,
                state=State.POLLING,
                remote_status=None,
                delete_after_download=delete_after_download,
                due_at=now,
                attempt=0,
                polls=0,
                tracked_at=now,
                updated_at=now,
                lease_version=p.lease_version,
            )
            revived.append(ref.id)
        return revived

    async def untrack(self, project_id: str) -> bool:
        self.output_rows.pop(project_id, None)
        return self.projects.pop(project_id, None) is not None

    async def get(self, project_id: str) -> ProjectRecord | None:
        return self.projects.get(project_id)

    async def list_projects(
        self, *, state: State | None = None, limit: int = 100, cursor: str | None = None
    ) -> ProjectPage:
        ids = sorted(
            pid
            for pid, p in self.projects.items()
            if (state is None or p.state == state) and (cursor is None or pid > cursor)
        )
        page = [self.projects[pid] for pid in ids[:limit]]
        more = len(ids) > limit
        return ProjectPage(page, page[-1].id if more and page else None)

    async def count_by_state(self) -> dict[State, int]:
        counts: dict[State, int] = {}
        for p in self.projects.values():
            counts[p.state] = counts.get(p.state, 0) + 1
        return counts

    async def outputs(self, project_id: str) -> list[OutputRecord]:
        rows = self.output_rows.get(project_id, {})
        return [rows[i] for i in sorted(rows)]

    async def note_active(self, failure: str, *, now: float) -> int:
        active = [p for p in self.projects.values() if p.state in ACTIVE_STATES]
        for p in active:
            self.projects[p.id] = dataclasses.replace(p, failure=failure, updated_at=now)
        return len(active)

    async def outputs_of(self, project_ids: list[str]) -> dict[str, list[OutputRecord]]:
        return {pid: await self.outputs(pid) for pid in project_ids}

    async def render_durations(self, kind: Kind, *, limit: int) -> list[float]:
        done = [
            p
            for p in self.projects.values()
            if p.kind == kind and p.terminal_at is not None and p.polls >= 2
        ]
        done.sort(key=lambda p: p.terminal_at or 0.0)
        return [(p.terminal_at or 0.0) - p.tracked_at for p in done[-limit:]] if limit > 0 else []

    async def claim_due(
        self, *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> list[Claim]:
        async with self._lock:
            due = sorted(
                (p for p in self.projects.values() if p.state in ACTIVE_STATES and p.due_at <= now),
                key=lambda p: (p.due_at, p.id),
            )[:limit]
            claims = []
            for p in due:
                leased = dataclasses.replace(
                    p,
                    due_at=now + lease_seconds,
                    lease_owner=owner,
                    lease_version=next(self._versions),
                    interruptions=p.interruptions + (p.lease_owner is not None),
                )
                self.projects[p.id] = leased
                claims.append(Claim(leased, leased.lease_version))
            return claims

    async def next_due_at(self) -> float | None:
        dues = [p.due_at for p in self.projects.values() if p.state in ACTIVE_STATES]
        return min(dues, default=None)

    async def release_leases(self, *, now: float, owner: str | None = None) -> int:
        released = 0
        for pid, p in list(self.projects.items()):
            if p.lease_owner is not None and (owner is None or p.lease_owner == owner):
                self.projects[pid] = dataclasses.replace(
                    p, lease_owner=None, due_at=min(p.due_at, now)
                )
                released += 1
        return released

    async def renew(self, claim: Claim, *, now: float, lease_seconds: float) -> bool:
        p = self.projects.get(claim.id)
        if p is None or p.lease_version != claim.version or p.lease_owner is None:
            return False
        self.projects[p.id] = dataclasses.replace(p, due_at=now + lease_seconds)
        return True

    async def expedite(self, project_id: str, *, now: float) -> bool:
        p = self.projects.get(project_id)
        if p is None or p.state not in ACTIVE_STATES:
            return False
        if p.lease_owner is None:
            self.projects[project_id] = dataclasses.replace(p, due_at=min(p.due_at, now))
        return True

    def _fenced(self, claim: Claim) -> ProjectRecord:
        p = self.projects.get(claim.id)
        if p is None or p.lease_version != claim.version:
            raise LeaseLost(f"lease on project {claim.id} was lost")
        return p

    def _update(self, claim: Claim, now: float, **changes: object) -> None:
        p = self._fenced(claim)
        self.projects[p.id] = dataclasses.replace(p, updated_at=now, **changes)  # type: ignore[arg-type]

    async def record_poll(
        self,
        claim: Claim,
        *,
        now: float,
        remote_status: RemoteStatus,
        attempt: int,
        due_at: float,
    ) -> None:
        p = self._fenced(claim)
        self._update(
            claim,
            now,
            remote_status=remote_status,
            attempt=attempt,
            due_at=due_at,
            polls=p.polls + 1,
            lease_owner=None,
            failures=0,
            failure=None,
            stalled_since=None,
            interruptions=0,
        )

    async def record_retry(
        self,
        claim: Claim,
        *,
        now: float,
        due_at: float,
        failure: str,
        count_failure: bool = True,
        progressed: bool = False,
    ) -> None:
        p = self._fenced(claim)
        failures, stalled_since = p.failures, p.stalled_since
        if progressed:
            failures, stalled_since = 0, None
        elif count_failure:
            failures = failures + 1
            stalled_since = now if stalled_since is None else stalled_since
        self._update(
            claim,
            now,
            due_at=due_at,
            failure=failure,
            failures=failures,
            stalled_since=stalled_since,
            lease_owner=None,
            interruptions=0,
        )

    async def record_complete(
        self, claim: Claim, *, now: float, due_at: float, outputs: list[NewOutput]
    ) -> list[OutputRecord]:
        p = self._fenced(claim)
        rows = self.output_rows.setdefault(p.id, {})
        for new in outputs:
            old = rows.get(new.index)
            if old is not None and old.state != OutputState.PENDING:
                continue
            rows[new.index] = OutputRecord(
                project_id=p.id,
                index=new.index,
                url=new.url,
                expires_at=new.expires_at,
                path=old.path if old is not None else new.path,
                state=OutputState.PENDING,
            )
        polled = p.state == State.POLLING  # a good GET ends a run of failed ones
        self._update(
            claim,
            now,
            state=State.DOWNLOADING,
            remote_status=RemoteStatus.COMPLETE,
            failures=0 if polled else p.failures,
            stalled_since=None if polled else p.stalled_since,
            polls=p.polls + 1,
            terminal_at=p.terminal_at if p.terminal_at is not None else now,
            due_at=due_at,
            interruptions=0,
        )
        return await self.outputs(p.id)

    async def record_output_verified(
        self, claim: Claim, *, index: int, size: int, sha256: str
    ) -> None:
        self._fenced(claim)
        row = self.output_rows[claim.id][index]
        self.output_rows[claim.id][index] = dataclasses.replace(
            row, state=OutputState.VERIFIED, bytes=size, sha256=sha256
        )

    async def record_output_saved(self, claim: Claim, *, index: int, now: float) -> None:
        p = self._fenced(claim)
        row = self.output_rows[claim.id][index]
        self.output_rows[claim.id][index] = dataclasses.replace(
            row, state=OutputState.SAVED, saved_at=now
        )
        self.projects[p.id] = dataclasses.replace(p, failures=0, stalled_since=None, failure=None)

    async def reset_output(self, claim: Claim, *, index: int) -> None:
        self._fenced(claim)
        row = self.output_rows[claim.id][index]
        self.output_rows[claim.id][index] = dataclasses.replace(
            row, state=OutputState.PENDING, bytes=None, sha256=None, saved_at=None
        )

    async def record_saved(
        self,
        claim: Claim,
        *,
        now: float,
        due_at: float,
        delete_next: bool,
        notify: NotificationBuilder | None = None,
    ) -> None:
        state = State.DELETING if delete_next else State.SAVED
        self._fenced(claim)
        require_saved(claim.id, state, await self.outputs(claim.id))
        # The troubles on the way are over.
        cleared: dict[str, object] = {"failure": None, "failures": 0, "stalled_since": None}
        if delete_next:
            self._update(claim, now, state=state, due_at=due_at, **cleared)
        else:
            self._update(claim, now, state=state, finished_at=now, lease_owner=None, **cleared)
            await self._enqueue(claim.id, notify, now)

    async def _enqueue(
        self, project_id: str, notify: NotificationBuilder | None, now: float
    ) -> None:
        """Queue the event ``notify`` builds from the project as just written."""
        if notify is not None:
            body = notify(self.projects[project_id], await self.outputs(project_id))
            nid = len(self.notifications) + 1
            self.notifications[nid] = (Notification(nid, project_id, body, 0, now), now, None)

    async def record_final(
        self,
        claim: Claim,
        *,
        now: float,
        state: State,
        remote_status: RemoteStatus | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        failure: str | None = None,
        notify: NotificationBuilder | None = None,
    ) -> None:
        p = self._fenced(claim)
        require_saved(p.id, state, await self.outputs(p.id))
        terminal = remote_status is not None and remote_status.is_terminal
        self._update(
            claim,
            now,
            state=state,
            remote_status=remote_status or p.remote_status,
            error_code=error_code,
            error_message=error_message,
            failure=failure or p.failure if state == State.FAILED else failure,
            finished_at=now,
            terminal_at=p.terminal_at or (now if terminal else None),
            polls=p.polls + (1 if remote_status is not None else 0),
            lease_owner=None,
        )
        await self._enqueue(p.id, notify, now)

    async def pending_outputs(self) -> list[OutputRecord]:
        return [
            row
            for rows in self.output_rows.values()
            for row in rows.values()
            if row.state == OutputState.VERIFIED
        ]

    async def claim_notifications(
        self, *, now: float, limit: int, lease_seconds: float
    ) -> list[Notification]:
        due = sorted(
            (
                n
                for n, due_at, sent in self.notifications.values()
                if sent is None and due_at <= now
            ),
            key=lambda n: n.id,
        )[:limit]
        for n in due:
            self.notifications[n.id] = (n, now + lease_seconds, None)
        return due

    async def notification_sent(self, notification_id: int, *, now: float) -> None:
        n, due_at, _ = self.notifications[notification_id]
        self.notifications[notification_id] = (n, due_at, now)

    async def notification_failed(self, notification_id: int, *, due_at: float, error: str) -> None:
        n, _, sent = self.notifications[notification_id]
        failed = dataclasses.replace(n, attempts=n.attempts + 1, last_error=error)
        self.notifications[notification_id] = (failed, due_at, sent)

    async def flush(self) -> None:
        return None


__all__ = ["InMemoryStore", "Kind"]
