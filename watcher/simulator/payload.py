"""The JSON bodies the simulated API returns: the project object and the error messages.

This module owns the shape of ``GET /v1/{kind}-projects/{id}`` for each kind, with every field
the official SDK 0.90.0 requires (deprecated ones included), and the ``{"message": ...}`` errors.
It is pure: the registry decides the status and signs the URLs, this module only formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from watcher.models import Kind, RemoteStatus

if TYPE_CHECKING:
    from collections.abc import Sequence

    from watcher.simulator.timeline import ProjectPlan

UNAUTHORIZED = {"message": "Unauthorized"}
NOT_FOUND = {"message": "Not Found"}


def iso8601(timestamp: float) -> str:
    """Format Unix seconds the way the API does: ``2024-10-19T05:16:19.027Z``."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class SignedUrl:
    """A download link as the API lists it."""

    url: str
    expires_at: float

    def to_json(self) -> dict[str, str]:
        """The ``{url, expires_at}`` item of ``downloads``."""
        return {"url": self.url, "expires_at": iso8601(self.expires_at)}


def project_body(
    plan: ProjectPlan,
    *,
    status: RemoteStatus,
    created_at: float,
    enabled: bool,
    downloads: Sequence[SignedUrl],
) -> dict[str, Any]:
    """The project object of ``plan`` as it stands with ``status``."""
    charged = 0 if status is RemoteStatus.ERROR else plan.credits  # errors are refunded
    error = plan.timeline.error if status is RemoteStatus.ERROR else None
    body: dict[str, Any] = {
        "id": plan.id,
        "name": plan.name,
        "status": status.value,
        "type": plan.type,
        "created_at": iso8601(created_at),
        "enabled": enabled,
        "credits_charged": charged,
        "downloads": [link.to_json() for link in downloads],
        "error": None if error is None else {"message": error.message, "code": error.code},
    }
    if plan.kind is Kind.IMAGE:
        body["image_count"] = len(plan.outputs)
        body["total_frame_cost"] = charged
    elif plan.video is not None:
        video = plan.video
        body.update(
            width=video.width,
            height=video.height,
            fps=video.fps,
            start_seconds=video.start_seconds,
            end_seconds=video.end_seconds,
            download=downloads[0].to_json() if downloads else None,
            total_frame_cost=charged,
        )
    return body
