"""The status table: projects as people read them at a glance, from a ``status --json``
document (the store's or the control API's). Used by ``watcher status`` and ``watcher demo``;
it prints nothing itself and reads the clock only through :mod:`watcher.clock`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from watcher import clock
from watcher.models import State
from watcher.store import OutputRecord, ProjectRecord
from watcher.terminal import printable
from watcher.views import project_json


def render_table(
    counts: dict[State, int], rows: list[tuple[ProjectRecord, list[OutputRecord]]]
) -> str:
    """A readable table of projects, with a summary line of counts by state."""
    return render_status(
        {
            "counts": {s.value: n for s, n in sorted(counts.items())},
            "projects": [project_json(p, o) for p, o in rows],
        }
    )


def _saved_cell(saved: int, total: int, so_far: int) -> str:
    """``1/3``, and the bytes of the unsaved outputs already on disk: ``1/3 +12.5 MiB``."""
    if not total:
        return "-"
    return f"{saved}/{total}" + (f" +{_human_bytes(so_far)}" if so_far else "")


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


NOTE_CHARS = 60


def render_status(
    doc: dict[str, Any],
    state: str | None = None,
    *,
    wide: bool = False,
    now: float | None = None,
) -> str:
    """The table of a ``status --json`` document (as the store or the control API gives it),
    listing projects in ``state`` only if given; says so when more exist than it shows.

    AGE is the time since the project was tracked, NEXT the time until its next poll (``now``
    for one that is due, ``-`` once final). Notes are cut to fit unless ``wide``.
    """
    at = clock.now() if now is None else now
    counts: dict[str, int] = doc["counts"]
    summary = ", ".join(f"{s} {n}" for s, n in sorted(counts.items())) or "no projects"
    summary = printable(summary)
    header = ("ID", "KIND", "STATE", "REMOTE", "POLLS", "SAVED", "AGE", "NEXT", "NOTE")
    lines: list[tuple[str, ...]] = [header]
    cut = False
    for p in doc["projects"]:
        outputs = p["outputs"]
        saved = sum(1 for o in outputs if o["state"] == "saved")
        so_far = sum(o.get("bytes_received") or 0 for o in outputs if o["state"] != "saved")
        error = p["error"]
        note = p["failure"] or (f"{error['code']}: {error['message']}" if error else "")
        note = printable(note)  # before the cut, which then counts what is shown
        cells = (
            p["id"],
            p["kind"],
            p["state"],
            p["remote_status"] or "-",
            str(p["polls"]),
            _saved_cell(saved, len(outputs), so_far),
            _since(p["tracked_at"], at),
            _until(p["next_due_at"], at),
            note if wide else _cut(note),
        )
        lines.append(tuple(printable(str(cell)) for cell in cells))
        cut = cut or (not wide and len(note) > NOTE_CHARS)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    ]
    shown = len(doc["projects"])
    total = counts.get(state, 0) if state else sum(counts.values())
    if shown < total:
        text.append(f"(showing {shown} of {total}: --limit for more, --state to filter)")
    if cut:
        text.append("(notes cut short: --wide or --json for the whole of each)")
    return "\n".join([f"projects: {summary}", *text])


def _cut(note: str) -> str:
    return note if len(note) <= NOTE_CHARS else note[: NOTE_CHARS - 1] + "…"


def _seconds_of(iso_time: str | None) -> float | None:
    return None if iso_time is None else datetime.fromisoformat(iso_time).timestamp()


def _since(iso_time: str | None, now: float) -> str:
    at = _seconds_of(iso_time)
    return "-" if at is None else _duration(now - at)


def _until(iso_time: str | None, now: float) -> str:
    at = _seconds_of(iso_time)
    if at is None:
        return "-"
    return "now" if at <= now else f"in {_duration(at - now)}"


def _duration(seconds: float) -> str:
    """``45s``, ``12m``, ``5h``, ``3d``: a span as people read it at a glance."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
