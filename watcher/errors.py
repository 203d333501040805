"""The watcher's exceptions: one root, so callers can catch everything the watcher raises.

::

    WatcherError
    ├── ConfigError                 a setting is missing or invalid
    ├── InvalidProjectId            a project id or kind that cannot be tracked
    ├── StoreError                  the database failed (driver errors are wrapped into this)
    │   ├── StoreLocked             another daemon holds this SQLite database
    │   └── StoreUnavailable        the database does not answer for now (down, locked, full):
    │                               worth retrying; the daemon pauses claiming until it answers
    ├── OutputsNotSaved             the store refused to finish a project an output of which
    │                               is not saved (a bug in the caller, not an outage)
    ├── ApiError                    the Magic Hour API answered, or failed to
    │   ├── TransientApiError       worth retrying: 408/429/5xx, network faults, unreadable bodies
    │   │   └── RateLimited         429: the whole client pauses until ``retry_after``
    │   ├── Unauthorized            401: the token is bad; polling stops
    │   ├── InvalidRequest          no request can be sent (a token with a newline): polling stops
    │   ├── PaymentRequired         402: out of credits; polling pauses
    │   ├── ProjectNotFound         404: the project does not exist (any more)
    │   └── ApiRejected             any other 4xx: not retried
    └── DownloadError               an output could not be saved
        ├── DownloadUrlExpired      the CDN refused the signed URL: fetch fresh URLs, carry on
        ├── DownloadIncomplete      the body ended early, was cut for being too slow, or
        │                           does not match its length: resumed later
        ├── DiskFull                no space left: the project is retried later
        └── ObjectStorageError      the object store (S3, GCS, Azure) failed an upload, or an
                                    uploaded object does not match its record: retried later

Messages never contain secrets: the API token is not part of any request we describe.
"""

from __future__ import annotations


class WatcherError(Exception):
    """Root of every exception the watcher raises on purpose."""


class ConfigError(WatcherError):
    """A setting is missing or invalid."""


class InvalidProjectId(WatcherError, ValueError):
    """A project id or kind that the watcher refuses to track."""


class StoreError(WatcherError):
    """The store (database) failed."""


class StoreLocked(StoreError):
    """Another process already runs a daemon on this SQLite database."""


class StoreUnavailable(StoreError):
    """The database does not answer for now: PostgreSQL down or failing over, SQLite locked by
    another process past the busy timeout, its volume full or read-only. Worth retrying."""


class OutputsNotSaved(WatcherError):
    """A project cannot become ``saved``, ``deleting`` or ``deleted`` while one of its outputs is
    not saved (or it has none): the store refuses the transition, whoever asks for it."""


class ApiError(WatcherError):
    """The Magic Hour API returned an error, or could not be reached."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class TransientApiError(ApiError):
    """A fault worth retrying: 408, 429, 5xx, a network error, a body that is not the API's JSON."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        cause: str = "error",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.cause = cause
        self.retry_after = retry_after


class RateLimited(TransientApiError):
    """429 Too Many Requests."""


class Unauthorized(ApiError):
    """401: the API token is missing, wrong or revoked."""


class InvalidRequest(ApiError):
    """The request cannot even be written (a header holds a newline, a control or a non-ASCII
    character, e.g. a token file's trailing newline): every request would fail alike, so this is
    not transient; polling stops until the configuration is fixed."""


class PaymentRequired(ApiError):
    """402: the account cannot pay for requests."""


class ProjectNotFound(ApiError):
    """404: no such project. ``path`` is the URL path that answered 404 (a wrong
    ``WATCHER_API_BASE_URL`` shows there)."""

    def __init__(self, message: str, *, status_code: int | None = None, path: str = "") -> None:
        super().__init__(message, status_code=status_code)
        self.path = path


class ApiRejected(ApiError):
    """A 4xx other than 401/402/404/408/429: the request itself is wrong; not retried."""


class DownloadError(WatcherError):
    """An output could not be downloaded and saved."""


class DownloadUrlExpired(DownloadError):
    """The CDN refused the signed URL (401, 403, 404, 410): it is stale."""


class DownloadIncomplete(DownloadError):
    """The body ended early, does not match its length, or was cut for being too slow."""


class DiskFull(DownloadError):
    """No space left on the download volume."""


class ObjectStorageError(DownloadError):
    """The object store failed (after its own retries with backoff), or an object it holds does
    not match the size and sha256 recorded for it. The message names the object, never a
    credential."""
