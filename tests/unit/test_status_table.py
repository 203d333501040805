"""Unit tests of the ``watcher status`` table: its age and next-poll columns, and notes that are
cut to fit unless asked for whole."""

from __future__ import annotations

from typing import Any

from watcher.models import Kind, State
from watcher.store import ProjectRecord
from watcher.table import render_status
from watcher.views import project_json

NOW = 1_700_000_000.0
LONG_NOTE = "GET image:abc: HTTP 404: no such project at /api/v1/image-projects/abc " + "x" * 80


def doc(*records: ProjectRecord) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    return {"counts": counts, "projects": [project_json(r, []) for r in records]}


def record(
    pid: str, state: State, *, tracked: float, due: float, failure: str | None = None
) -> ProjectRecord:
    return ProjectRecord(
        id=pid,
        kind=Kind.IMAGE,
        state=state,
        remote_status=None,
        delete_after_download=False,
        due_at=due,
        attempt=0,
        polls=3,
        tracked_at=tracked,
        updated_at=tracked,
        failure=failure,
    )


def rows(text: str) -> dict[str, list[str]]:
    return {
        line.split()[0]: line.split() for line in text.splitlines()[2:] if not line.startswith("(")
    }


def test_age_and_next_poll_are_shown() -> None:
    """AGE is the time since tracking; NEXT the time to the next poll, ``-`` once final."""
    text = render_status(
        doc(
            record("waits", State.POLLING, tracked=NOW - 150, due=NOW + 42),
            record("due", State.POLLING, tracked=NOW - 7_200, due=NOW - 1),
            record("gone", State.NOT_FOUND, tracked=NOW - 3 * 86_400, due=NOW),
        ),
        now=NOW,
    )
    assert text.splitlines()[1].split()[6:8] == ["AGE", "NEXT"]
    table = rows(text)
    assert table["waits"][6:9] == ["2m", "in", "42s"]
    assert table["due"][6:8] == ["2h", "now"]
    assert table["gone"][6:8] == ["3d", "-"]


def test_a_long_note_is_cut_unless_wide() -> None:
    """A note longer than the column is cut with an ellipsis and a hint; ``wide`` shows it whole."""
    projects = doc(record("gone", State.NOT_FOUND, tracked=NOW, due=NOW, failure=LONG_NOTE))
    cut = render_status(projects, now=NOW)
    assert LONG_NOTE not in cut
    assert "…" in cut
    assert cut.splitlines()[-1] == "(notes cut short: --wide or --json for the whole of each)"
    whole = render_status(projects, now=NOW, wide=True)
    assert LONG_NOTE in whole
    assert "notes cut short" not in whole
