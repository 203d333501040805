"""The PostgreSQL store: one database shared by several daemon replicas.

:class:`PostgresStore` is the :class:`~watcher.store.sql_store.SqlStore` over a
:class:`~watcher.store.postgres_connector.PostgresConnector` (a psycopg 3 pool; its module says
how errors, timeouts, outages and migrations are handled). Replicas coordinate through the
database alone, and this module holds what only a shared database does:

- :meth:`PostgresStore.claim_due` locks the earliest due projects with ``FOR UPDATE SKIP LOCKED``
  through the partial index ``projects_due`` and leases them in the same statement, so two
  replicas never claim one project, and neither waits for the other (notifications alike).
- Every write that ends a piece of work is fenced by ``lease_version`` (:class:`LeaseLost`),
  drawn from one sequence so no version is ever issued twice.
- :meth:`PostgresStore.take_rate_tokens` keeps the fleet's API budget in one locked row.
- :meth:`PostgresStore.reports_fleet_gauges` lets one replica at a time report the gauges, by a
  session-level advisory lock.
- :meth:`PostgresStore.liveness` is a replica's proof of life (a session-level advisory lock on
  a connection of its own, :mod:`watcher.store.postgres_liveness`), and
  :meth:`PostgresStore.expire_dead_leases` makes the leases of a replica whose lock is free (its
  session ended while the server ran on: it died) due at once, for the next claim to take over.
- A write that makes work due (tracking, reviving, expediting, releasing leases) notifies
  ``watcher_due`` in its own transaction, which wakes every replica that listens.

It does not own the token bucket's caller (the API client) nor any decision about what to claim.
"""

from __future__ import annotations

import math
from typing import Any

from watcher.errors import StoreError
from watcher.store.connector import Session
from watcher.store.postgres_connector import DEFAULT_TIMEOUT, PostgresConnector, redact_url
from watcher.store.postgres_liveness import LIVENESS_LOCK_CLASS, PostgresLiveness
from watcher.store.records import Claim, Notification
from watcher.store.rows import notification_from_row, project_from_row
from watcher.store.sql import load_queries
from watcher.store.sql_store import SqlStore

__all__ = ["DEFAULT_TIMEOUT", "PostgresStore", "redact_url", "take_from_bucket"]

_Q = load_queries("postgres")

# Key of the advisory lock whose holder reports the fleet-wide gauges (the bytes of "WGAUGES").
REPORTER_LOCK_KEY = 0x57_47_41_55_47_45_53
# The one token bucket of the API budget.
RATE_BUCKET = "api"


def take_from_bucket(
    tokens: float, updated_at: float, *, now: float, rate: float, burst: float, want: int
) -> tuple[int, float, float]:
    """Refill a token bucket to ``now`` and take up to ``want`` whole tokens.

    Returns ``(granted, tokens_left, updated_at)``. Time never runs backwards in the bucket: a
    replica whose clock lags behind the last update refills nothing.
    """
    at = max(now, updated_at)
    available = min(burst, tokens + (at - updated_at) * rate)
    granted = max(0, min(want, math.floor(available + 1e-9)))
    return granted, available - granted, at


class PostgresStore(SqlStore[PostgresConnector]):
    """A :class:`Store` in a PostgreSQL database, for any number of replicas.

    Unopened after construction; :meth:`open` migrates and fills the pool; :meth:`close` empties
    it (the store may be opened again).
    """

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        connector = PostgresConnector(url, min_size=min_size, max_size=max_size, timeout=timeout)
        super().__init__(connector, _Q)
        self.display_url = connector.display_url
        self.min_size = min_size
        self.max_size = max_size

    def __repr__(self) -> str:
        return f"PostgresStore({self.display_url!r})"

    # --- claiming: one statement each, skipping rows another replica is claiming ---------------

    async def claim_due(
        self, *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> list[Claim]:
        params = {"now": now, "limit": limit, "owner": owner, "until": now + lease_seconds}
        rows = await self.connector.fetchall(_Q["claim_due"], params)
        return [Claim(record, record.lease_version) for record in map(project_from_row, rows)]

    async def claim_notifications(
        self, *, now: float, limit: int, lease_seconds: float
    ) -> list[Notification]:
        params = {"now": now, "limit": limit, "until": now + lease_seconds}
        rows = await self.connector.fetchall(_Q["claim_notifications"], params)
        return [notification_from_row(r) for r in rows]

    # --- liveness: a dead replica's leases taken over at once; wake-ups -----------------------

    def liveness(self, owner: str) -> PostgresLiveness:
        return PostgresLiveness(self.connector, owner)

    async def expire_dead_leases(self, *, now: float) -> dict[str, str]:
        async def work(s: Session) -> dict[str, str]:
            params = {"class": LIVENESS_LOCK_CLASS, "now": now}
            rows = await s.fetchall(_Q["expire_dead_leases"], params)
            if rows:
                await self._announce_due(s)
            return {row["id"]: row["lease_owner"] for row in rows}

        return await self.connector.transaction(work)

    async def _announce_due(self, s: Session) -> None:
        await s.execute(_Q["announce_due"], {})

    # --- the fleet's request budget -------------------------------------------------------------

    @property
    def shares_rate_budget(self) -> bool:
        return True

    async def take_rate_tokens(self, *, now: float, rate: float, burst: float, want: int) -> int:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate} and {burst}")
        if want <= 0:
            return 0

        async def work(s: Session) -> int:
            params: dict[str, Any] = {"name": RATE_BUCKET, "burst": burst, "now": now}
            await s.execute(_Q["ensure_rate_bucket"], params)
            row = await s.fetchone(_Q["lock_rate_bucket"], params)
            if row is None:  # pragma: no cover - the row was inserted above in this transaction
                raise StoreError("the rate budget row is missing")
            granted, tokens, at = take_from_bucket(
                row["tokens"], row["updated_at"], now=now, rate=rate, burst=burst, want=want
            )
            params = {"name": RATE_BUCKET, "tokens": tokens, "updated_at": at}
            await s.execute(_Q["update_rate_bucket"], params)
            return granted

        return await self.connector.transaction(work)

    # --- the fleet's gauges --------------------------------------------------------------------

    async def reports_fleet_gauges(self) -> bool:
        """Whether this replica holds the reporter lock, trying for it when it does not (the
        lock is freed when the holder's session ends)."""
        return await self.connector.hold_session_lock(REPORTER_LOCK_KEY)
