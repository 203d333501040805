"""The SQLite connector: one file (or ``:memory:``), one connection, one dedicated thread.

Every statement runs on that thread (a :class:`~watcher.store.serial_thread.SerialThread`), so
the event loop never waits on the disk, and a transaction runs there whole, in one hop: the work
of :meth:`SQLiteConnector.transaction` is driven to its end on the thread (its session's methods
never suspend), so nothing else can run on the connection in the middle of it. Writes run in
``BEGIN IMMEDIATE`` transactions: the single writer takes the lock up front and waits for it up
to ``timeout`` (``busy_timeout``).

The database is in WAL mode with ``synchronous=NORMAL``: a commit survives the process being
killed (``kill -9``) at any instant; :meth:`SQLiteConnector.flush` checkpoints the WAL, which
fsyncs it, so what was committed also survives power loss.

With ``exclusive=True`` (a daemon) it takes an ``flock`` on the database file itself, so a
second daemon reaching the same file by any name (a symlink, a hard link, a bind mount) is
refused; other processes (``watcher track``, ``watcher status``) open the file without the lock,
and WAL lets them read and insert while the daemon runs.

Errors: a database that does not answer for now (busy past ``timeout`` because another process
holds the write lock, a full or read-only volume, an I/O error) raises :class:`StoreUnavailable`;
any other ``sqlite3`` error :class:`StoreError`. A database that cannot be opened for writing at
all says so in one line. Migrations (``sql/sqlite/migrations``) are counted in
``PRAGMA user_version``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from watcher.errors import StoreError, StoreLocked, StoreUnavailable
from watcher.store.connector import Connector, Params, Work
from watcher.store.rows import Row
from watcher.store.serial_thread import SerialThread
from watcher.store.sql import load_migrations

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
# Primary result codes of a database that does not answer for now, rather than of a bad query:
# BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL.
_UNAVAILABLE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15})
_CANNOT_WRITE_CODES = frozenset({8, 14})  # READONLY, CANTOPEN


def wrap_error(path: str, exc: sqlite3.Error) -> StoreError:
    """The project's error for a ``sqlite3`` one: :class:`StoreUnavailable` when worth retrying."""
    code = getattr(exc, "sqlite_errorcode", None)
    message = f"SQLite error on {path}: {exc}"
    if code is not None and code & 0xFF in _UNAVAILABLE_CODES:
        return StoreUnavailable(message)
    return StoreError(message)


class _Session:
    """The statements of one transaction, run at once on the connector's thread."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params, /) -> int:
        return self._conn.execute(sql, params).rowcount

    async def executemany(self, sql: str, params: Iterable[Params], /) -> None:
        self._conn.executemany(sql, params)

    async def fetchone(self, sql: str, params: Params, /) -> Row | None:
        row: Row | None = self._conn.execute(sql, params).fetchone()
        return row

    async def fetchall(self, sql: str, params: Params, /) -> Sequence[Row]:
        return self._conn.execute(sql, params).fetchall()


class SQLiteConnector(Connector):
    """A :class:`Connector` to one SQLite file, ``exclusive`` to this process or not."""

    def __init__(
        self, path: str, *, exclusive: bool = False, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.path = path
        self.exclusive = exclusive
        self.timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._thread: SerialThread | None = None
        self._lock_fd: int | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._thread is not None:
            return
        self._thread = SerialThread("sqlite-store")
        try:
            await self.call(self._open_sync)
        except BaseException:
            self._thread.stop()
            self._thread = None
            raise

    def _open_sync(self) -> None:
        memory = self.path == ":memory:"
        if not memory:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                if self.exclusive:
                    self._take_lock()
            except OSError as exc:
                raise StoreError(self._cannot_write(exc.strerror or str(exc))) from None
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {round(self.timeout * 1000):d}")
            if not memory:
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn, write=self.exclusive)
        except sqlite3.Error as exc:
            conn.close()
            self._close_sync()  # the lock, if taken
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _CANNOT_WRITE_CODES:
                raise StoreError(self._cannot_write(str(exc))) from None
            raise
        self._conn = conn

    def _cannot_write(self, reason: str) -> str:
        return (
            f"cannot open the database {self.path} for writing ({reason}): the daemon must be "
            "able to write the file and its folder (check WATCHER_DATABASE_URL, the volume's "
            "mount options and permissions)"
        )

    def _take_lock(self) -> None:
        # On the file's inode, which every name of it reaches (a lock file beside the path does
        # not: a hard link elsewhere names another). flock is apart from SQLite's POSIX locks,
        # but closing any descriptor of the file drops this process's POSIX locks on it
        # (sqlite.org/howtocorrupt.html, 2.2): it is opened before the connection and closed
        # after it, and a refused daemon closes it before it has one.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"another watcher daemon is using {self.path}; SQLite serves one daemon "
                "(use PostgreSQL for several replicas)"
            ) from None
        self._lock_fd = fd

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            await thread.run(self._close_sync)
        finally:
            thread.stop()

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- statements ------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        """Run ``fn(*args)`` on the connector's thread, its ``sqlite3`` errors wrapped."""
        if self._thread is None:
            raise StoreError("the store is not open")
        try:
            return await self._thread.run(fn, *args)
        except sqlite3.Error as exc:
            raise wrap_error(self.path, exc) from exc

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection (use it on the connector's thread only, through :meth:`call`)."""
        if self._conn is None:
            raise StoreError("the store is not open")
        return self._conn

    async def transaction(self, work: Work[T]) -> T:
        def run() -> T:
            with transaction(self.conn):
                return _run_to_end(work(_Session(self.conn)))

        return await self.call(run)

    async def execute(self, sql: str, params: Params, /) -> int:
        def run() -> int:
            with transaction(self.conn):
                return self.conn.execute(sql, params).rowcount

        return await self.call(run)

    async def fetchall(self, sql: str, params: Params, /) -> Sequence[Row]:
        return await self.call(lambda: self.conn.execute(sql, params).fetchall())

    async def fetchone(self, sql: str, params: Params, /) -> Row | None:
        row: Row | None = await self.call(lambda: self.conn.execute(sql, params).fetchone())
        return row

    async def ping(self) -> None:
        await self.call(lambda: self.conn.execute("SELECT 1").fetchone())

    async def flush(self) -> None:
        if self.path != ":memory:":
            await self.call(lambda: self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())

    def array(self, values: list[str]) -> object:
        return json.dumps(values)  # read with json_each()


def _run_to_end(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that awaits only a :class:`_Session` (which never suspends) in one step."""
    try:
        work.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    work.close()
    raise RuntimeError("SQLite work must await only its session")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception (the commit's too).

    SQLite may have rolled back already (a full disk, an I/O error), and a rollback may fail
    itself: the original error is the one raised, and a transaction still open from such a
    failure is rolled back before the next one begins, so one bad moment cannot wedge the
    connection."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection, *, write: bool) -> None:
    """Apply the migrations the file lacks. With ``write`` (a daemon), write the version even
    when nothing is new: a file the daemon cannot write fails here, clearly, rather than at its
    first piece of work."""
    with transaction(conn):
        (current,) = conn.execute("PRAGMA user_version").fetchone()
        for version, sql in load_migrations("sqlite"):
            if version > current:
                for statement in _split_statements(sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version:d}")
                current = version
        if write:
            conn.execute(f"PRAGMA user_version = {current:d}")


def _split_statements(sql: str) -> list[str]:
    """Split a migration into statements: comment lines dropped, then split at ``;`` (our
    migrations have none inside literals)."""
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in code.split(";") if s.strip()]
