"""The control interface: what the HTTP app and the notifier may ask of the running daemon.

:class:`Control` is narrow on purpose. The control plane tracks and untracks projects, hands a
verified webhook's payload over (or makes the project due now when the payload lacks what a GET
gives), and reads the facts readiness reports, one :class:`Readiness` at a time; the notifier
reads the secret in force and whether the store is down, and says when it failed. Neither sees
the dispatcher, the workflow or the API client, and neither decides anything about scheduling:
"poll once more when the GET in flight ends" is :meth:`Control.expedite`'s, not the webhook
handler's. :class:`watcher.daemon.Daemon` implements it; a test may hand either side a fake.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from watcher.errors import StoreError
    from watcher.models import Kind, ProjectRef, ProjectSnapshot
    from watcher.settings import Settings
    from watcher.store import ProjectRecord


@dataclass(frozen=True, slots=True)
class Readiness:
    """What ``/readyz`` and the gauges report of the running daemon, read at one moment."""

    unauthorized: bool  # the API refused the token (polling is stopped)
    payment_required: bool  # the API answered 402 (polling is paused)
    store_problem: str | None  # what readiness says while the store does not answer
    store_down: bool  # a store outage is under way (the daemon says when it is over)
    rate_limit_paused: float  # seconds every API call still waits after a 429 (0 when none)


class Control(Protocol):
    """The running daemon, as the HTTP app and the notifier see it."""

    @property
    def settings(self) -> Settings:
        """The settings in force (SIGHUP re-reads the ``*_FILE`` secrets: read at each use)."""
        ...

    @property
    def stopping(self) -> bool:
        """Whether shutdown has begun."""
        ...

    def readiness(self) -> Readiness:
        """The facts readiness reports, as they are now."""
        ...

    async def track(
        self, refs: Iterable[ProjectRef], *, delete_after_download: bool, revive: bool = False
    ) -> list[str]:
        """Track ``refs`` (idempotent; ``revive`` starts ``not_found`` ones over); the ids that
        were new or revived."""
        ...

    async def untrack(self, project_id: str) -> bool:
        """Forget the project (nothing is deleted remotely); whether it was tracked."""
        ...

    def heard(self, kind: Kind) -> None:
        """A verified event about a project of ``kind`` arrived: while they do, polling of
        that kind relaxes to ``WATCHER_WEBHOOK_FALLBACK_POLL``."""
        ...

    async def announce(
        self, record: ProjectRecord, snapshot: ProjectSnapshot
    ) -> tuple[str, str | None]:
        """Act on a verified event's payload about the ``polling`` project of ``record`` as on
        a GET's answer; the webhook's (action, note)."""
        ...

    async def expedite(self, record: ProjectRecord) -> bool:
        """Make the active project of ``record`` due now; ``True`` when a poll of it is in
        flight, so that one more poll follows as soon as that work releases it."""
        ...

    def store_failed(self, exc: StoreError, *, during: str) -> None:
        """A store call failed (the outage begins, or goes on)."""
        ...
