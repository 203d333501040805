"""The records a store keeps and hands out: projects, their outputs, claims, queued events.

Plain frozen values with no behaviour beyond naming their parts: :mod:`watcher.store.base` says
what a store does with them, :mod:`watcher.store.transitions` how each write changes them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from watcher.errors import StoreError
from watcher.models import Kind, ProjectRef, RemoteStatus, State

# What the package watcher.store exports of these (the rest is for the backends).
__all__ = [
    "Claim",
    "Claimed",
    "LeaseLost",
    "NewOutput",
    "Notification",
    "NotificationBuilder",
    "OutputRecord",
    "OutputState",
    "ProjectPage",
    "ProjectRecord",
    "TrackResult",
]


class LeaseLost(StoreError):
    """The claim is stale: another worker holds this project now."""


class OutputState(enum.StrEnum):
    """Where an output is on its way to disk.

    ``pending``: not yet on disk. ``verified``: fully downloaded to its temporary file, fsynced,
    length checked, size and sha256 recorded; the rename may or may not have happened.
    ``saved``: under its final name, fsynced, recorded. Only ``saved`` outputs allow a DELETE.
    """

    PENDING = "pending"
    VERIFIED = "verified"
    SAVED = "saved"


@dataclass(frozen=True, slots=True)
class ProjectRecord:
    """One tracked project as stored."""

    id: str
    kind: Kind
    state: State
    remote_status: RemoteStatus | None
    delete_after_download: bool
    due_at: float
    attempt: int
    polls: int
    tracked_at: float
    updated_at: float
    terminal_at: float | None = None
    finished_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    failure: str | None = None
    failures: int = 0
    lease_owner: str | None = None
    lease_version: int = 0
    interruptions: int = 0
    stalled_since: float | None = None

    @property
    def ref(self) -> ProjectRef:
        """The project's kind and id."""
        return ProjectRef(self.kind, self.id)


@dataclass(frozen=True, slots=True)
class Claim:
    """A leased project: the record as claimed, and the lease version that fences writes."""

    project: ProjectRecord
    version: int

    @property
    def id(self) -> str:
        """The claimed project's id."""
        return self.project.id


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim leased, and the earliest ``due_at`` of an active project once it had
    (``None`` if none is active): the claim loop's next wake-up comes back with its claims."""

    claims: list[Claim]
    next_due_at: float | None


@dataclass(frozen=True, slots=True)
class NewOutput:
    """An output as announced by a ``complete`` snapshot."""

    index: int
    url: str
    expires_at: float
    path: str


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One output of a project as stored. ``path`` is relative to the download directory."""

    project_id: str
    index: int
    url: str
    expires_at: float
    path: str
    state: OutputState
    bytes: int | None = None
    sha256: str | None = None
    saved_at: float | None = None
    # Object storage only: the temporary key the output is being uploaded under (recorded before
    # the first byte), kept until the output is saved; see :mod:`watcher.objects`.
    upload_key: str | None = None


@dataclass(frozen=True, slots=True)
class Notification:
    """A queued event for ``WATCHER_NOTIFY_URL`` (the outbox), written in the same transaction
    as the final state it announces, so a crash can neither lose nor invent one."""

    id: int
    project_id: str
    body: str
    attempts: int
    created_at: float
    last_error: str | None = None


# Builds the body of the event announcing a final state from the project row and outputs the
# store has just written, inside the same transaction (so the event shows what the store holds).
NotificationBuilder = Callable[[ProjectRecord, list[OutputRecord]], str]


@dataclass(frozen=True, slots=True)
class ProjectPage:
    """A page of projects and the cursor of the next page (``None`` at the end)."""

    projects: list[ProjectRecord]
    next_cursor: str | None = None


def group_outputs(
    project_ids: list[str], outputs: Iterable[OutputRecord]
) -> dict[str, list[OutputRecord]]:
    """``outputs`` (in index order per project) by project, an empty list for a project without."""
    grouped: dict[str, list[OutputRecord]] = {pid: [] for pid in project_ids}
    for output in outputs:
        grouped[output.project_id].append(output)
    return grouped


@dataclass(slots=True)
class TrackResult:
    """What :meth:`Store.track` did: ids newly tracked and ids that were already there (and,
    filled in by the caller that went on to :meth:`Store.revive`, those of them revived)."""

    added: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    revived: list[str] = field(default_factory=list)


# A write of a claimed project's record: the record as it is to the record as it must become
# (one of :mod:`watcher.store.transitions`' functions, its inputs bound).
Change = Callable[[ProjectRecord], ProjectRecord]
