"""The one place that reads the clock.

Every decision elsewhere takes ``now`` as a parameter, so it can be tested without sleeping.
Times are Unix seconds as floats (wall clock), because they are stored and shared between
processes; ``monotonic`` is for measuring durations inside one process.
"""

from __future__ import annotations

import time


def now() -> float:
    """Return the current wall-clock time in Unix seconds."""
    return time.time()


def monotonic() -> float:
    """Return a monotonic reading for measuring elapsed time."""
    return time.monotonic()
