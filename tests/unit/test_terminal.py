"""What reaches a person's terminal is shown, never obeyed: escape sequences and other control
characters in API messages are neutralised in the status table, error lines and console logs."""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Iterator

import pytest
import structlog

from watcher import logs
from watcher.errors import WatcherError
from watcher.table import render_status
from watcher.terminal import printable

HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\rover\u202eeerht\x9b1m\ud800\u2028next\x00"


def unsafe(text: str) -> list[str]:
    """The characters of ``text`` a terminal would act on rather than show."""
    return [
        c for c in text if unicodedata.category(c) in {"Cc", "Cf", "Cs", "Zl", "Zp"} and c != "\n"
    ]


def test_printable_escapes_controls_and_keeps_text() -> None:
    """Controls become visible ``\\xNN``/``\\uNNNN``; letters of any script stay as they are."""
    assert printable("\x1b[2Jhi\r\n") == "\\x1b[2Jhi\\x0d\\x0a"
    assert printable("\u202eabc\ud800") == "\\u202eabc\\ud800"
    assert printable("déjà vu, 日本語, ok 🎬") == "déjà vu, 日本語, ok 🎬"
    assert unsafe(printable(HOSTILE)) == []


def test_the_status_table_shows_escape_sequences_as_text() -> None:
    """An API error message (or an id, a state, a count label from a hostile ``--url``) full of
    escape sequences is printed escaped, one row per project."""
    project = {
        "id": "cm1\x1b[1A",
        "kind": "image",
        "state": "error",
        "remote_status": "error",
        "polls": 3,
        "tracked_at": "2026-12-02T10:00:00+00:00",
        "next_due_at": None,
        "outputs": [],
        "failure": None,
        "error": {"code": "bad\x07", "message": HOSTILE},
    }
    text = render_status({"counts": {"error\x1b[8m": 1}, "projects": [project]}, wide=True)
    assert unsafe(text) == []
    assert "\\x1b]0;owned\\x07" in text
    assert len(text.splitlines()) == 3


def fail(message: str) -> None:
    """Raise what a failed API call raises: the API's own message."""
    raise WatcherError(message)


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """Logging configured for the console into a buffer, restored afterwards."""
    buffer = io.StringIO()
    logs.configure("info", "console", stream=buffer)
    yield buffer
    structlog.reset_defaults()


def test_console_logs_show_escape_sequences_as_text(console: io.StringIO) -> None:
    """With ``WATCHER_LOG_FORMAT=console``, values and tracebacks holding escape sequences (an
    exception carrying an API message) are escaped; a traceback keeps its line breaks."""
    log = structlog.get_logger("watcher")
    log.warning("api_retry", error=HOSTILE)
    try:
        fail(HOSTILE)
    except WatcherError:
        log.exception("project_crashed", project_id="cm1")
    text = console.getvalue()
    assert unsafe(text) == []
    assert "\\x1b[2J" in text
    assert "Traceback (most recent call last):\n" in text
