"""The README is part of the interface: every log event and every setting is documented there."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from watcher import cli
from watcher.metrics import Metrics
from watcher.settings import (
    ENV_PREFIX,
    SECRET_FIELDS,
    Settings,
    configured_secret,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text("utf-8")
EVENT_CALL = re.compile(
    r'(?:log\.(?:debug|info|warning|error|exception)\(|BurstLog\()\s*"([a-z_]+)"'
)


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


STANDARD_PREFIXES = ("process_", "python_")


def metric_rows() -> dict[str, tuple[str, set[str], str]]:
    """The README's metrics table: name (without ``_total``) -> (type, labels, meaning)."""
    section = README.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    row = re.compile(r"^\| `([a-z_*]+)` \|([^|]*)\|([^|]*)\| (.*) \|$", re.MULTILINE)
    return {
        name.removesuffix("_total"): (kind.strip(), set(re.findall(r"`([a-z_]+)`", labels)), text)
        for name, kind, labels, text in row.findall(section)
    }


def watcher_metrics() -> list[MetricWrapperBase]:
    """The daemon's own metric objects (the standard collectors aside)."""
    return [m for m in vars(Metrics()).values() if isinstance(m, MetricWrapperBase)]


def test_every_metric_is_documented() -> None:
    """Each metric of the daemon's registry has a row in the README's metrics table (the standard
    process and interpreter series under their ``process_*`` and ``python_*`` rows), and no row
    is stale."""
    exposed = {family.name for family in Metrics().registry.collect()}
    rows = set(metric_rows())
    standard = {f"{prefix}*" for prefix in STANDARD_PREFIXES}
    assert {p for p in standard if any(n.startswith(p[:-1]) for n in exposed)} == standard
    assert {n for n in exposed if not n.startswith(STANDARD_PREFIXES)} == rows - standard


def test_documented_types_and_labels_match_the_code() -> None:
    """Each metric's row names its type and exactly the labels the code gives it."""
    rows = metric_rows()
    for metric in watcher_metrics():
        kind, labels, _ = rows[metric._name]
        assert kind == metric._type, metric._name
        assert labels == set(metric._labelnames), metric._name


def test_fleet_wide_gauges_say_how_to_aggregate_them() -> None:
    """A gauge read from the shared store is labelled ``scope`` and its row says that one
    replica reports it, so that ``sum`` and ``max`` agree, as does the section's preamble."""
    rows = metric_rows()
    fleet = [m._name for m in watcher_metrics() if "scope" in m._labelnames]
    assert fleet == ["watcher_projects"]
    for name in fleet:
        assert "one replica at a time" in rows[name][2], name
        assert f"sum by (state) ({name})" in README


def test_the_start_up_summary_is_documented() -> None:
    """Every key of the redacted settings that ``daemon_started`` logs is named in its row."""
    logs = README.split("## Logs", 1)[1].split("\n## ", 1)[0]
    (row,) = [line for line in logs.splitlines() if line.startswith("| `daemon_started` |")]
    for key in load_settings({}).summary():
        assert f"`{key}`" in row, key


EXAMPLE = (ROOT / "config" / "watcher.env.example").read_text("utf-8")


def example_assignments() -> dict[str, str]:
    """The commented-out ``# WATCHER_X=value`` lines of the example env file."""
    pairs = re.findall(r"^# (WATCHER_[A-Z_]+)=(.*)$", EXAMPLE, re.MULTILINE)
    assert len(pairs) == len(dict(pairs)), "a variable is shown twice"
    return dict(pairs)


def test_the_example_env_file_shows_every_setting_by_its_real_name() -> None:
    """Each variable of config/watcher.env.example names a setting, and each setting is there."""
    settings = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert set(example_assignments()) == settings


def test_the_example_env_file_shows_the_defaults() -> None:
    """Uncommented as shown, the example's values load to exactly the defaults (a ``_FILE``
    variable shows an example path instead, and a secret's empty value means unset)."""
    shown = {k: v for k, v in example_assignments().items() if not k.endswith("_FILE")}
    loaded = load_settings(shown).model_dump()
    for name in SECRET_FIELDS:  # blank is how the watcher reads "no secret" (configured())
        loaded[name] = loaded[name] if configured_secret(loaded[name]) else None
    assert loaded == load_settings({}).model_dump()


OPERATOR_NOTES = (ROOT / "config" / "README.md").read_text("utf-8")


def test_the_operator_notes_say_what_the_health_check_does_with_http_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """config/README.md says what ``watcher health`` really does with the HTTP server off: it
    exits 0 (there is nothing to ask), it does not fail."""
    for variable in [k for k in os.environ if k.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("WATCHER_HTTP_ENABLED", "false")
    code = cli.main(["health"])
    capsys.readouterr()
    section = OPERATOR_NOTES.split("## Health check", 1)[1].split("\n## ", 1)[0]
    sentence = " ".join(section.split()).split("`WATCHER_HTTP_ENABLED=false`", 1)[1][:120]
    assert code == 0
    assert "`watcher health` exits 0" in sentence


HTTP_SOURCES = "\n".join(p.read_text("utf-8") for p in (ROOT / "watcher" / "http").glob("*.py"))


def answered_errors() -> dict[str, str]:
    """Every error code the HTTP app answers, with its status (``other`` when it varies)."""
    raised = re.findall(
        r'(?:ApiProblem|problem|Refusal|refusal_bytes)\(\s*(\d{3}),\s*"([a-z_]+)"', HTTP_SOURCES
    )
    mapped = re.findall(r'(\d{3}): "([a-z_]+)"', HTTP_SOURCES)
    fallback = re.findall(r'codes\.get\([^,]+, "([a-z_]+)"\)', HTTP_SOURCES)
    errors = {code: status for status, code in [*raised, *mapped]}
    errors.update(dict.fromkeys(fallback, "other"))
    return errors


def test_every_error_code_is_documented_with_its_status() -> None:
    """The README's table of error codes holds exactly the codes the HTTP app answers, each with
    the status it is answered with."""
    section = README.split("## The HTTP server", 1)[1].split("\n## ", 1)[0]
    documented = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}|other) \|", section, re.MULTILINE))
    answered = answered_errors()
    assert len(answered) > 15
    assert documented == answered


def test_every_webhook_rejection_reason_is_documented() -> None:
    """Each reason a signature check gives is named where the README explains the 401
    ``invalid_signature`` answer and in the ``webhook_rejected`` log row."""
    source = (ROOT / "watcher" / "webhooks.py").read_text("utf-8")
    reasons = set(re.findall(r'SignatureRejected\(\s*"([a-z_]+)"', source))
    assert reasons >= {"missing_header", "bad_signature"}
    rows = [
        line
        for line in README.splitlines()
        if line.startswith(("| `invalid_signature` |", "| `webhook_rejected` |"))
    ]
    assert len(rows) == 2
    for row in rows:
        assert all(f"`{reason}`" in row for reason in reasons), row
    assert "`invalid_signature`" in rows[1]
