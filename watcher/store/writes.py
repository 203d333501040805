"""The fenced writes every backend makes the same way: the state changes of a claimed project.

Each computes its change once with :mod:`watcher.store.transitions` and hands it to the backend's
``_apply`` (write the change of the claimed row, fenced) or ``_finish`` (the same, refused unless
every output is saved where the new state needs it, with the event ``notify`` builds from the row
as written queued in the same transaction). A backend only says how it persists; it never
restates a rule. :class:`~watcher.store.base.Store` extends :class:`TransitionWrites`, so these
methods are declared and defined here alone.
"""

from __future__ import annotations

import abc
from typing import Unpack

from watcher.models import RemoteStatus, State
from watcher.store import transitions as t
from watcher.store.records import Change, Claim, NotificationBuilder


class TransitionWrites(abc.ABC):
    """The writes that move a claimed project on, in terms of two persistence hooks."""

    @abc.abstractmethod
    async def _apply(self, claim: Claim, change: Change) -> None:
        """Replace the claimed project (fenced) with ``change`` of it."""

    @abc.abstractmethod
    async def _finish(
        self,
        claim: Claim,
        change: Change,
        *,
        now: float,
        notify: NotificationBuilder | None,
        saved_output: int | None = None,
    ) -> None:
        """Write ``change`` of the claimed project (fenced; refused with ``OutputsNotSaved``
        unless every output is saved where its new state needs it) and queue the event
        ``notify`` builds from the row as written, in one transaction; with ``saved_output``,
        that output is recorded saved at ``now`` first, in the same transaction."""

    async def record_poll(
        self,
        claim: Claim,
        *,
        now: float,
        remote_status: RemoteStatus,
        attempt: int,
        due_at: float,
    ) -> None:
        """A GET saw a non-terminal status; poll again at ``due_at``. Clears past failures."""
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
        """A transient fault: keep the state, try again at ``due_at``, remember why.

        ``count_failure`` adds one to the failures in a row and, on the first of them, sets
        ``stalled_since`` to ``now``. ``progressed`` (the try gained bytes before it failed)
        instead clears both: the work is moving, however often it is interrupted."""
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
        last_output: int | None = None,
    ) -> None:
        """Every output is saved: finish as ``saved`` (lease released, and the event ``notify``
        builds from the row just written queued with it), or move to ``deleting`` keeping the
        lease until ``due_at``. ``last_output``: the output whose save completes the set,
        recorded saved (as :meth:`record_output_saved` would) in the same transaction, so
        the last save and the project's end cost one commit. Refused with
        :class:`OutputsNotSaved` (nothing written, that output's save neither) if an output
        is not saved."""
        await self._finish(
            claim,
            lambda p: t.saved(p, now=now, due_at=due_at, delete_next=delete_next),
            now=now,
            notify=None if delete_next else notify,
            saved_output=last_output,
        )

    async def record_final(
        self,
        claim: Claim,
        *,
        now: float,
        state: State,
        notify: NotificationBuilder | None = None,
        **ending: Unpack[t.Ending],
    ) -> None:
        """The project ended in a final ``state``, with what :class:`~transitions.Ending` says
        of how; the event ``notify`` (if any) builds from the row and outputs just written is
        queued in the same transaction. Ending ``saved`` or ``deleted`` is refused with
        :class:`OutputsNotSaved` (nothing written) if an output is not saved."""
        await self._finish(
            claim, lambda p: t.finished(p, now=now, state=state, **ending), now=now, notify=notify
        )
