"""Rows of the SQL stores to records and back, shared by SQLite and PostgreSQL (both drivers hand
out rows indexed by column name)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from watcher.models import Kind, RemoteStatus, State
from watcher.store.records import Notification, OutputRecord, OutputState, ProjectRecord


class Row(Protocol):
    """A row whose columns are read by name (``sqlite3.Row``, psycopg's ``dict_row``)."""

    def __getitem__(self, key: str, /) -> Any: ...  # noqa: ANN401 - a column holds any value


def _columns(record: type[Any]) -> tuple[str, ...]:
    """The fields of a record class, which its table names alike (but where a mapper says)."""
    return tuple(f.name for f in dataclasses.fields(record))


_PROJECT = _columns(ProjectRecord)
_OUTPUT = tuple(name for name in _columns(OutputRecord) if name not in {"index", "state"})
_NOTIFICATION = _columns(Notification)
# The columns a transition may change (identity and tracking columns are never written).
_CHANGED = tuple(
    c
    for c in _PROJECT
    if c not in {"id", "kind", "delete_after_download", "tracked_at", "lease_version"}
)


# Column text to enum member by a dict lookup: calling the enum (Kind("image")) costs a
# microsecond each, and a row is read at every claim and every write.
_KINDS = {member.value: member for member in Kind}
_STATES = {member.value: member for member in State}
_REMOTE_STATUSES: dict[str | None, RemoteStatus | None] = {m.value: m for m in RemoteStatus}
_REMOTE_STATUSES[None] = _REMOTE_STATUSES[""] = None
_OUTPUT_STATES = {member.value: member for member in OutputState}


def project_from_row(row: Row) -> ProjectRecord:
    """The project a ``projects`` row holds."""
    values = {column: row[column] for column in _PROJECT}
    values["kind"] = _KINDS[values["kind"]]
    values["state"] = _STATES[values["state"]]
    values["remote_status"] = _REMOTE_STATUSES[values["remote_status"]]
    values["delete_after_download"] = bool(values["delete_after_download"])
    return ProjectRecord(**values)


def project_changes(p: ProjectRecord) -> dict[str, object]:
    """The parameters of ``write_project``: every column a transition may change, and the id
    and lease version that fence the write."""
    changes: dict[str, object] = {column: getattr(p, column) for column in _CHANGED}
    changes["state"] = p.state.value
    changes["remote_status"] = p.remote_status.value if p.remote_status else None
    changes["id"] = p.id
    changes["version"] = p.lease_version
    return changes


def output_from_row(row: Row) -> OutputRecord:
    """The output an ``outputs`` row holds (its index in column ``idx``)."""
    values = {column: row[column] for column in _OUTPUT}
    return OutputRecord(index=row["idx"], state=_OUTPUT_STATES[row["state"]], **values)


def notification_from_row(row: Row) -> Notification:
    """The queued event a ``notifications`` row holds."""
    return Notification(**{column: row[column] for column in _NOTIFICATION})
