"""JSON views of the store's records, shared by ``watcher status --json``, the control API and
the notifications the daemon sends."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watcher.downloader import bytes_on_disk
from watcher.objects.location import StorageLocation
from watcher.store import OutputRecord, OutputState, ProjectRecord


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def received(o: OutputRecord, download_dir: Path | None) -> int | None:
    """The bytes of an output on disk so far: its size once saved, the size of its temporary
    file while it downloads (read from disk, so any process that sees the folder can tell);
    ``None`` without ``download_dir``."""
    if o.state == OutputState.SAVED and o.bytes is not None:
        return o.bytes
    return None if download_dir is None else bytes_on_disk(download_dir / o.path)


def project_json(
    p: ProjectRecord,
    outputs: list[OutputRecord],
    download_dir: Path | None = None,
    storage: StorageLocation | None = None,
) -> dict[str, Any]:
    """A project and its outputs as JSON (``status --json`` and the control API); with
    ``download_dir``, each output says how many of its bytes are on disk so far; with
    ``storage`` (outputs in object storage), each names its object as ``url``
    (``s3://bucket/key``), and its bytes so far are known only once it is saved."""
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
                **({"url": storage.url(o.path)} if storage is not None else {}),
                "state": o.state.value,
                "bytes": o.bytes,
                "bytes_received": received(o, None if storage else download_dir),
                "sha256": o.sha256,
                "expires_at": iso(o.expires_at),
                "saved_at": iso(o.saved_at),
            }
            for o in outputs
        ],
    }


def notification_event(
    project: ProjectRecord,
    outputs: list[OutputRecord],
    download_dir: Path,
    *,
    now: float,
    storage: StorageLocation | None = None,
) -> dict[str, Any]:
    """The event POSTed to ``WATCHER_NOTIFY_URL`` when a project reaches its final state.

    ``type`` is ``project.<state>``; ``id`` is unique per event, so a receiver can drop the
    duplicates that retries may deliver. Each output is named by its ``absolute_path`` on disk,
    or by its object's ``url`` in object storage.
    """
    body = project_json(project, outputs, download_dir, storage)
    if storage is None:
        for out in body["outputs"]:
            out["absolute_path"] = str((download_dir / out["path"]).resolve())
    return {
        "id": uuid.uuid4().hex,
        "type": f"project.{project.state.value}",
        "created_at": iso(now),
        "payload": body,
    }
