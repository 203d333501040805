"""Notifications out: delivering the store's outbox to ``WATCHER_NOTIFY_URL``.

The daemon queues one event per project that reaches its final state, in the same transaction
as that state (see :meth:`watcher.store.Store.record_final`); this module only delivers them.
:class:`Notifier` runs as a side task of the daemon: it claims due notifications, POSTs each
body as it was stored, signed like Magic Hour's webhooks (:mod:`watcher.webhooks`, key
``WATCHER_NOTIFY_SECRET``), and records ``sent`` on a 2xx answer. Anything else (a refused
connection, a timeout, a non-2xx, a redirect) is retried after a jittered exponential backoff
capped at :data:`MAX_DELAY` seconds, for as long as it takes: the outbox is in the store, so a
restart delays a delivery but never drops it. Delivery is at least once; each event carries a
unique ``id`` for the receiver to drop duplicates.

On shutdown it makes one last pass over what is due, bounded by :data:`FINAL_PASS_SECONDS`, so
``watcher run --until-done`` announces its last projects without holding up the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
import structlog

from watcher import __version__, clock
from watcher.errors import ConfigError, StoreError, StoreUnavailable
from watcher.settings import configured
from watcher.webhooks import signed_headers

if TYPE_CHECKING:
    from watcher.control import Control
    from watcher.metrics import Metrics
    from watcher.settings import Settings
    from watcher.store import Notification, Store

log = structlog.get_logger("watcher")

POLL_SECONDS = 0.5
BATCH = 16
TIMEOUT_SECONDS = 10.0
LEASE_SECONDS = TIMEOUT_SECONDS + 5.0
BASE_DELAY = 2.0
MAX_DELAY = 600.0
FINAL_PASS_SECONDS = 5.0


def retry_delay(
    attempts: int, rng: random.Random, *, base: float = BASE_DELAY, cap: float = MAX_DELAY
) -> float:
    """Seconds before the next try of a notification that failed ``attempts`` times before this
    failure: ``base * 2**attempts`` capped at ``cap``, then between half and all of that."""
    ceiling = min(cap, base * 2.0 ** min(attempts, 32))
    return ceiling * (0.5 + 0.5 * rng.random())


def check_settings(settings: Settings) -> None:
    """Refuse (:class:`ConfigError`) a notification URL without a secret to sign with."""
    if settings.notify_url is not None and configured(settings.notify_secret) is None:
        raise ConfigError(
            "WATCHER_NOTIFY_SECRET: required when WATCHER_NOTIFY_URL is set (events are signed "
            "with it so the receiver can tell them from forgeries)"
        )


class Notifier:
    """Delivers the outbox; see the module docstring. Add :meth:`run` to ``side_tasks``."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
        poll_seconds: float = POLL_SECONDS,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self._secret = secret
        self._client = client
        self.rng = rng or random.Random()
        self.poll_seconds = poll_seconds
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> Notifier | None:
        """The notifier ``WATCHER_NOTIFY_URL`` asks for, or ``None`` if it is unset."""
        check_settings(settings)
        secret = configured(settings.notify_secret)
        if settings.notify_url is None or secret is None:
            return None
        return cls(str(settings.notify_url), secret)

    @contextlib.asynccontextmanager
    async def _http(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._client is not None:
            yield self._client
            return
        timeout = httpx.Timeout(self.timeout, connect=min(5.0, self.timeout))
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            yield client

    async def run(self, control: Control, store: Store, metrics: Metrics) -> None:
        """Deliver due notifications until cancelled, then make one bounded last pass.

        A batch runs as its own task, shielded from the cancellation: stopping while an event
        is being POSTed lets that delivery finish and be recorded (within the last pass's
        budget) instead of leaving the event claimed, and unsent, until its lease runs out."""
        async with self._http() as client:
            batch: asyncio.Task[int] | None = None
            try:
                while True:
                    # SIGHUP may have re-read WATCHER_NOTIFY_SECRET_FILE.
                    self._secret = configured(control.settings.notify_secret) or self._secret
                    if control.readiness().store_down:  # the daemon says when the store is back
                        await asyncio.sleep(self.poll_seconds)
                        continue
                    batch = asyncio.ensure_future(self.deliver_due(store, metrics, client))
                    try:
                        if await asyncio.shield(batch) == BATCH:
                            continue  # a full batch: there may be more due right now
                    except StoreUnavailable as exc:
                        control.store_failed(exc, during="notifications")
                    except StoreError as exc:
                        log.error("notification_store_error", error=str(exc))  # noqa: TRY400
                    await asyncio.sleep(self.poll_seconds)
            except asyncio.CancelledError:
                await self._last_pass(store, metrics, client, batch)
                raise

    async def _last_pass(
        self,
        store: Store,
        metrics: Metrics,
        client: httpx.AsyncClient,
        in_flight: asyncio.Task[int] | None,
    ) -> None:
        """Finish the batch in flight, then deliver what is due, batch after batch, for at
        most :data:`FINAL_PASS_SECONDS` (what is left stays in the outbox for the next run)."""
        try:
            async with asyncio.timeout(FINAL_PASS_SECONDS):
                if in_flight is not None and not in_flight.done():
                    with contextlib.suppress(StoreError):
                        await in_flight
                while await self.deliver_due(store, metrics, client) == BATCH:
                    pass
        except (TimeoutError, StoreError) as exc:
            log.warning("notification_last_pass_cut", error=str(exc) or type(exc).__name__)

    async def deliver_due(self, store: Store, metrics: Metrics, client: httpx.AsyncClient) -> int:
        """Claim and try every due notification (one batch); returns how many were claimed."""
        due = await store.claim_notifications(
            now=clock.now(), limit=BATCH, lease_seconds=LEASE_SECONDS
        )
        if due:
            async with asyncio.TaskGroup() as group:
                for notification in due:
                    group.create_task(self._deliver(store, metrics, client, notification))
        return len(due)

    async def _deliver(
        self, store: Store, metrics: Metrics, client: httpx.AsyncClient, n: Notification
    ) -> None:
        body = n.body.encode("utf-8")
        headers = {
            "content-type": "application/json",
            "user-agent": f"magic-hour-watcher/{__version__}",
            **signed_headers(self._secret, body, now=clock.now()),
        }
        started = clock.monotonic()
        status: int | None = None
        try:
            response = await client.post(self.url, content=body, headers=headers)
            status = response.status_code
            error = None if response.is_success else f"the receiver answered HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        elapsed_ms = round((clock.monotonic() - started) * 1000, 1)
        fields = {
            "notification_id": n.id,
            "project_id": n.project_id,
            "status_code": status,
            "attempt": n.attempts + 1,
            "elapsed_ms": elapsed_ms,
        }
        try:
            await self._record(store, metrics, n, error, fields)
        except StoreError as exc:  # the lease runs out and the delivery is tried again
            log.error("notification_store_error", error=str(exc), **fields)  # noqa: TRY400

    async def _record(
        self,
        store: Store,
        metrics: Metrics,
        n: Notification,
        error: str | None,
        fields: dict[str, object],
    ) -> None:
        now = clock.now()
        if error is None:
            await store.notification_sent(n.id, now=now)
            metrics.notifications.labels("sent").inc()
            log.info("notification_sent", **fields)
            return
        delay = retry_delay(n.attempts, self.rng, base=self.base_delay, cap=self.max_delay)
        await store.notification_failed(n.id, due_at=now + delay, error=error)
        metrics.notifications.labels("failed").inc()
        log.warning("notification_failed", **fields, error=error, retry_in=round(delay, 1))
