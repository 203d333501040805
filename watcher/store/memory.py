"""The in-memory store: a fake for unit tests, with the same contract as the real backends.

It keeps everything in dictionaries and scans them to claim work, which is fine for the small
sets tests use; the real backends claim through an index. Every change of a record is the one
:mod:`watcher.store.transitions` defines (the SQL stores persist the same), so the fake cannot
drift from them; it only adds the bookkeeping (fencing, the outbox) around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable

from watcher.models import ACTIVE_STATES, Kind, ProjectRef, State
from watcher.store import transitions as t
from watcher.store.base import Store
from watcher.store.records import (
    Change,
    Claim,
    LeaseLost,
    NewOutput,
    Notification,
    NotificationBuilder,
    OutputRecord,
    OutputState,
    ProjectPage,
    ProjectRecord,
    TrackResult,
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
            self.projects[ref.id] = t.tracked(
                ref, now=now, delete_after_download=delete_after_download
            )
            result.added.append(ref.id)
        return result

    async def revive(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> list[str]:
        revived: list[str] = []
        for ref in refs:
            p = self.projects.get(ref.id)
            if p is None or not t.can_revive(p, ref):
                continue
            self.projects[ref.id] = t.revived(
                p, now=now, delete_after_download=delete_after_download
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
            self.projects[p.id] = t.noted(p, failure=failure, now=now)
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
                leased = t.leased(
                    p, owner=owner, until=now + lease_seconds, version=next(self._versions)
                )
                self.projects[p.id] = leased
                claims.append(Claim(leased, leased.lease_version))
            return claims

    async def next_due_at(self) -> float | None:
        dues = [p.due_at for p in self.projects.values() if p.state in ACTIVE_STATES]
        return min(dues, default=None)

    async def release_leases(self, *, now: float, owner: str | None = None) -> int:
        held = [p for p in self.projects.values() if t.releasable(p, owner)]
        for p in held:
            self.projects[p.id] = t.released(p, now=now)
        return len(held)

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
        self.projects[project_id] = t.expedited(p, now=now)
        return True

    def _fenced(self, claim: Claim) -> ProjectRecord:
        p = self.projects.get(claim.id)
        if p is None or p.lease_version != claim.version:
            raise LeaseLost(f"lease on project {claim.id} was lost")
        return p

    async def _apply(self, claim: Claim, change: Change) -> None:
        self.projects[claim.id] = change(self._fenced(claim))

    def _output_write(
        self, claim: Claim, index: int, change: Callable[[OutputRecord], OutputRecord]
    ) -> None:
        self._fenced(claim)
        rows = self.output_rows[claim.id]
        rows[index] = change(rows[index])

    async def record_complete(
        self, claim: Claim, *, now: float, due_at: float, outputs: list[NewOutput]
    ) -> list[OutputRecord]:
        p = self._fenced(claim)
        rows = self.output_rows.setdefault(p.id, {})
        for new in outputs:
            old = rows.get(new.index)
            if not t.takes_fresh_url(old):
                continue
            rows[new.index] = OutputRecord(
                project_id=p.id,
                index=new.index,
                url=new.url,
                expires_at=new.expires_at,
                path=old.path if old is not None else new.path,
                state=OutputState.PENDING,
            )
        await self._apply(claim, lambda p: t.completed(p, now=now, due_at=due_at))
        return await self.outputs(p.id)

    async def record_output_verified(
        self, claim: Claim, *, index: int, size: int, sha256: str
    ) -> None:
        self._output_write(claim, index, lambda o: t.output_verified(o, size=size, sha256=sha256))

    async def record_output_uploading(self, claim: Claim, *, index: int, key: str) -> None:
        self._output_write(claim, index, lambda o: t.output_uploading(o, key=key))

    async def record_output_saved(self, claim: Claim, *, index: int, now: float) -> None:
        self._output_write(claim, index, lambda o: t.output_saved(o, now=now))
        await self._apply(claim, t.progressed)

    async def reset_output(self, claim: Claim, *, index: int) -> None:
        self._output_write(claim, index, t.output_reset)

    async def _finish(
        self,
        claim: Claim,
        change: Change,
        *,
        now: float,
        notify: NotificationBuilder | None,
        saved_output: int | None = None,
    ) -> None:
        after = change(self._fenced(claim))
        rows = dict(self.output_rows.get(claim.id, {}))  # written below only if not refused
        if saved_output is not None:
            rows[saved_output] = t.output_saved(rows[saved_output], now=now)
        outputs = [rows[i] for i in sorted(rows)]
        t.require_saved(claim.id, after.state, outputs)
        if saved_output is not None:
            self.output_rows[claim.id] = rows
        self.projects[claim.id] = after
        if notify is not None:
            body = notify(after, outputs)
            nid = len(self.notifications) + 1
            self.notifications[nid] = (Notification(nid, claim.id, body, 0, now), now, None)

    async def claim_notifications(
        self, *, now: float, limit: int, lease_seconds: float
    ) -> list[Notification]:
        due = sorted(
            (
                (due_at, n.id, n)
                for n, due_at, sent in self.notifications.values()
                if sent is None and due_at <= now
            ),
        )[:limit]
        for _, _, n in due:
            self.notifications[n.id] = (n, now + lease_seconds, None)
        return [n for _, _, n in due]

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
