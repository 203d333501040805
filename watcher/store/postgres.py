"""The PostgreSQL store: one database shared by several daemon replicas.

Statements run on a pool of psycopg 3 async connections (autocommit; statements that must commit
together run in one explicit transaction). Replicas coordinate through the database alone:

- :meth:`PostgresStore.claim_due` locks the earliest due projects with ``FOR UPDATE SKIP LOCKED``
  through the partial index ``projects_due`` and leases them in the same statement, so two
  replicas never claim one project, and neither waits for the other.
- Every write that ends a piece of work is fenced by ``lease_version`` (:class:`LeaseLost`),
  drawn from one sequence so no version is ever issued twice.
- :meth:`PostgresStore.take_rate_tokens` keeps the fleet's API budget in one locked row.
- Migrations (``sql/postgres/migrations``) run at :meth:`PostgresStore.open` under a
  transaction-scoped advisory lock, recorded in ``schema_migrations``: replicas that start together
  migrate one after the other, and all but the first find nothing to do.

A commit is durable once it returns (``synchronous_commit`` is on by default), so
:meth:`PostgresStore.flush` has nothing to do. Every psycopg error becomes :class:`StoreError` in
:meth:`PostgresStore._wrap_errors` (:class:`StoreUnavailable` when the server does not answer
for now: connection lost or refused, shutting down or starting up, read-only after a failover,
out of disk, no pooled connection within ``timeout``); neither messages nor ``repr`` ever show
the URL's password. The pool replaces broken connections by itself (each is checked as it is
handed out) and gives up a reconnection after ``timeout``, so the next call tries afresh: the
store works again within seconds of the server. A call's statements get ``timeout`` too (a
frozen server, or a host gone mid-failover, would otherwise hold it forever). The connect
timeout is libpq's: ``?connect_timeout=5`` in the URL sets it, else ``timeout`` (at least 2 s).

It does not own the token bucket's caller (the API client) nor any decision about what to claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from watcher.errors import StoreError, StoreUnavailable
from watcher.models import Kind, ProjectRef, State
from watcher.store import transitions as t
from watcher.store.base import (
    Claim,
    LeaseLost,
    NewOutput,
    Notification,
    NotificationBuilder,
    OutputRecord,
    ProjectPage,
    ProjectRecord,
    TrackResult,
    group_outputs,
)
from watcher.store.rows import (
    notification_from_row,
    output_from_row,
    project_changes,
    project_from_row,
)
from watcher.store.sql import load_migrations, load_queries
from watcher.store.writes import TransitionWrites

_Q = load_queries("postgres")
_Conn = AsyncConnection[DictRow]

# Key of the advisory lock held while migrating (the bytes of "WATCHER").
MIGRATION_LOCK_KEY = 0x57_41_54_43_48_45_52
# Key of the advisory lock whose holder reports the fleet-wide gauges (the bytes of "WGAUGES").
REPORTER_LOCK_KEY = 0x57_47_41_55_47_45_53
# The one token bucket of the API budget.
RATE_BUCKET = "api"
_POOL_OPEN_TIMEOUT = 30.0
DEFAULT_TIMEOUT = 10.0
# SQLSTATE classes of a server that does not answer for now rather than of a bad statement:
# connection exception, insufficient resources (disk full), operator intervention (shutdown).
_UNAVAILABLE_CLASSES = ("08", "53", "57")
_READ_ONLY_TRANSACTION = "25006"  # a standby promoted late, or a primary demoted in a failover
# libpq URL: scheme://user:password@hosts/…; the password runs to the last "@" of the authority.
_USERINFO_RE = re.compile(r"^(?P<head>[^:/?#]+://[^:@/?#]*):(?P<password>[^/?#]*)@")
_QUERY_PASSWORD_RE = re.compile(r"(?P<head>[?&]password=)(?P<password>[^&#]*)", re.IGNORECASE)
_HIDDEN = "***"


def redact_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` parameter) hidden."""
    url = _USERINFO_RE.sub(lambda m: f"{m['head']}:{_HIDDEN}@", url, count=1)
    return _QUERY_PASSWORD_RE.sub(lambda m: f"{m['head']}{_HIDDEN}", url)


def _url_secrets(url: str) -> list[str]:
    """The password(s) of ``url`` as written and as decoded, longest first."""
    found = [m["password"] for m in (_USERINFO_RE.match(url),) if m]
    found += [m["password"] for m in _QUERY_PASSWORD_RE.finditer(url)]
    forms = {form for raw in found for form in (raw, unquote(raw)) if form}
    return sorted(forms, key=len, reverse=True)


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


def _unavailable(exc: psycopg.Error) -> bool:
    """Whether ``exc`` says the server does not answer for now (worth retrying)."""
    state = exc.sqlstate or ""
    return (
        isinstance(exc, psycopg.OperationalError)
        or state.startswith(_UNAVAILABLE_CLASSES)
        or state == _READ_ONLY_TRANSACTION
    )


@contextlib.asynccontextmanager
async def _pooled(pool: AsyncConnectionPool[_Conn]) -> AsyncIterator[_Conn]:
    """``pool.connection()``, except that a cancellation is never lost on the way in.

    psycopg_pool's ``getconn`` can return a connection although the task was cancelled while it
    checked that connection, swallowing the ``CancelledError``: the caller then runs on, and a
    loop that is only ever stopped by cancellation (the notifier) never stops, so ``watcher run``
    hung at shutdown. A cancellation requested during ``getconn`` is raised here instead.
    """
    task = asyncio.current_task()
    before = 0 if task is None else task.cancelling()
    async with pool.connection() as conn:
        if task is not None and task.cancelling() > before:
            raise asyncio.CancelledError
        yield conn


class PostgresStore(TransitionWrites):
    """A :class:`Store` in a PostgreSQL database, for any number of replicas.

    Unopened after construction; :meth:`open` migrates and fills the pool; :meth:`close` empties
    it (the store may be opened again).
    """

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size} and {max_size}")
        self._url = url
        self.display_url = redact_url(url)
        self._secrets = _url_secrets(url)
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        self._pool: AsyncConnectionPool[_Conn] | None = None
        self._opening = asyncio.Lock()
        # The connection holding (or trying for) the reporter lock, outside the pool: the lock
        # lives as long as this session.
        self._reporter: _Conn | None = None
        self._reports = False
        self._reporting = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PostgresStore({self.display_url!r})"

    @property
    def is_exclusive(self) -> bool:
        return False

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._opening:
            if self._pool is not None:
                return
            with self._wrap_errors():
                await self._migrate()
                pool = AsyncConnectionPool(
                    self._url,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    open=False,
                    name="watcher-store",
                    timeout=self.timeout,
                    # The pool's own reconnection backs off to minutes; give up on it after a
                    # call's timeout instead, so that the next call (the daemon's probe, every
                    # few seconds) starts afresh and finds a server that is back at once.
                    reconnect_timeout=self.timeout,
                    connection_class=_Conn,
                    kwargs={"autocommit": True, "row_factory": dict_row, **self._connect_timeout()},
                    check=AsyncConnectionPool.check_connection,
                )
                try:
                    await pool.open(wait=True, timeout=_POOL_OPEN_TIMEOUT)
                except BaseException:
                    await pool.close()
                    raise
            self._pool = pool

    def _connect_timeout(self) -> dict[str, str]:
        """libpq's ``connect_timeout`` from ``timeout`` unless the URL sets its own: without one,
        a connection to a host that vanished waits for the kernel to give up (minutes)."""
        try:
            given = conninfo_to_dict(self._url)
        except psycopg.Error:
            return {}
        if "connect_timeout" in given:
            return {}
        return {"connect_timeout": str(max(2, math.ceil(self.timeout)))}

    async def _migrate(self) -> None:
        """Apply the migrations this database lacks, one replica at a time."""
        conn = await _Conn.connect(
            self._url,
            autocommit=True,
            row_factory=dict_row,
            **self._connect_timeout(),  # type: ignore[arg-type]
        )
        async with conn, conn.transaction():
            await conn.execute(_Q["lock_migrations"], {"key": MIGRATION_LOCK_KEY})
            await conn.execute(_Q["create_schema_migrations"])
            row = await (await conn.execute(_Q["schema_version"])).fetchone()
            current = row["version"] if row else 0
            for version, sql in load_migrations("postgres"):
                if version > current:
                    await conn.execute(sql)
                    await conn.execute(_Q["record_migration"], {"version": version})

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        await self._drop_reporter()

    @contextlib.contextmanager
    def _wrap_errors(self) -> Iterator[None]:
        """Turn psycopg's errors into :class:`StoreError`, with any password scrubbed out.

        When the driver's message held the password (libpq quotes a malformed URL back), the
        original exception is not chained, so no traceback can show it.
        """
        try:
            yield
        except psycopg.Error as exc:
            original = str(exc).strip()
            message = self._scrub(original)
            kind = StoreUnavailable if _unavailable(exc) else StoreError
            error = kind(f"PostgreSQL error on {self.display_url}: {message}")
            if message != original:
                raise error from None
            raise error from exc

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _HIDDEN)
        return text

    @contextlib.asynccontextmanager
    async def _connection(self, *, transaction: bool = False) -> AsyncIterator[_Conn]:
        """A pooled connection; with ``transaction``, its statements commit together or not at
        all (an exception rolls them back)."""
        pool = self._pool
        if pool is None:
            raise StoreError("the store is not open")
        with self._wrap_errors():
            try:
                # A server that stopped answering (frozen, or its host gone in a failover) would
                # hold the call forever, in the pool's check of a connection or in a statement:
                # psycopg cancels the statement and closes the connection; the pool replaces it.
                async with asyncio.timeout(self.timeout), _pooled(pool) as conn:
                    if not transaction:
                        yield conn
                        return
                    async with conn.transaction():
                        yield conn
            except TimeoutError:
                raise StoreUnavailable(
                    f"PostgreSQL error on {self.display_url}: no answer within "
                    f"{self.timeout:g} s (WATCHER_STORE_TIMEOUT)"
                ) from None

    async def _all(self, query: str, **params: object) -> list[DictRow]:
        async with self._connection() as conn:
            return await (await conn.execute(_Q[query], params)).fetchall()

    async def _one(self, query: str, **params: object) -> DictRow | None:
        async with self._connection() as conn:
            return await (await conn.execute(_Q[query], params)).fetchone()

    async def _count(self, query: str, **params: object) -> int:
        """Run a write; return how many rows it touched."""
        async with self._connection() as conn:
            return (await conn.execute(_Q[query], params)).rowcount

    async def ping(self) -> None:
        await self._one("ping")

    # --- tracking -------------------------------------------------------------------------------

    async def track(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> TrackResult:
        rows = await self._all(
            "insert_projects",
            ids=[ref.id for ref in refs],
            kinds=[ref.kind.value for ref in refs],
            delete_after_download=delete_after_download,
            now=now,
        )
        new = {row["id"] for row in rows}
        result = TrackResult()
        for ref in refs:
            if ref.id in new:
                new.discard(ref.id)  # a repeated id is new once, then already tracked
                result.added.append(ref.id)
            else:
                result.existing.append(ref.id)
        return result

    async def revive(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> list[str]:
        rows = await self._all(
            "revive_projects",
            ids=[ref.id for ref in refs],
            kinds=[ref.kind.value for ref in refs],
            delete_after_download=delete_after_download,
            now=now,
        )
        revived = {row["id"] for row in rows}
        return [pid for pid in dict.fromkeys(ref.id for ref in refs) if pid in revived]

    async def untrack(self, project_id: str) -> bool:
        return await self._count("delete_project", id=project_id) == 1

    async def get(self, project_id: str) -> ProjectRecord | None:
        row = await self._one("get_project", id=project_id)
        return project_from_row(row) if row is not None else None

    async def list_projects(
        self, *, state: State | None = None, limit: int = 100, cursor: str | None = None
    ) -> ProjectPage:
        rows = await self._all(
            "list_projects", state=state.value if state else None, cursor=cursor, limit=limit + 1
        )
        projects = [project_from_row(r) for r in rows[:limit]]
        return ProjectPage(projects, projects[-1].id if len(rows) > limit else None)

    async def count_by_state(self) -> dict[State, int]:
        return {State(r["state"]): r["n"] for r in await self._all("count_by_state")}

    async def outputs(self, project_id: str) -> list[OutputRecord]:
        return [output_from_row(r) for r in await self._all("outputs", project_id=project_id)]

    async def note_active(self, failure: str, *, now: float) -> int:
        return await self._count("note_active", failure=failure, now=now)

    async def outputs_of(self, project_ids: list[str]) -> dict[str, list[OutputRecord]]:
        rows = await self._all("outputs_of", ids=project_ids)
        return group_outputs(project_ids, map(output_from_row, rows))

    # --- scheduling -----------------------------------------------------------------------------

    async def claim_due(
        self, *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> list[Claim]:
        rows = await self._all(
            "claim_due", now=now, limit=limit, owner=owner, until=now + lease_seconds
        )
        return [Claim(record, record.lease_version) for record in map(project_from_row, rows)]

    async def render_durations(self, kind: Kind, *, limit: int) -> list[float]:
        rows = await self._all("render_durations", kind=kind.value, limit=limit)
        return [r["seconds"] for r in reversed(rows)]

    async def next_due_at(self) -> float | None:
        row = await self._one("next_due_at")
        return None if row is None else row["due_at"]

    async def release_leases(self, *, now: float, owner: str | None = None) -> int:
        return await self._count("release_leases", now=now, owner=owner)

    async def renew(self, claim: Claim, *, now: float, lease_seconds: float) -> bool:
        touched = await self._count(
            "renew", id=claim.id, version=claim.version, until=now + lease_seconds
        )
        return touched == 1

    async def expedite(self, project_id: str, *, now: float) -> bool:
        async with self._connection(transaction=True) as conn:
            await conn.execute(_Q["expedite"], {"id": project_id, "now": now})
            active = await (await conn.execute(_Q["is_active"], {"id": project_id})).fetchone()
        return active is not None

    # --- fenced writes: a transition read, computed and written in one transaction ----------

    @staticmethod
    async def _claimed(conn: _Conn, claim: Claim) -> ProjectRecord:
        """The claimed project's row, locked, or :class:`LeaseLost` if the claim is stale."""
        params = {"id": claim.id, "version": claim.version}
        row = await (await conn.execute(_Q["fenced_project"], params)).fetchone()
        if row is None:
            raise LeaseLost(f"lease on project {claim.id} was lost")
        return project_from_row(row)

    async def _change(
        self, conn: _Conn, claim: Claim, change: Callable[[ProjectRecord], ProjectRecord]
    ) -> None:
        """Write ``change`` of the claimed project (inside a transaction)."""
        after = change(await self._claimed(conn, claim))
        await conn.execute(_Q["write_project"], project_changes(after))

    async def _apply(self, claim: Claim, change: Callable[[ProjectRecord], ProjectRecord]) -> None:
        async with self._connection(transaction=True) as conn:
            await self._change(conn, claim, change)

    async def _finish(
        self,
        claim: Claim,
        change: Callable[[ProjectRecord], ProjectRecord],
        *,
        now: float,
        notify: NotificationBuilder | None,
    ) -> None:
        """Write ``change`` of the project (refused unless every output is saved where its new
        state needs it) and queue the event ``notify`` builds from the row as written, in one
        transaction."""
        async with self._connection(transaction=True) as conn:
            after = change(await self._claimed(conn, claim))
            rows = await (await conn.execute(_Q["outputs"], {"project_id": claim.id})).fetchall()
            outputs = [output_from_row(r) for r in rows]
            t.require_saved(claim.id, after.state, outputs)
            await conn.execute(_Q["write_project"], project_changes(after))
            if notify is None:
                return
            row = await (await conn.execute(_Q["get_project"], {"id": claim.id})).fetchone()
            if row is None:  # pragma: no cover - the fenced write above found it
                raise LeaseLost(f"project {claim.id} vanished")
            body = notify(project_from_row(row), outputs)
            await conn.execute(
                _Q["enqueue_notification"], {"project_id": claim.id, "body": body, "now": now}
            )

    async def record_complete(
        self, claim: Claim, *, now: float, due_at: float, outputs: list[NewOutput]
    ) -> list[OutputRecord]:
        async with self._connection(transaction=True) as conn:
            await self._change(conn, claim, lambda p: t.completed(p, now=now, due_at=due_at))
            for new in outputs:
                await conn.execute(
                    _Q["upsert_output"],
                    {
                        "project_id": claim.id,
                        "idx": new.index,
                        "url": new.url,
                        "expires_at": new.expires_at,
                        "path": new.path,
                    },
                )
            rows = await (await conn.execute(_Q["outputs"], {"project_id": claim.id})).fetchall()
        return [output_from_row(r) for r in rows]

    async def _output_write(
        self, query: str, claim: Claim, *, progress: bool = False, **params: object
    ) -> None:
        async with self._connection(transaction=True) as conn:
            await self._claimed(conn, claim)
            await conn.execute(_Q[query], {"project_id": claim.id, **params})
            if progress:
                await self._change(conn, claim, t.progressed)

    async def record_output_verified(
        self, claim: Claim, *, index: int, size: int, sha256: str
    ) -> None:
        await self._output_write("output_verified", claim, idx=index, bytes=size, sha256=sha256)

    async def record_output_saved(self, claim: Claim, *, index: int, now: float) -> None:
        await self._output_write("output_saved", claim, progress=True, idx=index, now=now)

    async def reset_output(self, claim: Claim, *, index: int) -> None:
        await self._output_write("reset_output", claim, idx=index)

    async def claim_notifications(
        self, *, now: float, limit: int, lease_seconds: float
    ) -> list[Notification]:
        rows = await self._all(
            "claim_notifications", now=now, limit=limit, until=now + lease_seconds
        )
        return [notification_from_row(r) for r in rows]

    async def notification_sent(self, notification_id: int, *, now: float) -> None:
        await self._count("notification_sent", id=notification_id, now=now)

    async def notification_failed(self, notification_id: int, *, due_at: float, error: str) -> None:
        await self._count("notification_failed", id=notification_id, due_at=due_at, error=error)

    async def flush(self) -> None:
        """Nothing to do: a PostgreSQL commit is durable when it returns."""

    # --- the fleet's request budget -------------------------------------------------------------

    @property
    def shares_rate_budget(self) -> bool:
        return True

    async def take_rate_tokens(self, *, now: float, rate: float, burst: float, want: int) -> int:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate} and {burst}")
        if want <= 0:
            return 0
        params: dict[str, Any] = {"name": RATE_BUCKET, "burst": burst, "now": now}
        async with self._connection(transaction=True) as conn:
            await conn.execute(_Q["ensure_rate_bucket"], params)
            row = await (await conn.execute(_Q["lock_rate_bucket"], params)).fetchone()
            if row is None:  # pragma: no cover - the row was inserted above in this transaction
                raise StoreError("the rate budget row is missing")
            granted, tokens, at = take_from_bucket(
                row["tokens"], row["updated_at"], now=now, rate=rate, burst=burst, want=want
            )
            await conn.execute(
                _Q["update_rate_bucket"], {"name": RATE_BUCKET, "tokens": tokens, "updated_at": at}
            )
        return granted

    # --- the fleet's gauges --------------------------------------------------------------------

    async def reports_fleet_gauges(self) -> bool:
        """Whether this replica holds the reporter lock, trying for it when it does not (one
        dedicated connection, kept open: the lock is freed when the holder's session ends)."""
        async with self._reporting:
            if self._pool is None:
                raise StoreError("the store is not open")
            with self._wrap_errors():
                try:
                    return await self._try_reporter()
                except psycopg.OperationalError:  # the session was lost, and the lock with it
                    await self._drop_reporter()
                    return await self._try_reporter()

    async def _try_reporter(self) -> bool:
        if self._reporter is None or self._reporter.closed:
            self._reporter = await _Conn.connect(self._url, autocommit=True, row_factory=dict_row)
            self._reports = False
        if self._reports:
            await self._reporter.execute(_Q["ping"])  # still connected: still the holder
            return True
        row = await (
            await self._reporter.execute(_Q["try_reporter_lock"], {"key": REPORTER_LOCK_KEY})
        ).fetchone()
        self._reports = bool(row and row["held"])
        return self._reports

    async def _drop_reporter(self) -> None:
        conn, self._reporter, self._reports = self._reporter, None, False
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
