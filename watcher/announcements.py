"""Polling that trusts webhooks: verified event payloads waiting for their project, and the
relaxed cadence while events arrive.

A signed Magic Hour event carries the project object itself, the same object a GET answers
(``payload``: status, downloads, error). :class:`Announcements` holds the payload of each
verified event, parsed into the :class:`~watcher.models.ProjectSnapshot` a GET is parsed into,
until the project's next claim: :meth:`watcher.workflow.Workflow` then takes it *instead of*
GETting the project, and the answer goes through the one path every poll result takes (so the
lease still decides who acts, and every write is fenced by it). The dispatcher makes an
announced project due first, ahead of every project merely overdue.

What is never trusted:

- a stale payload: an event whose status is *behind* what the store already holds (``started``
  arriving after a GET saw the render end, a retried delivery of an old event) is dropped, and
  of two payloads waiting for one project the more advanced is kept. A payload is only ever
  acted on while the project is ``polling``: once it is downloading, no event can make it
  download again, nor move it back;
- a payload that lacks what a GET gives: ``complete`` without ``downloads``, ``error`` without
  the error. The project is then GETted at once, as before (the expedite path).

While events are arriving (a verified event of the project's kind within the last
``fallback_poll`` seconds), polling of active projects relaxes: no delay between two polls is
shorter than ``fallback_poll``. Polling never stops, because a canceled render sends no
webhook and an event can be lost: the fallback still finds those, at most ``fallback_poll``
seconds late. When events stop, the next poll of each project is scheduled as usual again.
``fallback_poll`` 0 turns the relaxation off (payloads are still acted on).

Pure state in memory, one per process: no I/O; the clock is injected.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

from watcher import clock
from watcher.models import Kind, ProjectSnapshot, RemoteStatus

if TYPE_CHECKING:
    from watcher.store import ProjectRecord

# How far along a status is; a payload whose status ranks below the stored one is stale.
RANK: dict[RemoteStatus, int] = {
    RemoteStatus.DRAFT: 0,
    RemoteStatus.QUEUED: 1,
    RemoteStatus.RENDERING: 2,
    RemoteStatus.COMPLETE: 3,
    RemoteStatus.ERROR: 3,
    RemoteStatus.CANCELED: 3,
}


class Verdict(enum.StrEnum):
    """What :meth:`Announcements.put` made of a payload."""

    WAITING = "waiting"  # held for the project's next claim
    STALE = "stale"  # behind what is known: dropped
    LACKING = "lacking"  # lacks what a GET gives: GET instead


def is_stale(status: RemoteStatus, known: RemoteStatus | None) -> bool:
    """Whether a payload of ``status`` is behind the ``known`` one."""
    return known is not None and RANK[status] < RANK[known]


def lacking(snapshot: ProjectSnapshot) -> bool:
    """Whether a payload lacks what a GET of its project gives: the downloads of a project
    ``complete`` (and not deleted), the error of one in ``error``."""
    if snapshot.status == RemoteStatus.COMPLETE:
        return snapshot.enabled and not snapshot.downloads
    return snapshot.status == RemoteStatus.ERROR and snapshot.error is None


class Announcements:
    """Verified payloads by project id, and when events of each kind last arrived."""

    def __init__(
        self,
        *,
        fallback_poll: float = 0.0,
        keep_seconds: float = 60.0,
        now: Callable[[], float] = clock.now,
    ) -> None:
        self.fallback_poll = fallback_poll
        self.keep_seconds = keep_seconds  # a payload no claim took by then is forgotten
        self.now = now
        self._waiting: dict[str, tuple[ProjectSnapshot, float]] = {}
        self._heard: dict[Kind, float] = {}

    def heard(self, kind: Kind) -> None:
        """A verified event about a project of ``kind`` arrived (events are arriving)."""
        self._heard[kind] = self.now()

    def put(self, record: ProjectRecord, snapshot: ProjectSnapshot) -> Verdict:
        """Hold ``snapshot`` (a verified payload about the ``polling`` project of ``record``)
        for the project's next claim, unless it is stale or lacks what a GET gives."""
        now = self.now()
        self._forget_older_than(now - self.keep_seconds)
        if lacking(snapshot):
            return Verdict.LACKING
        held = self._waiting.get(record.id)
        if is_stale(snapshot.status, record.remote_status) or (
            held is not None and is_stale(snapshot.status, held[0].status)
        ):
            return Verdict.STALE
        self._waiting[record.id] = (snapshot, now)
        return Verdict.WAITING

    def waiting(self, project_id: str) -> bool:
        """Whether a payload waits for ``project_id``."""
        return project_id in self._waiting

    def take(self, record: ProjectRecord) -> ProjectSnapshot | None:
        """The payload waiting for the claimed project of ``record`` (removed), or ``None``
        when none does or it is stale by now (the store moved on since it was put)."""
        held = self._waiting.pop(record.id, None)
        if held is None or is_stale(held[0].status, record.remote_status):
            return None
        return held[0]

    def arriving(self, kind: Kind) -> bool:
        """Whether events about projects of ``kind`` are arriving (polling is relaxed)."""
        at = self._heard.get(kind)
        return self.fallback_poll > 0 and at is not None and self.now() - at <= self.fallback_poll

    def poll_delay(self, kind: Kind, delay: float) -> float:
        """The delay until a project's next poll: ``delay``, or ``fallback_poll`` when longer
        and events are arriving."""
        return max(delay, self.fallback_poll) if self.arriving(kind) else delay

    def _forget_older_than(self, cutoff: float) -> None:
        stale = [pid for pid, (_, at) in self._waiting.items() if at < cutoff]
        for pid in stale:
            del self._waiting[pid]
