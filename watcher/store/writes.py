"""The fenced writes every backend makes the same way.

Each computes its change once with :mod:`watcher.store.transitions` and hands it to the backend's
``_apply`` (write the change of the claimed row, fenced) or ``_finish`` (the same, refused unless
every output is saved where the new state needs it, with the event ``notify`` builds from the row
as written queued in the same transaction). A backend only says how it persists; it never
restates a rule.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from watcher.models import RemoteStatus, State
from watcher.store import transitions as t
from watcher.store.base import Claim, NotificationBuilder, ProjectRecord, Store

Change = Callable[[ProjectRecord], ProjectRecord]


class TransitionWrites(Store):
    """:class:`Store`'s transition writes in terms of two persistence hooks."""

    @abc.abstractmethod
    async def _apply(self, claim: Claim, change: Change) -> None:
        """Replace the claimed project (fenced) with ``change`` of it."""

    @abc.abstractmethod
    async def _finish(
        self, claim: Claim, change: Change, *, now: float, notify: NotificationBuilder | None
    ) -> None:
        """Write ``change`` of the claimed project (fenced; refused with ``OutputsNotSaved``
        unless every output is saved where its new state needs it) and queue the event
        ``notify`` builds from the row as written, in one transaction."""

    async def record_poll(
        self,
        claim: Claim,
        *,
        now: float,
        remote_status: RemoteStatus,
        attempt: int,
        due_at: float,
    ) -> None:
        await self._apply(
            claim,
            lambda p: t.polled(
                p, now=now, remote_status=remote_status, attempt=attempt, due_at=due_at
            ),
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
        await self._apply(
            claim,
            lambda p: t.retried(
                p,
                now=now,
                due_at=due_at,
                failure=failure,
                count_failure=count_failure,
                progressed=progressed,
            ),
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
        await self._finish(
            claim,
            lambda p: t.saved(p, now=now, due_at=due_at, delete_next=delete_next),
            now=now,
            notify=None if delete_next else notify,
        )

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
        await self._finish(
            claim,
            lambda p: t.finished(
                p,
                now=now,
                state=state,
                remote_status=remote_status,
                error_code=error_code,
                error_message=error_message,
                failure=failure,
            ),
            now=now,
            notify=notify,
        )
