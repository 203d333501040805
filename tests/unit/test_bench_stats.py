"""The benchmark's pure helpers: percentiles, ratios, verdicts, tables, output matching."""

from __future__ import annotations

import math

import pytest

from bench.stats import (
    Verdict,
    at_least,
    at_most,
    fmt,
    markdown_table,
    outputs_correct,
    percentile,
    ratio,
    verdict_table,
)


def test_percentile_interpolates_between_closest_ranks() -> None:
    """p50 of an even-sized sample is the mean of the middle two; p0/p100 are min/max."""
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 99) == pytest.approx(3.97)


def test_percentile_of_one_value_and_of_nothing() -> None:
    """A single value is every percentile; an empty sample gives NaN, not an error."""
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_percentile_refuses_out_of_range_q() -> None:
    """q outside 0..100 is a programming error."""
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_ratio_and_fmt_carry_nan_as_not_measured() -> None:
    """Division by zero and NaN inputs give NaN, which tables print as '-'."""
    assert ratio(1.0, 4.0) == 0.25
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))
    assert fmt(math.nan) == "-"
    assert fmt(None) == "-"
    assert fmt(1.23456, 3) == "1.235"


def test_bounds_say_none_when_not_measured() -> None:
    """A NaN measurement is neither met nor missed."""
    assert at_most(1.0, 1.0) is True
    assert at_most(1.1, 1.0) is False
    assert at_most(math.nan, 1.0) is None
    assert at_least(0.8, 0.8) is True
    assert at_least(math.nan, 0.8) is None


def test_verdict_labels_and_table() -> None:
    """Verdicts render as yes / NO / n/a in a target-measured-met table."""
    table = verdict_table(
        [
            Verdict("lag p99 < 1.5 s", "1.2 s", met=True),
            Verdict("CPU <= 1/30", "1/5", met=False),
            Verdict("RSS per project", "3 bytes", met=None),
        ]
    )
    lines = table.splitlines()
    assert lines[0] == "| target | measured | met? |"
    assert lines[2].endswith("| yes |")
    assert lines[3].endswith("| NO |")
    assert lines[4].endswith("| n/a |")


def test_markdown_table_escapes_pipes() -> None:
    """A '|' inside a cell does not split the column."""
    assert markdown_table(("a",), [("x|y",)]).splitlines()[-1] == "| x\\|y |"


def test_outputs_correct_matches_by_content_once_each() -> None:
    """An output counts if its project's folder holds a file with its sha256, one file each."""
    expected = {"p1": ["aa", "bb"], "p2": ["cc", "cc"], "p3": ["dd"]}
    found = {"p1": ["bb", "aa", "zz"], "p2": ["cc"], "p3": []}
    assert outputs_correct(expected, found) == 3
    assert outputs_correct(expected, {}) == 0
