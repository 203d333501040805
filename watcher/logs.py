"""Logging: structlog, one JSON object per line on stdout (or console rendering on a TTY).

Every event has a stable name and stable keys (see the README's table). Secrets registered with
:func:`register_secret` are replaced by ``[REDACTED]`` in every string value before rendering, as a
last line of defence: the code never puts them in an event in the first place. Events that
outsiders can repeat at will (refused connections, malformed requests) go through
:class:`BurstLog`, one line per burst.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO, cast

import structlog

from watcher import clock
from watcher.terminal import printable

_SECRETS: set[str] = set()
BURST_SECONDS = 60.0
REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 4


def register_secret(value: str | None) -> None:
    """Never let ``value`` reach a log line."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _SECRETS.add(value)


def _redact_value(value: Any) -> Any:  # noqa: ANN401 - log values are of any type
    if isinstance(value, str):
        for secret in _SECRETS:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_secrets(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub registered secrets from every value."""
    if not _SECRETS:
        return event_dict
    for key, value in event_dict.items():
        event_dict[key] = _redact_value(value)
    return event_dict


def neutralise_controls(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor of the console rendering: escape sequences in values (an API's error
    message) are shown, not sent to the terminal. A traceback keeps its line breaks."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            lines = value.split("\n") if key == "exception" else [value]
            event_dict[key] = "\n".join(printable(line) for line in lines)
    return event_dict


class BurstLog:
    """One warning per burst of a repeated event: the first occurrence is logged at once, later
    ones are counted and logged (with ``occurrences``) at most once per ``every`` seconds."""

    def __init__(
        self,
        event: str,
        every: float = BURST_SECONDS,
        monotonic: Callable[[], float] = clock.monotonic,
        level: str = "warning",
    ) -> None:
        self.event = event
        self.every = every
        self.level = level
        self._monotonic = monotonic
        self._pending = 0
        self._logged_at: float | None = None

    def note(self, **keys: object) -> None:
        """One more occurrence; logs it (and those held back) unless one was logged lately."""
        self._pending += 1
        now = self._monotonic()
        if self._logged_at is not None and now - self._logged_at < self.every:
            return
        structlog.get_logger("watcher").log(
            logging.getLevelNamesMapping()[self.level.upper()],
            self.event,
            occurrences=self._pending,
            **keys,
        )
        self._pending = 0
        self._logged_at = now


class LogContext:
    """Keys every event carries while the ``with`` block runs (``project_id`` in a project's
    work), as structlog's ``bound_contextvars`` binds them, for less: the keys' earlier values
    come back from the tokens of their context variables, not from a copy of the whole context
    read before and unbound and bound again after (issue 11: a project's work binds them once
    per claim)."""

    def __init__(self, **keys: object) -> None:
        self._keys = keys
        self._tokens: Mapping[str, contextvars.Token[Any]] = {}

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._keys)

    def __exit__(self, *exc: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)


class _ClosedReaderSafe:
    """A log stream whose reader may go away (a pipe closed by a crashed log shipper).

    A line that cannot be written is dropped instead of raising ``BrokenPipeError`` into whatever
    logged it: a signal handler, a shutdown, a download. The stream's file descriptor then points
    at ``/dev/null``, so the interpreter's own flush at exit does not fail either.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self._silence()
            return 0

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self._silence()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def _silence(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)


def repair_standard_streams() -> None:
    """Make a process started with a standard descriptor closed (``watcher run >&-``) safe.

    A closed 0, 1 or 2 gets ``/dev/null``, so no file opened later (the database, its lock, a
    download) can become descriptor 1 and receive log lines. With stdout closed, logs and
    command output go to stderr instead (or nowhere, if it is closed too).
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = os.fdopen(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    if sys.stdout is None:
        sys.stdout = sys.stderr


def _shared(writer: structlog.WriteLogger) -> Callable[..., structlog.WriteLogger]:
    """A logger factory that hands out ``writer`` itself, whatever the logger's name."""

    def factory(*_args: object) -> structlog.WriteLogger:
        return writer

    return factory


def configure(level: str = "info", fmt: str | None = None, stream: TextIO | None = None) -> None:
    """Set up structlog. ``fmt`` is ``json``, ``console``, or ``None`` for "console on a TTY"."""
    out = cast("TextIO", _ClosedReaderSafe(stream or sys.stdout))
    console = fmt == "console" or (fmt is None and out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            *([neutralise_controls] if console else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One writer for every event: structlog's WriteLoggerFactory builds a new one (and
        # looks up the file's lock) at each call of a module's lazy logger, since loggers are
        # not cached (capture_logs in tests reconfigures them).
        logger_factory=_shared(structlog.WriteLogger(out)),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library; keep their chatter (request lines) out.
    for name in ("httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The connection pool warns about each failed reconnection, in plain text on stderr; an
    # outage is the daemon's own store_unavailable event, once.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
