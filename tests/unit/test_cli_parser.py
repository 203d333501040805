"""Unit tests of the ``watcher`` argument parser: what ``--help`` tells, what it refuses."""

from __future__ import annotations

import argparse

import pytest

from watcher.cli import build_parser
from watcher.errors import ConfigError
from watcher.simulator.cli import config_from_args


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = sub.choices[name]
    return found


def test_simulate_help_shows_every_default() -> None:
    """Every option of ``watcher simulate`` says its default in ``--help``."""
    simulate = subparser("simulate")
    for action in simulate._actions:
        if action.option_strings and action.default is not argparse.SUPPRESS:
            assert action.help is not None
            assert "(default: " in action.help, action.option_strings
    text = simulate.format_help()
    assert "(default: 8787)" in text
    assert "(default: mhk_live_simulator)" in text


@pytest.mark.parametrize("bad", ["0", "-1", "many"])
def test_status_limit_must_be_a_whole_number_of_at_least_one(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``status --limit`` below 1 (or not a number) is a usage error, exit status 2."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["status", "--limit", bad])
    assert exited.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_simulate_webhook_options_configure_the_simulator() -> None:
    """``--webhook-url``, ``--webhook-secret`` and ``--webhook-delay`` reach its config; a
    URL without a secret is refused (events are always signed)."""
    url = "http://127.0.0.1:8080/webhooks/magic-hour"
    args = build_parser().parse_args(
        ["simulate", "--webhook-url", url, "--webhook-secret", "s3", "--webhook-delay", "0.5"]
    )
    config = config_from_args(args)
    assert (config.webhook_url, config.webhook_secret, config.webhook_delay) == (url, "s3", 0.5)
    assert "s3" not in repr(config)
    assert config_from_args(build_parser().parse_args(["simulate"])).webhook_url is None
    with pytest.raises(ConfigError, match="webhook_secret"):
        config_from_args(build_parser().parse_args(["simulate", "--webhook-url", url]))
