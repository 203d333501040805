"""Project kinds, ids and states, and the project snapshot read from the API.

This module owns the vocabulary every other module speaks. It does no I/O.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import pydantic

from watcher.errors import InvalidProjectId

# The API's ids are cuids (``cm2x…``); the spec's example is ``cuid-example``. We accept letters,
# digits, ``-`` and ``_``, starting with a letter or digit, at most 64 characters: enough for any
# id the API hands out, and never a path separator, a dot or a control character.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_ID_LENGTH = 64


class Kind(enum.StrEnum):
    """What sort of project an id names; selects the API path."""

    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"

    @property
    def api_path(self) -> str:
        """The collection path of this kind, e.g. ``/v1/image-projects``."""
        return f"/v1/{self.value}-projects"


class RemoteStatus(enum.StrEnum):
    """A project's status as the API reports it."""

    DRAFT = "draft"
    QUEUED = "queued"
    RENDERING = "rendering"
    COMPLETE = "complete"
    ERROR = "error"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """Whether the API will never change this status again."""
        return self in {RemoteStatus.COMPLETE, RemoteStatus.ERROR, RemoteStatus.CANCELED}


class State(enum.StrEnum):
    """The watcher's own state of a tracked project.

    Active: ``polling`` (waiting for a terminal status), ``downloading`` (complete; saving outputs),
    ``deleting`` (outputs saved; a DELETE is due). Final: ``saved`` (every output on disk),
    ``deleted`` (saved, then deleted remotely), ``error`` and ``canceled`` (the API's terminal
    statuses), ``not_found`` (the API has no such project), ``failed`` (outputs could no longer be
    fetched; the cause is recorded), ``quarantined`` (its work kept being interrupted: a replica
    died or stalled on it again and again; set aside so it cannot take the fleet down).
    """

    POLLING = "polling"
    DOWNLOADING = "downloading"
    DELETING = "deleting"
    SAVED = "saved"
    DELETED = "deleted"
    ERROR = "error"
    CANCELED = "canceled"
    NOT_FOUND = "not_found"
    FAILED = "failed"
    QUARANTINED = "quarantined"

    @property
    def is_final(self) -> bool:
        """Whether the watcher has finished with this project."""
        return self not in ACTIVE_STATES

    @property
    def is_success(self) -> bool:
        """Whether the project ended with every output saved."""
        return self in {State.SAVED, State.DELETED}


ACTIVE_STATES = frozenset({State.POLLING, State.DOWNLOADING, State.DELETING})
FINAL_STATES = frozenset(set(State) - ACTIVE_STATES)


def validate_project_id(raw: str) -> str:
    """Return ``raw`` if it is a well-formed project id, else raise :class:`InvalidProjectId`."""
    if not _ID_RE.fullmatch(raw):
        shown = raw if len(raw) <= MAX_ID_LENGTH else raw[:MAX_ID_LENGTH] + "…"
        raise InvalidProjectId(
            f"invalid project id {shown!r}: expected 1-{MAX_ID_LENGTH} letters, digits, '-' or '_'"
        )
    return raw


def parse_kind(raw: str) -> Kind:
    """Parse a kind name, case-insensitively."""
    try:
        return Kind(raw.strip().lower())
    except ValueError:
        names = ", ".join(k.value for k in Kind)
        raise InvalidProjectId(f"unknown project kind {raw!r}: expected one of {names}") from None


@dataclass(frozen=True, slots=True)
class ProjectRef:
    """A project to track: its kind and id."""

    kind: Kind
    id: str

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.id}"


def parse_project_spec(spec: str, default_kind: Kind = Kind.IMAGE) -> ProjectRef:
    """Parse ``ID`` or ``KIND:ID``."""
    spec = spec.strip()
    if ":" in spec:
        kind_text, _, id_text = spec.partition(":")
        return ProjectRef(parse_kind(kind_text), validate_project_id(id_text))
    return ProjectRef(default_kind, validate_project_id(spec))


def parse_project_list(text: str, default_kind: Kind = Kind.IMAGE) -> list[ProjectRef]:
    """Parse a comma- or whitespace-separated list of specs, keeping the first of duplicates.

    Every bad entry is reported at once, so an operator fixes the list in one go.
    """
    refs: dict[str, ProjectRef] = {}
    problems: list[str] = []
    for token in re.split(r"[,\s]+", text):
        if not token:
            continue
        try:
            ref = parse_project_spec(token, default_kind)
        except InvalidProjectId as exc:
            problems.append(str(exc))
            continue
        refs.setdefault(ref.id, ref)
    if problems:
        raise InvalidProjectId("; ".join(problems))
    return list(refs.values())


# --- the API's project object ------------------------------------------------------------------


class _Lenient(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)


# Bounds on what a snapshot may carry, so one hostile body cannot put megabytes into the store or
# a log line, or a date no clock arithmetic survives.
MAX_URL_LENGTH = 8192
MAX_DOWNLOADS = 1000  # a project has a handful of outputs; thousands would be thousands of files
MAX_ERROR_CODE_LENGTH = 200
MAX_ERROR_MESSAGE_LENGTH = 2000
EARLIEST_EXPIRY = datetime(1970, 1, 1, tzinfo=UTC)
# Download URLs parsed once: a snapshot's are parsed when it is validated and found again when
# they are downloaded. Bounded in count and in the length of what is kept (a longer URL is
# parsed each time), so a hostile body cannot fill memory through it.
URL_CACHE_SIZE = 1024
URL_CACHE_LENGTH = 2048


def parsed_url(url: str) -> httpx.URL:
    """``url`` as ``httpx.URL`` (raises ``httpx.InvalidURL``), parsed once while it is among
    the last ``URL_CACHE_SIZE`` URLs of at most ``URL_CACHE_LENGTH`` characters."""
    return _cached_url(url) if len(url) <= URL_CACHE_LENGTH else httpx.URL(url)


@functools.lru_cache(maxsize=URL_CACHE_SIZE)
def _cached_url(url: str) -> httpx.URL:
    return httpx.URL(url)


def _http_url(url: str) -> str:
    """An absolute ``http(s)`` URL with a host; anything else (``file:``, relative, huge) is
    refused: the downloader must never be pointed elsewhere."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"a download URL of {len(url)} characters (limit {MAX_URL_LENGTH})")
    try:  # the parser the download will use, so it cannot fail there
        parsed = parsed_url(url)
        host = parsed.raw_host
    except (httpx.InvalidURL, ValueError):  # ValueError: an IDNA host that cannot be encoded
        raise ValueError("a download URL that cannot be parsed") from None
    if parsed.scheme not in {"http", "https"} or not host:  # (its query may hold a signature)
        raise ValueError(f"a download URL that is not http(s) (scheme {parsed.scheme[:20]!r})")
    return url


def _utc_instant(value: datetime) -> datetime:
    """``value`` in UTC (a time without an offset is UTC, never the host's local time, whose
    ``.timestamp()`` overflows on year 1), refused before 1970 or past what UTC can hold
    (``9999-12-31T23:59:59-05:00``)."""
    try:
        instant = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"a date out of range: {value.isoformat()}") from None
    if instant < EARLIEST_EXPIRY:
        raise ValueError(f"a date out of range: {value.isoformat()}")
    return instant


def _clipped(limit: int) -> pydantic.AfterValidator:
    return pydantic.AfterValidator(lambda text: text if len(text) <= limit else text[:limit] + "…")


class DownloadLink(_Lenient):
    """One output's signed URL and when it expires (always timezone-aware UTC)."""

    url: Annotated[str, pydantic.AfterValidator(_http_url)]
    expires_at: Annotated[datetime, pydantic.AfterValidator(_utc_instant)]


class ProjectErrorInfo(_Lenient):
    """The API's error object on a project whose status is ``error`` (either part may be null;
    overlong texts are shortened)."""

    code: Annotated[str, _clipped(MAX_ERROR_CODE_LENGTH)] | None = None
    message: Annotated[str, _clipped(MAX_ERROR_MESSAGE_LENGTH)] | None = None


class ProjectSnapshot(_Lenient):
    """What ``GET /v1/{kind}-projects/{id}`` returned.

    Only the fields the watcher acts on are required; deprecated and unknown fields are ignored,
    so a harmless change in the API does not stop the daemon.
    """

    id: str
    status: RemoteStatus
    enabled: pydantic.StrictBool = True  # "false" or 0 is refused, not guessed
    downloads: list[DownloadLink] = pydantic.Field(default_factory=list, max_length=MAX_DOWNLOADS)
    error: ProjectErrorInfo | None = None

    @classmethod
    def parse(cls, data: Any) -> ProjectSnapshot:  # noqa: ANN401 - JSON of unknown shape
        """Validate a decoded JSON body; raises ``pydantic.ValidationError``."""
        return cls.model_validate(data)

    @classmethod
    def parse_json(cls, body: bytes) -> ProjectSnapshot:
        """Validate a body as it came, parsed by pydantic's own JSON parser (no ``json.loads``
        and no Python dicts in between: a poll's cheapest path); raises
        ``pydantic.ValidationError`` for anything it refuses, bad JSON included."""
        return cls.model_validate_json(body)
