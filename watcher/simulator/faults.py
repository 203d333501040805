"""Which transport fault, if any, hits the next request: drawn from a seeded random source.

This module owns the decision and its parameters (which 5xx, which body, the ``Retry-After``
value, how much of a body to send). It does not build responses or touch sockets: ``app`` does.
It is not thread-safe on its own; the simulator calls it under its lock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from watcher.simulator.config import Faults

FaultName = Literal["429", "5xx", "reset", "slow", "broken_json", "truncate"]
FaultTarget = Literal["api", "download"]

_SERVER_ERRORS = (500, 502, 503, 504)
_5XX_BODIES = ("html", "empty", "json")
_BROKEN_BODIES = ("html", "truncated")


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault and its drawn parameters.

    ``variant`` picks the body: ``html``, ``empty`` or ``json`` for a 5xx; ``html`` or
    ``truncated`` for broken JSON. ``fraction`` is the share of a download body sent before the
    connection is cut; ``seconds`` is how long a slow response stalls.
    """

    name: FaultName
    status_code: int | None = None
    variant: str = ""
    retry_after: str | None = None
    fraction: float = 0.0
    seconds: float = 0.0


def retry_after_value(delay: float, now: float, *, as_date: bool) -> str:
    """A ``Retry-After`` value: whole delta-seconds, or the HTTP-date at which to retry."""
    if as_date:
        return formatdate(math.ceil(now + delay), usegmt=True)
    return str(math.ceil(delay))


class FaultDrawer:
    """Draws faults for requests in arrival order; the same seed gives the same sequence."""

    def __init__(self, seed: int, faults: Faults) -> None:
        self._rng = random.Random(f"faults:{seed}")
        self.faults = faults
        self._rate_limited = 0

    def draw(self, target: FaultTarget, now: float) -> Fault | None:
        """Decide the fault for one request to ``target`` (``None``: serve it normally)."""
        name = self._pick(target)
        if name is None:
            return None
        return self._detail(name, now)

    def _pick(self, target: FaultTarget) -> FaultName | None:
        f = self.faults
        table: tuple[tuple[FaultName, float], ...]
        if target == "api":
            table = (
                ("429", f.rate_429),
                ("5xx", f.rate_5xx),
                ("reset", f.rate_reset),
                ("slow", f.rate_slow),
                ("broken_json", f.rate_broken_json),
            )
        else:
            table = (("reset", f.rate_reset), ("slow", f.rate_slow), ("truncate", f.rate_truncate))
        roll = self._rng.random()
        for name, rate in table:
            if roll < rate:
                return name
            roll -= rate
        return None

    def _detail(self, name: FaultName, now: float) -> Fault:
        rng = self._rng
        if name == "429":
            return Fault(name, 429, retry_after=self._retry_after(now))
        if name == "5xx":
            return Fault(name, rng.choice(_SERVER_ERRORS), variant=rng.choice(_5XX_BODIES))
        if name == "broken_json":
            return Fault(name, 200, variant=rng.choice(_BROKEN_BODIES))
        if name == "truncate":
            return Fault(name, fraction=rng.uniform(0.1, 0.9))
        if name == "slow":
            return Fault(name, seconds=self.faults.slow_seconds)
        return Fault(name)

    def _retry_after(self, now: float) -> str:
        form = self.faults.retry_after_form
        as_date = form == "http-date" or (form == "alternate" and self._rate_limited % 2 == 1)
        self._rate_limited += 1
        return retry_after_value(self.faults.retry_after, now, as_date=as_date)
