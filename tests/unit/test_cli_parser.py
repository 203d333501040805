"""Unit tests of the ``watcher`` argument parser: what ``--help`` tells, what it refuses."""

from __future__ import annotations

import argparse

import pytest

from watcher.cli import build_parser


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
