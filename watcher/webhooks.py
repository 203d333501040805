"""Signed webhook events, the way Magic Hour signs them: signing, verifying and parsing.

Used both ways: to check the events Magic Hour POSTs to ``/webhooks/magic-hour`` and to sign the
notifications the watcher POSTs to ``WATCHER_NOTIFY_URL``. The signature is the lowercase hex
HMAC-SHA256 of ``"{timestamp}.{raw body}"`` keyed with the shared secret (UTF-8), sent in the
``magic-hour-event-signature`` header beside ``magic-hour-event-timestamp`` (Unix seconds).

Pure: no clock (``now`` is a parameter), no I/O, no HTTP framework. It does not decide what an
event means for a project; the HTTP app does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

import pydantic

from watcher.errors import InvalidProjectId, WatcherError
from watcher.models import Kind, ProjectSnapshot, validate_project_id

SIGNATURE_HEADER = "magic-hour-event-signature"
TIMESTAMP_HEADER = "magic-hour-event-timestamp"
TOLERANCE_SECONDS = 300.0
_MAX_TIMESTAMP_DIGITS = 12


class SignatureRejected(WatcherError):
    """A webhook's signature headers are missing, malformed, stale or do not match.

    ``reason`` is a stable word for logs and metrics: ``missing_header``, ``bad_timestamp``,
    ``stale_timestamp`` or ``bad_signature``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidEvent(WatcherError):
    """A correctly signed body that is not a webhook event the watcher can read."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature of ``body`` sent at ``timestamp`` (the header's text): 64 lowercase hex."""
    message = timestamp.encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, body: bytes, *, now: float) -> dict[str, str]:
    """The two headers that sign ``body`` as sent at ``now``."""
    timestamp = str(int(now))
    return {SIGNATURE_HEADER: sign(secret, timestamp, body), TIMESTAMP_HEADER: timestamp}


def verify(
    secret: str,
    body: bytes,
    *,
    signature: str | None,
    timestamp: str | None,
    now: float,
    tolerance: float = TOLERANCE_SECONDS,
) -> int:
    """Check the headers of a received ``body``; return its timestamp, or raise
    :class:`SignatureRejected`. The digests are compared in constant time."""
    if not signature or not timestamp:
        missing = TIMESTAMP_HEADER if signature else SIGNATURE_HEADER
        raise SignatureRejected("missing_header", f"the {missing} header is missing")
    timestamp = timestamp.strip()
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > _MAX_TIMESTAMP_DIGITS:
        raise SignatureRejected("bad_timestamp", f"{TIMESTAMP_HEADER} is not Unix seconds")
    sent_at = int(timestamp)
    if abs(now - sent_at) > tolerance:
        raise SignatureRejected(
            "stale_timestamp",
            f"{TIMESTAMP_HEADER} is {abs(now - sent_at):.0f} s away from now "
            f"(at most {tolerance:g} s allowed)",
        )
    expected = sign(secret, timestamp, body).encode("ascii")
    received = signature.strip().lower().encode("utf-8", "replace")
    if not hmac.compare_digest(expected, received):
        raise SignatureRejected("bad_signature", f"{SIGNATURE_HEADER} does not match the body")
    return sent_at


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A Magic Hour event: ``type`` (e.g. ``video.completed``), and the project it is about.

    ``kind`` is ``None`` when the type's prefix names no project kind the watcher knows.
    ``payload`` is the project object the event carries, parsed as a GET's answer is, or
    ``None`` when it is not a whole project object (then only its id is used).
    """

    type: str
    kind: Kind | None
    project_id: str | None
    payload: ProjectSnapshot | None = None


def parse_event(body: bytes) -> WebhookEvent:
    """Read ``{"type": "<kind>.<event>", "payload": {"id": …, …}}``; raise
    :class:`InvalidEvent`.

    Unknown event types parse (with ``kind`` ``None``) so the caller can ignore them politely; a
    malformed id of a known kind is an error.
    """
    try:
        data = json.loads(body)
    except RecursionError:
        raise InvalidEvent("the body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise InvalidEvent(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent("the body is not a JSON object")
    event_type = data.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidEvent('the event has no "type"')
    prefix, _, _ = event_type.partition(".")
    try:
        kind: Kind | None = Kind(prefix)
    except ValueError:
        kind = None
    if kind is None:
        return WebhookEvent(event_type, None, None)
    payload = data.get("payload")
    raw_id = payload.get("id") if isinstance(payload, dict) else None
    if not isinstance(raw_id, str):
        raise InvalidEvent(f'the {event_type} event has no "payload.id"')
    try:
        project_id = validate_project_id(raw_id)
    except InvalidProjectId as exc:
        raise InvalidEvent(str(exc)) from None
    try:
        snapshot: ProjectSnapshot | None = ProjectSnapshot.parse(payload)
    except pydantic.ValidationError:
        snapshot = None
    return WebhookEvent(event_type, kind, project_id, snapshot)
