"""The PostgreSQL connector: a pool of psycopg 3 async connections to one shared database.

Connections are in autocommit: a single statement commits alone, and the work of
:meth:`PostgresConnector.transaction` runs in one explicit transaction. Migrations
(``sql/postgres/migrations``) run at :meth:`PostgresConnector.open` under a transaction-scoped
advisory lock, recorded in ``schema_migrations``: replicas that start together migrate one after
the other, and all but the first find nothing to do.

A commit is durable once it returns (``synchronous_commit`` is on by default), so
:meth:`PostgresConnector.flush` has nothing to do. Every psycopg error becomes
:class:`StoreError` in :meth:`PostgresConnector.wrap_errors` (:class:`StoreUnavailable` when the
server does not answer for now: connection lost or refused, shutting down or starting up,
read-only after a failover, out of disk, no pooled connection within ``timeout``); neither
messages nor ``repr`` ever show the URL's password. The pool replaces broken connections by
itself (each is checked as it is handed out) and gives up a reconnection after ``timeout``, so
the next call tries afresh: the store works again within seconds of the server. A call's
statements get ``timeout`` too (a frozen server, or a host gone mid-failover, would otherwise
hold it forever). The connect timeout is libpq's: ``?connect_timeout=5`` in the URL sets it,
else ``timeout`` (at least 2 s).

Sessions that must outlive a call (a session-level advisory lock: :meth:`hold_session_lock`;
later ``LISTEN``) get a dedicated connection outside the pool, opened with :meth:`connect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import TypeVar
from urllib.parse import unquote

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from watcher.errors import StoreError, StoreUnavailable
from watcher.store.connector import Connector, Params, Work
from watcher.store.rows import Row
from watcher.store.sql import load_migrations, load_queries

T = TypeVar("T")
_Conn = AsyncConnection[DictRow]
_Q = load_queries("postgres")

# Key of the advisory lock held while migrating (the bytes of "WATCHER").
MIGRATION_LOCK_KEY = 0x57_41_54_43_48_45_52
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


class _Session:
    """The statements of one transaction on one pooled connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params, /) -> int:
        return (await self._conn.execute(sql, params)).rowcount

    async def executemany(self, sql: str, params: Iterable[Params], /) -> None:
        async with self._conn.cursor() as cursor:
            await cursor.executemany(sql, params)

    async def fetchone(self, sql: str, params: Params, /) -> Row | None:
        return await (await self._conn.execute(sql, params)).fetchone()

    async def fetchall(self, sql: str, params: Params, /) -> Sequence[Row]:
        rows: Sequence[Row] = await (await self._conn.execute(sql, params)).fetchall()
        return rows


class PostgresConnector(Connector):
    """A :class:`Connector` to a PostgreSQL database through a pool of ``min_size`` to
    ``max_size`` connections. It may be opened again after :meth:`close`."""

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
        # Dedicated sessions holding a session-level advisory lock (or trying for it), by key.
        self._lock_sessions: dict[int, tuple[_Conn, bool]] = {}
        self._locking = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._opening:
            if self._pool is not None:
                return
            with self.wrap_errors():
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

    async def connect(self, *, connect_timeout: bool = True) -> _Conn:
        """A new connection outside the pool (autocommit, rows by column name); errors are the
        caller's to wrap."""
        timeout = self._connect_timeout() if connect_timeout else {}
        return await _Conn.connect(
            self._url,
            autocommit=True,
            row_factory=dict_row,
            **timeout,  # type: ignore[arg-type]
        )

    async def _migrate(self) -> None:
        """Apply the migrations this database lacks, one replica at a time."""
        conn = await self.connect()
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
        for key in list(self._lock_sessions):
            await self._drop_lock_session(key)

    # --- errors ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def wrap_errors(self) -> Iterator[None]:
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

    # --- statements ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Conn]:
        """A pooled connection, within ``timeout``, its errors wrapped."""
        pool = self._pool
        if pool is None:
            raise StoreError("the store is not open")
        with self.wrap_errors():
            try:
                # A server that stopped answering (frozen, or its host gone in a failover) would
                # hold the call forever, in the pool's check of a connection or in a statement:
                # psycopg cancels the statement and closes the connection; the pool replaces it.
                async with asyncio.timeout(self.timeout), _pooled(pool) as conn:
                    yield conn
            except TimeoutError:
                raise StoreUnavailable(
                    f"PostgreSQL error on {self.display_url}: no answer within "
                    f"{self.timeout:g} s (WATCHER_STORE_TIMEOUT)"
                ) from None

    async def transaction(self, work: Work[T]) -> T:
        async with self._connection() as conn, conn.transaction():
            return await work(_Session(conn))

    async def execute(self, sql: str, params: Params, /) -> int:
        async with self._connection() as conn:
            return (await conn.execute(sql, params)).rowcount

    async def fetchall(self, sql: str, params: Params, /) -> Sequence[Row]:
        async with self._connection() as conn:
            rows: Sequence[Row] = await (await conn.execute(sql, params)).fetchall()
            return rows

    async def fetchone(self, sql: str, params: Params, /) -> Row | None:
        async with self._connection() as conn:
            return await (await conn.execute(sql, params)).fetchone()

    async def ping(self) -> None:
        await self.fetchone(_Q["ping"], {})

    async def flush(self) -> None:
        """Nothing to do: a PostgreSQL commit is durable when it returns."""

    def array(self, values: list[str]) -> object:
        return values  # psycopg adapts a list to an array

    # --- session-level advisory locks ------------------------------------------------------------

    async def hold_session_lock(self, key: int) -> bool:
        """Whether this process holds the session-level advisory lock ``key``, trying for it
        when it does not (one dedicated connection per key, kept open: the lock is freed when
        the holder's session ends, a process that dies included)."""
        async with self._locking:
            if self._pool is None:
                raise StoreError("the store is not open")
            with self.wrap_errors():
                try:
                    return await self._try_lock(key)
                except psycopg.OperationalError:  # the session was lost, and the lock with it
                    await self._drop_lock_session(key)
                    return await self._try_lock(key)

    async def _try_lock(self, key: int) -> bool:
        conn, held = self._lock_sessions.get(key, (None, False))
        if conn is None or conn.closed:
            conn, held = await self.connect(connect_timeout=False), False
            self._lock_sessions[key] = (conn, held)
        if held:
            await conn.execute(_Q["ping"])  # still connected: still the holder
            return True
        row = await (await conn.execute(_Q["try_session_lock"], {"key": key})).fetchone()
        held = bool(row and row["held"])
        self._lock_sessions[key] = (conn, held)
        return held

    async def _drop_lock_session(self, key: int) -> None:
        conn, _ = self._lock_sessions.pop(key, (None, False))
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
