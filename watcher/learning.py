"""What the polling schedule learns from the store: the render durations of every kind.

:class:`RenderLearning` loads them into the schedule's :class:`~watcher.schedule.RenderStats`
when the daemon starts, so a restart does not start cold, and, on a store shared by replicas,
again every :data:`~watcher.schedule.RELOAD_SECONDS`, so every replica learns from the whole
fleet's renders. The schedule itself stays pure (:mod:`watcher.schedule`); when the daemon starts
and stops is :mod:`watcher.daemon`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from watcher import clock
from watcher.errors import StoreError
from watcher.models import Kind
from watcher.schedule import RELOAD_SECONDS, SAMPLE_SIZE, RenderStats

if TYPE_CHECKING:
    from watcher.store import Store


@dataclass(frozen=True, slots=True)
class RenderLearning:
    """Loads the latest render durations from ``store`` into ``stats``; see the module docstring."""

    store: Store
    stats: RenderStats
    stopping: asyncio.Event

    async def load(self) -> dict[str, int]:
        """Load the latest render durations of every kind from the store; how many per kind."""
        for kind in Kind:
            durations = await self.store.render_durations(kind, limit=SAMPLE_SIZE)
            self.stats.load(kind, durations)
        return {kind.value: self.stats.count(kind) for kind in Kind}

    async def run(self) -> None:
        """On a shared store, load again every ``RELOAD_SECONDS`` until the daemon stops (a
        store that does not answer is asked again next time); on a store one process works
        on, return at once: every duration it holds was learned here."""
        if self.store.is_exclusive:
            return
        while not self.stopping.is_set():
            await clock.wait(self.stopping, RELOAD_SECONDS)
            if not self.stopping.is_set():
                with contextlib.suppress(StoreError):
                    await self.load()
