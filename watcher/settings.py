"""Configuration: every setting comes from a ``WATCHER_*`` environment variable.

:func:`load_settings` turns a bad value into :class:`ConfigError` with one line per bad setting,
each naming its variable; the CLI prints those lines and exits with status 2. Secrets are
``SecretStr`` and never printed, not even when their value is what is wrong.
"""

from __future__ import annotations

import os
import re
import socket
import unicodedata
from collections.abc import Mapping
from ipaddress import ip_address
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit, urlunsplit

import pydantic
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from watcher.errors import ConfigError, InvalidProjectId
from watcher.models import ProjectRef, parse_project_list
from watcher.objects.location import StorageLocation, parse_storage_url

ENV_PREFIX = "WATCHER_"
SECRET_FIELDS = frozenset({"api_token", "control_token", "webhook_secret", "notify_secret"})
# Secrets that are HTTP header values (the API's bearer token, the control API's).
HEADER_TOKENS = frozenset({"api_token", "control_token"})
# Settings that ``WATCHER_<NAME>_FILE`` can supply instead of the variable itself.
SECRET_FILE_FIELDS = (
    "api_token",
    "control_token",
    "webhook_secret",
    "notify_secret",
    "database_url",
)
# Settings whose value an error message never repeats: the secrets, and the database URL (a
# ``postgresql://user:password@host`` given by mistake would otherwise be printed back).
UNECHOED_FIELDS = SECRET_FIELDS | {"database_url", "storage_url"}

_DNS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,253}")

PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]
# WATCHER_STORE_TIMEOUT when unset, unless half of WATCHER_LEASE_SECONDS is shorter.
STORE_TIMEOUT = 10.0


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """The watcher's settings; see ``config/watcher.env.example`` for every variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        hide_input_in_errors=True,
        validate_default=True,
    )

    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    api_base_url: pydantic.HttpUrl = pydantic.HttpUrl("https://api.magichour.ai")
    projects: str = ""
    download_dir: Path = Path("./downloads")
    # Outputs to object storage (s3://, gs://, az://) instead of download_dir; see watcher.objects.
    storage_url: str | None = None
    storage_allow_http: bool = False
    # Not in the repr: a PostgreSQL URL may carry a password.
    database_url: str = Field(default="sqlite:///./watcher.db", repr=False)
    database_url_file: Path | None = None
    delete_after_download: bool = False

    poll_initial: PositiveSeconds = 2.0
    poll_max: PositiveSeconds = 60.0
    max_concurrent_requests: Annotated[int, Field(ge=1, le=256)] = 8
    max_concurrent_downloads: Annotated[int, Field(ge=1, le=256)] = 4
    max_requests_per_second: Annotated[float, Field(gt=0, le=10_000)] = 50.0
    request_timeout: PositiveSeconds = 30.0
    download_min_rate: Annotated[float, Field(ge=0, le=1e12)] = 1024.0
    download_rate_window: PositiveSeconds = 60.0
    download_max_seconds: PositiveSeconds = 3600.0
    download_progress_seconds: PositiveSeconds = 30.0
    shutdown_grace: Annotated[float, Field(ge=0, le=3600)] = 30.0

    log_format: Literal["json", "console"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    http_enabled: bool = True
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Field(ge=0, le=65_535)] = 8080
    http_allowed_hosts: str = ""
    http_max_connections: Annotated[int, Field(ge=1, le=100_000)] = 100
    http_read_timeout: Annotated[float, Field(gt=0, le=300)] = 5.0
    control_token: SecretStr | None = None
    control_token_file: Path | None = None

    webhook_secret: SecretStr | None = None
    webhook_secret_file: Path | None = None
    webhook_auto_track: bool = False
    # While verified events arrive, no two polls of a project are closer than this (0: off).
    webhook_fallback_poll: Annotated[float, Field(ge=0, le=86_400)] = 30.0
    notify_url: pydantic.HttpUrl | None = None
    notify_secret: SecretStr | None = None
    notify_secret_file: Path | None = None

    replica_id: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        default_factory=_default_replica_id
    )
    lease_seconds: Annotated[float, Field(ge=5, le=3600)] = 60.0
    claim_interval: Annotated[float, Field(gt=0, le=3600)] = 1.0
    store_timeout: Annotated[float, Field(gt=0, le=300)] = STORE_TIMEOUT
    store_retry_initial: PositiveSeconds = 0.5
    store_retry_max: PositiveSeconds = 5.0

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("notify_url", mode="before")
    @classmethod
    def _empty_url_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("storage_url")
    @classmethod
    def _valid_storage_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return parse_storage_url(value).url()

    @property
    def storage(self) -> StorageLocation | None:
        """Where outputs go in object storage (``WATCHER_STORAGE_URL``); ``None``: on disk."""
        return None if self.storage_url is None else parse_storage_url(self.storage_url)

    @field_validator("replica_id", mode="before")
    @classmethod
    def _empty_replica_is_default(cls, value: object) -> object:
        return _default_replica_id() if value == "" else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _empty_format_is_auto(cls, value: object) -> object:
        if isinstance(value, str):
            return value.lower() or None
        return value

    @field_validator("api_base_url")
    @classmethod
    def _no_version_in_base_url(cls, value: pydantic.HttpUrl) -> pydantic.HttpUrl:
        # The client appends /v1/{kind}-projects/{id} itself: a base URL ending in /v1 asks for
        # /v1/v1/..., which answers 404 for every project, and each would end not_found.
        path = (value.path or "").rstrip("/")
        if path.lower().endswith("/v1"):
            root = str(value).rstrip("/")[: -len("/v1")]
            raise ValueError(
                f"must not end in /v1: the watcher adds /v1/{{kind}}-projects/{{id}} itself "
                f"(use {root})"
            )
        return value

    @field_validator("projects")
    @classmethod
    def _valid_projects(cls, value: str) -> str:
        try:
            parse_project_list(value)
        except InvalidProjectId as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("http_allowed_hosts")
    @classmethod
    def _valid_host_names(cls, value: str) -> str:
        for name in _split_names(value):
            if name != "*" and not _is_host_name(name):
                raise ValueError(
                    f"{name[:80]!r} is not a host name (names or IP addresses without a port, "
                    "comma separated, or *)"
                )
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise ValueError("contains a line break or another control character")
        if not value.startswith(("sqlite:///", "memory://", "postgresql://", "postgres://")):
            raise ValueError("expected sqlite:///path/to/file.db or postgresql://user@host/db")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.store_retry_max < self.store_retry_initial:
            raise ValueError(
                f"WATCHER_STORE_RETRY_MAX ({self.store_retry_max:g}) must not be below "
                f"WATCHER_STORE_RETRY_INITIAL ({self.store_retry_initial:g})"
            )
        if self.poll_max < self.poll_initial:
            raise ValueError(
                f"WATCHER_POLL_MAX ({self.poll_max:g}) must not be below "
                f"WATCHER_POLL_INITIAL ({self.poll_initial:g})"
            )
        self._store_timeout_within_half_a_lease()
        return self

    def _store_timeout_within_half_a_lease(self) -> None:
        """A lease is renewed every third of it: a renewal allowed more than half a lease could
        land after the lease ran out, and another replica would take the work over meanwhile.
        Unset, the store timeout follows a short lease (a lease alone is never refused); set,
        a value over half the lease is refused."""
        if "store_timeout" not in self.model_fields_set:
            self.store_timeout = min(STORE_TIMEOUT, self.lease_seconds / 2)
        elif self.store_timeout > self.lease_seconds / 2:
            raise ValueError(
                f"WATCHER_STORE_TIMEOUT ({self.store_timeout:g}) must be at most half of "
                f"WATCHER_LEASE_SECONDS ({self.lease_seconds:g})"
            )

    @field_validator(*SECRET_FIELDS)
    @classmethod
    def _secret_shape(cls, value: SecretStr | None, info: pydantic.ValidationInfo) -> object:
        if value is not None and value.get_secret_value().strip():
            problem = secret_problem(str(info.field_name), value.get_secret_value())
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: object) -> object:
        """``WATCHER_<NAME>_FILE`` names a file holding the secret (container secrets)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in SECRET_FILE_FIELDS:
            path = data.get(f"{name}_file")
            if path in (None, ""):
                continue
            if data.get(name) not in (None, ""):
                variable = f"{ENV_PREFIX}{name.upper()}"
                raise ValueError(f"set {variable} or {variable}_FILE, not both")
            try:
                data[name] = read_secret_file(name, Path(str(path)))
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return data

    @property
    def project_refs(self) -> list[ProjectRef]:
        """The projects listed in ``WATCHER_PROJECTS``."""
        return parse_project_list(self.projects)

    @property
    def allowed_hosts(self) -> list[str]:
        """The extra ``Host`` names of ``WATCHER_HTTP_ALLOWED_HOSTS``, lowercase."""
        return [name.lower() for name in _split_names(self.http_allowed_hosts)]

    @property
    def http_is_loopback(self) -> bool:
        """Whether the control API listens on a loopback address only."""
        if self.http_host == "localhost":
            return True
        try:
            return ip_address(self.http_host).is_loopback
        except ValueError:
            return False

    def summary(self) -> dict[str, object]:
        """The effective settings that explain a run, for the ``daemon_started`` log line.

        Never a secret: tokens and secrets appear only as whether they are set; the database URL
        loses its password, and every URL its user information and query string.
        """
        notify_url = url_without_credentials(str(self.notify_url)) if self.notify_url else None
        return {
            "api_base_url": url_without_credentials(str(self.api_base_url)),
            "store": store_summary(self.database_url),
            "download_dir": None if self.storage_url else str(self.download_dir.resolve()),
            "storage_url": self.storage_url,
            "delete_after_download": self.delete_after_download,
            "poll_initial": self.poll_initial,
            "poll_max": self.poll_max,
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_concurrent_downloads": self.max_concurrent_downloads,
            "max_requests_per_second": self.max_requests_per_second,
            "request_timeout": self.request_timeout,
            "download_min_rate": self.download_min_rate,
            "download_rate_window": self.download_rate_window,
            "download_max_seconds": self.download_max_seconds,
            "shutdown_grace": self.shutdown_grace,
            "lease_seconds": self.lease_seconds,
            "claim_interval": self.claim_interval,
            "store_timeout": self.store_timeout,
            "store_retry_initial": self.store_retry_initial,
            "store_retry_max": self.store_retry_max,
            "http": f"{self.http_host}:{self.http_port}" if self.http_enabled else "off",
            "control_token": configured_secret(self.control_token),
            "webhooks": configured_secret(self.webhook_secret),
            "webhook_auto_track": self.webhook_auto_track,
            "webhook_fallback_poll": self.webhook_fallback_poll,
            "notify_url": notify_url,
            "log_level": self.log_level,
        }

    def require_token(self) -> SecretStr:
        """The API token, or :class:`ConfigError` if neither variable sets one."""
        if self.api_token is None or not self.api_token.get_secret_value().strip():
            raise ConfigError(
                "WATCHER_API_TOKEN: required to run (or set WATCHER_API_TOKEN_FILE to a file "
                "holding it)"
            )
        return self.api_token


def configured(secret: SecretStr | None) -> str | None:
    """A secret setting's text, or ``None`` when it is unset or blank (an empty variable)."""
    if secret is None:
        return None
    return secret.get_secret_value().strip() or None


def configured_secret(secret: SecretStr | None) -> bool:
    """Whether a secret is set to something other than blanks (never the secret itself)."""
    return secret is not None and bool(secret.get_secret_value().strip())


def url_without_credentials(url: str) -> str:
    """``url`` without user information (a password) or query string (a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def store_summary(database_url: str) -> dict[str, object]:
    """Which store a database URL names and where, with no password.

    ``{"kind": "sqlite", "path": …}``, ``{"kind": "postgresql", "host": …, "port": …,
    "database": …, "user": …}`` or ``{"kind": "memory"}``.
    """
    if database_url.startswith("sqlite:///"):
        return {"kind": "sqlite", "path": str(Path(database_url[len("sqlite:///") :]).resolve())}
    if database_url.startswith("memory://"):
        return {"kind": "memory"}
    try:
        parts = urlsplit(database_url)
        port = parts.port
    except ValueError:  # a malformed URL: nothing of it is echoed
        return {"kind": "postgresql", "host": None}
    if "@" in parts.path + parts.query + parts.fragment:
        # A password holding "/", "?" or "#" split the URL before its "@": echo nothing of it.
        return {"kind": "postgresql", "host": None}
    return {
        "kind": "postgresql",
        "host": parts.hostname,
        "port": port,
        "database": parts.path.lstrip("/") or None,
        "user": parts.username,
    }


def _is_host_name(name: str) -> bool:
    """A DNS name or an IP address (IPv6 without brackets), no port."""
    try:
        ip_address(name)
    except ValueError:
        return _DNS_NAME.fullmatch(name) is not None
    return True


def _split_names(value: str) -> list[str]:
    return [name for name in re.split(r"[\s,]+", value) if name]


def secret_problem(name: str, value: str) -> str | None:
    """What is wrong with the value of the secret setting ``name``, or ``None``; never the value.

    Every secret is refused with a line break, another control character, or surrounding
    whitespace in it; the two tokens sent or compared as HTTP header values (the API token, the
    control token) must also be printable ASCII without spaces.
    """
    if any(unicodedata.category(c) == "Cc" or c in "\u2028\u2029" for c in value):
        where = "ends with" if value.rstrip("\r\n") != value else "contains"
        return (
            f"{where} a line break or another control character (a secret copied with its "
            f"trailing newline? {ENV_PREFIX}{name.upper()}_FILE strips it)"
        )
    if value != value.strip():
        return "starts or ends with whitespace"
    if name in HEADER_TOKENS and not (value.isascii() and value.isprintable() and " " not in value):
        return "must be printable ASCII without spaces: it is sent in an HTTP header"
    return None


def read_secret_file(name: str, path: Path) -> str:
    """The secret ``WATCHER_<NAME>_FILE`` holds, read now: the file's text without its
    surrounding whitespace (the trailing newline of a Kubernetes or Docker secret), checked like
    the variable's own value. :class:`ConfigError` naming the ``_FILE`` variable, never the
    secret, if the file is unreadable, empty or holds a malformed secret.

    The one reader of secret files: start-up and every later re-read (SIGHUP, a 401) use it.
    """
    variable = f"{ENV_PREFIX}{name.upper()}_FILE"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        # The path is not echoed: an operator who put the secret itself there must not see it
        # printed (and logged by whatever collects the container's output).
        raise ConfigError(f"{variable}: cannot read the file it names: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}: the file it names is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{variable}: the file it names is empty")
    problem = secret_problem(name, text)
    if problem is not None:
        raise ConfigError(f"{variable}: the secret in the file it names {problem}")
    return text


def reread_secret_files(settings: Settings) -> tuple[Settings, list[str]]:
    """``settings`` with every secret that comes from a ``*_FILE`` read from its file again, and
    the ``*_FILE`` variables whose secret changed (SIGHUP, or a 401: a rotated container secret
    takes effect without a restart).

    All or nothing: if any file cannot be read, is empty or holds a malformed secret (see
    :func:`read_secret_file`), :class:`ConfigError` says which
    (one line each) and the caller keeps the secrets it has. ``WATCHER_DATABASE_URL_FILE`` is
    not re-read: the store's connections are already open.
    """
    update: dict[str, SecretStr] = {}
    changed: list[str] = []
    problems: list[str] = []
    for name in sorted(SECRET_FIELDS):
        path: Path | None = getattr(settings, f"{name}_file")
        if path is None:
            continue
        variable = f"{ENV_PREFIX}{name.upper()}_FILE"
        try:
            secret = SecretStr(read_secret_file(name, path))
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        current: SecretStr | None = getattr(settings, name)
        if current is None or current.get_secret_value() != secret.get_secret_value():
            update[name] = secret
            changed.append(variable)
    if problems:
        raise ConfigError("\n".join(problems))
    return (settings.model_copy(update=update) if update else settings), changed


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``environ`` (default: the process environment).

    Raises :class:`ConfigError` whose message has one line per bad setting.
    """
    env = dict(os.environ if environ is None else environ)
    try:
        if environ is None:
            return Settings()
        return _settings_from(env)
    except pydantic.ValidationError as exc:
        raise ConfigError("\n".join(_describe(err) for err in exc.errors())) from None


def _settings_from(env: Mapping[str, str]) -> Settings:
    """Build settings from an explicit mapping instead of ``os.environ`` (for tests)."""
    values = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.upper().startswith(ENV_PREFIX)
    }
    known = {k: v for k, v in values.items() if k in Settings.model_fields}
    return Settings.model_validate(known)


def _describe(error: Mapping[str, object]) -> str:
    loc = error.get("loc") or ()
    if not isinstance(loc, tuple):
        loc = ()
    message = str(error.get("msg", "invalid"))
    if message.startswith(("Value error, ", "Assertion failed, ")):
        message = message.split(", ", 1)[1]
    if not loc:
        return message if message.startswith(ENV_PREFIX) else f"settings: {message}"
    name = f"{ENV_PREFIX}{str(loc[0]).upper()}"
    value = error.get("input")
    if str(loc[0]) in UNECHOED_FIELDS or value is None or isinstance(value, dict):
        return f"{name}: {message}"
    shown = str(value)
    shown = shown if len(shown) <= 80 else shown[:80] + "…"
    return f"{name}: {message} (got {shown!r})"


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """``WATCHER_*`` variables that name no setting: most likely typos."""
    env = os.environ if environ is None else environ
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    return sorted(k for k in env if k.upper().startswith(ENV_PREFIX) and k.upper() not in fields)
