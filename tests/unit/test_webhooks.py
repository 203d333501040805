"""Signing and verifying webhook events (pure, with an injected ``now``), and reading them."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

import pytest

from watcher.models import Kind
from watcher.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    InvalidEvent,
    SignatureRejected,
    parse_event,
    sign,
    signed_headers,
    verify,
)

SECRET = "whsec_test_secret"
NOW = 1_760_000_000.0
BODY = b'{"type":"image.completed","payload":{"id":"cm2abc","status":"complete"}}'


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    """The signature is the lowercase hex HMAC-SHA256 of "{timestamp}.{raw body}"."""
    expected = hmac.new(SECRET.encode(), b"1760000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, "1760000000", BODY) == expected
    assert signed_headers(SECRET, BODY, now=NOW + 0.9) == {
        SIGNATURE_HEADER: expected,
        TIMESTAMP_HEADER: "1760000000",
    }


def test_a_signed_body_verifies_and_returns_its_timestamp() -> None:
    """Headers made by ``signed_headers`` verify, also in upper case, and give the send time."""
    headers = signed_headers(SECRET, BODY, now=NOW)
    sent = verify(
        SECRET,
        BODY,
        signature=headers[SIGNATURE_HEADER].upper(),
        timestamp=headers[TIMESTAMP_HEADER],
        now=NOW + 10,
    )
    assert sent == int(NOW)


@dataclass(frozen=True)
class Delivery:
    """What a receiver gets: a body and its two headers (and the secret it checks with)."""

    secret: str = SECRET
    body: bytes = BODY
    signature: str | None = signed_headers(SECRET, BODY, now=NOW)[SIGNATURE_HEADER]
    timestamp: str | None = signed_headers(SECRET, BODY, now=NOW)[TIMESTAMP_HEADER]


@pytest.mark.parametrize(
    ("delivery", "reason"),
    [
        (Delivery(body=BODY.replace(b"complete", b"errored")), "bad_signature"),
        (Delivery(secret="another"), "bad_signature"),
        (Delivery(signature="0" * 64), "bad_signature"),
        (Delivery(signature="é" * 64), "bad_signature"),
        (Delivery(signature=None), "missing_header"),
        (Delivery(timestamp=None), "missing_header"),
        (Delivery(timestamp="soon"), "bad_timestamp"),
        (Delivery(timestamp="-1760000000"), "bad_timestamp"),
        (Delivery(timestamp="9" * 40), "bad_timestamp"),
    ],
)
def test_anything_changed_is_rejected_with_its_reason(delivery: Delivery, reason: str) -> None:
    """A tampered body, a wrong secret or signature, or a missing/malformed header is refused."""
    with pytest.raises(SignatureRejected) as caught:
        verify(
            delivery.secret,
            delivery.body,
            signature=delivery.signature,
            timestamp=delivery.timestamp,
            now=NOW,
        )
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [(0, True), (299, True), (-299, True), (300, True), (301, False), (-301, False)],
)
def test_timestamps_more_than_five_minutes_away_are_refused(offset: int, accepted: bool) -> None:
    """A correctly signed event is accepted up to 300 s from now, either way, and not beyond."""
    headers = signed_headers(SECRET, BODY, now=NOW + offset)
    signature, timestamp = headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER]
    if accepted:
        sent = verify(SECRET, BODY, signature=signature, timestamp=timestamp, now=NOW)
        assert sent == int(NOW) + offset
    else:
        with pytest.raises(SignatureRejected, match="away from now") as caught:
            verify(SECRET, BODY, signature=signature, timestamp=timestamp, now=NOW)
        assert caught.value.reason == "stale_timestamp"


def test_digests_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification compares the digests with ``hmac.compare_digest``, never with ``==``."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    headers = signed_headers(SECRET, BODY, now=NOW)
    verify(
        SECRET,
        BODY,
        signature=headers[SIGNATURE_HEADER],
        timestamp=headers[TIMESTAMP_HEADER],
        now=NOW,
    )
    assert seen == [(headers[SIGNATURE_HEADER].encode(),) * 2]


@pytest.mark.parametrize(
    ("event_type", "kind"),
    [("image.completed", Kind.IMAGE), ("video.errored", Kind.VIDEO), ("audio.started", Kind.AUDIO)],
)
def test_events_name_their_kind_and_project(event_type: str, kind: Kind) -> None:
    """The type's prefix gives the project's kind; ``payload.id`` its id."""
    body = json.dumps({"type": event_type, "payload": {"id": "cm2xyz", "status": "complete"}})
    event = parse_event(body.encode())
    assert (event.type, event.kind, event.project_id) == (event_type, kind, "cm2xyz")


def test_unknown_event_types_parse_without_a_project() -> None:
    """An event type of no known kind parses, so the receiver can acknowledge and ignore it."""
    event = parse_event(b'{"type": "workspace.updated", "payload": {"id": "../x"}}')
    assert (event.kind, event.project_id) == (None, None)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"payload": {"id": "cm2"}}',
        b'{"type": "image.completed"}',
        b'{"type": "image.completed", "payload": {"id": 7}}',
        b'{"type": "image.completed", "payload": {"id": "../../etc/passwd"}}',
    ],
)
def test_unreadable_events_are_invalid(body: bytes) -> None:
    """Bodies that are not events, or name a malformed project id, raise ``InvalidEvent``."""
    with pytest.raises(InvalidEvent):
        parse_event(body)
