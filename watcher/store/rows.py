"""Rows of the SQL stores to records and back, shared by SQLite and PostgreSQL (both drivers hand
out rows indexed by column name)."""

from __future__ import annotations

from typing import Any, Protocol

from watcher.models import Kind, RemoteStatus, State
from watcher.store.base import Notification, OutputRecord, OutputState, ProjectRecord


class Row(Protocol):
    """A row whose columns are read by name (``sqlite3.Row``, psycopg's ``dict_row``)."""

    def __getitem__(self, key: str, /) -> Any: ...  # noqa: ANN401 - a column holds any value


def project_from_row(row: Row) -> ProjectRecord:
    """The project a ``projects`` row holds."""
    return ProjectRecord(
        id=row["id"],
        kind=Kind(row["kind"]),
        state=State(row["state"]),
        remote_status=RemoteStatus(row["remote_status"]) if row["remote_status"] else None,
        delete_after_download=bool(row["delete_after_download"]),
        due_at=row["due_at"],
        attempt=row["attempt"],
        polls=row["polls"],
        tracked_at=row["tracked_at"],
        updated_at=row["updated_at"],
        terminal_at=row["terminal_at"],
        finished_at=row["finished_at"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        failure=row["failure"],
        failures=row["failures"],
        lease_owner=row["lease_owner"],
        lease_version=row["lease_version"],
        interruptions=row["interruptions"],
        stalled_since=row["stalled_since"],
    )


def project_changes(p: ProjectRecord) -> dict[str, object]:
    """The parameters of ``write_project``: every column a transition may change, and the id
    and lease version that fence the write (identity and tracking columns are never written)."""
    return {
        "id": p.id,
        "version": p.lease_version,
        "state": p.state.value,
        "remote_status": p.remote_status.value if p.remote_status else None,
        "due_at": p.due_at,
        "attempt": p.attempt,
        "polls": p.polls,
        "updated_at": p.updated_at,
        "terminal_at": p.terminal_at,
        "finished_at": p.finished_at,
        "error_code": p.error_code,
        "error_message": p.error_message,
        "failure": p.failure,
        "failures": p.failures,
        "lease_owner": p.lease_owner,
        "interruptions": p.interruptions,
        "stalled_since": p.stalled_since,
    }


def output_from_row(row: Row) -> OutputRecord:
    """The output an ``outputs`` row holds."""
    return OutputRecord(
        project_id=row["project_id"],
        index=row["idx"],
        url=row["url"],
        expires_at=row["expires_at"],
        path=row["path"],
        state=OutputState(row["state"]),
        bytes=row["bytes"],
        sha256=row["sha256"],
        saved_at=row["saved_at"],
    )


def notification_from_row(row: Row) -> Notification:
    """The queued event a ``notifications`` row holds."""
    return Notification(
        id=row["id"],
        project_id=row["project_id"],
        body=row["body"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        last_error=row["last_error"],
    )
