"""Pure helpers of the benchmark: percentiles, ratios, verdicts and Markdown tables.

Nothing here starts a process or reads the clock, so it is unit-tested
(``tests/unit/test_bench_stats.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MB = 1_000_000


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks.

    This is NumPy's default method: p50 of ``[1, 2, 3, 4]`` is 2.5, p100 is the maximum. An empty
    input gives NaN, which the tables print as ``-``.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is zero or either is NaN."""
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table: ``-`` for None or NaN, else fixed-point with ``digits`` decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One target: what it asks, what was measured, and whether it holds."""

    target: str
    measured: str
    met: bool | None  # None: not measured (the run failed or the scenario was skipped)
    info: bool = False  # context for the targets, not a target itself

    @property
    def label(self) -> str:
        """``yes``, ``NO``, ``n/a`` (not measured) or ``info``."""
        if self.info:
            return "info"
        if self.met is None:
            return "n/a"
        return "yes" if self.met else "NO"


def at_most(value: float, limit: float) -> bool | None:
    """``value <= limit``, or None when ``value`` is NaN (not measured)."""
    return None if math.isnan(value) else value <= limit


def at_least(value: float, floor: float) -> bool | None:
    """``value >= floor``, or None when ``value`` is NaN (not measured)."""
    return None if math.isnan(value) else value >= floor


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table; ``|`` inside a cell is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    body = [line(headers), "|" + "|".join("---" for _ in headers) + "|"]
    body.extend(line(row) for row in rows)
    return "\n".join(body)


def verdict_table(verdicts: Iterable[Verdict]) -> str:
    """The targets of a scenario as a table with ``target``, ``measured`` and ``met?``."""
    return markdown_table(
        ("target", "measured", "met?"), [(v.target, v.measured, v.label) for v in verdicts]
    )


def outputs_correct(expected: dict[str, list[str]], found: dict[str, list[str]]) -> int:
    """How many expected outputs are on disk with the right content.

    ``expected`` maps a project id to the sha256 of each of its outputs; ``found`` maps it to the
    sha256 of each file in the project's folder. Matching is by content, not by name (the SDK and
    the watcher name files differently), and a file counts for one output only.
    """
    correct = 0
    for project_id, wanted in expected.items():
        pool = list(found.get(project_id, []))
        for digest in wanted:
            if digest in pool:
                pool.remove(digest)
                correct += 1
    return correct
