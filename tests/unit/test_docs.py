"""The README is part of the interface: every log event and every setting is documented there."""

from __future__ import annotations

import re
from pathlib import Path

from watcher.metrics import Metrics
from watcher.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text("utf-8")
EVENT_CALL = re.compile(r'log\.(?:debug|info|warning|error|exception)\(\s*"([a-z_]+)"')


def logged_events() -> set[str]:
    """Every event name the watcher logs (the simulator logs nothing of its own)."""
    events: set[str] = set()
    for path in (ROOT / "watcher").rglob("*.py"):
        if "simulator" not in path.parts:
            events.update(EVENT_CALL.findall(path.read_text("utf-8")))
    return events


def documented_events() -> set[str]:
    section = README.split("## Logs", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))


def test_every_log_event_is_documented() -> None:
    """Each event name in the code has a row in the README's log table, and no row is stale."""
    events = logged_events()
    assert len(events) > 20
    assert events == documented_events()


def test_every_setting_is_documented() -> None:
    """Each settings field appears in the README's configuration table."""
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for name in Settings.model_fields:
        variable = f"{ENV_PREFIX}{name.upper()}"
        if variable.endswith("_FILE"):
            base = variable.removesuffix("_FILE")
            assert f"`{variable}`" in section or f"`{base}` / `_FILE`" in section, variable
        else:
            assert f"`{variable}`" in section, variable


def test_every_metric_is_documented() -> None:
    """Each metric of the daemon's registry has a row in the README's metrics table."""
    exposed = {family.name for family in Metrics().registry.collect()}
    section = README.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE)
    assert exposed == {name.removesuffix("_total") for name in rows}
