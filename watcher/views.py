"""JSON views of the store's records, shared by ``watcher status --json``, the control API and
the notifications the daemon sends."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watcher.store import OutputRecord, ProjectRecord


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def project_json(p: ProjectRecord, outputs: list[OutputRecord]) -> dict[str, Any]:
    """A project and its outputs as JSON (``status --json`` and the control API)."""
    return {
        "id": p.id,
        "kind": p.kind.value,
        "state": p.state.value,
        "remote_status": p.remote_status.value if p.remote_status else None,
        "delete_after_download": p.delete_after_download,
        "polls": p.polls,
        "tracked_at": iso(p.tracked_at),
        "updated_at": iso(p.updated_at),
        "terminal_at": iso(p.terminal_at),
        "finished_at": iso(p.finished_at),
        "next_due_at": None if p.state.is_final else iso(p.due_at),
        "error": {"code": p.error_code, "message": p.error_message} if p.error_code else None,
        "failure": p.failure,
        "outputs": [
            {
                "index": o.index,
                "path": o.path,
                "state": o.state.value,
                "bytes": o.bytes,
                "sha256": o.sha256,
                "expires_at": iso(o.expires_at),
                "saved_at": iso(o.saved_at),
            }
            for o in outputs
        ],
    }


def notification_event(
    project: ProjectRecord, outputs: list[OutputRecord], download_dir: Path, *, now: float
) -> dict[str, Any]:
    """The event POSTed to ``WATCHER_NOTIFY_URL`` when a project reaches its final state.

    ``type`` is ``project.<state>``; ``id`` is unique per event, so a receiver can drop the
    duplicates that retries may deliver.
    """
    body = project_json(project, outputs)
    for out in body["outputs"]:
        out["absolute_path"] = str((download_dir / out["path"]).resolve())
    return {
        "id": uuid.uuid4().hex,
        "type": f"project.{project.state.value}",
        "created_at": iso(now),
        "payload": body,
    }
