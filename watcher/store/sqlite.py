"""The SQLite store: the embedded default, for one daemon process.

All statements run on one dedicated thread with one connection, so the event loop never waits on
the disk. The database is in WAL mode with ``synchronous=NORMAL``: a commit survives the process
being killed (``kill -9``) at any instant; :meth:`SQLiteStore.flush` checkpoints the WAL, which
fsyncs it, so what was committed also survives power loss. The daemon flushes before every
DELETE it sends.

A daemon opens the store with ``exclusive=True``: it takes an ``flock`` on ``<db>.lock`` next to
the real file (symlinks resolved, so a link to the same database cannot start a second daemon),
so two daemons can never share one SQLite file (run PostgreSQL for several replicas). Other
processes (``watcher track``, ``watcher status``) open it without the lock; WAL lets them read
and insert while the daemon runs.

Errors: a database that does not answer for now (busy past ``timeout`` because another process
holds the write lock, a full or read-only volume, an I/O error) raises :class:`StoreUnavailable`;
any other ``sqlite3`` error :class:`StoreError`. A database that cannot be opened for writing at
all says so in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from watcher.errors import StoreError, StoreLocked, StoreUnavailable
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

T = TypeVar("T")

_Q = load_queries("sqlite")
DEFAULT_TIMEOUT = 10.0
# Primary result codes of a database that does not answer for now, rather than of a bad query:
# BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL.
_UNAVAILABLE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15})


def _wrap(path: str, exc: sqlite3.Error) -> StoreError:
    """The project's error for a ``sqlite3`` one: :class:`StoreUnavailable` when worth retrying."""
    code = getattr(exc, "sqlite_errorcode", None)
    message = f"SQLite error on {path}: {exc}"
    if code is not None and code & 0xFF in _UNAVAILABLE_CODES:
        return StoreUnavailable(message)
    return StoreError(message)


class SQLiteStore(TransitionWrites):
    """A :class:`Store` in one SQLite file (or ``:memory:``)."""

    def __init__(
        self, path: str, *, exclusive: bool = False, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.path = path
        self.exclusive = exclusive
        self.timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @property
    def is_exclusive(self) -> bool:
        return self.exclusive

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
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
            self._migrate(conn, write=self.exclusive)
        except sqlite3.Error as exc:
            conn.close()
            self._close_sync()  # the lock, if taken
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in {8, 14}:  # READONLY, CANTOPEN
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
        # The real file's lock: a symlink (or a path through a symlinked folder) to a database a
        # daemon already serves must meet the same lock.
        fd = os.open(os.path.realpath(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"another watcher daemon is using {self.path}; SQLite serves one daemon "
                "(use PostgreSQL for several replicas)"
            ) from None
        self._lock_fd = fd

    @staticmethod
    def _migrate(conn: sqlite3.Connection, *, write: bool) -> None:
        """Apply the migrations the file lacks. With ``write`` (a daemon), write the version
        even when nothing is new: a file the daemon cannot write fails here, clearly, rather
        than at its first piece of work."""
        with _transaction(conn):
            (current,) = conn.execute("PRAGMA user_version").fetchone()
            for version, sql in load_migrations("sqlite"):
                if version > current:
                    for statement in _split_statements(sql):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {version:d}")
                    current = version
            if write:
                conn.execute(f"PRAGMA user_version = {current:d}")

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        if self._executor is None:
            raise StoreError("the store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise _wrap(self.path, exc) from exc

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the store is not open")
        return self._conn

    def _all(self, query: str, **params: object) -> list[sqlite3.Row]:
        return self._db.execute(_Q[query], params).fetchall()

    def _one(self, query: str, **params: object) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(_Q[query], params).fetchone()
        return row

    async def ping(self) -> None:
        await self._run(lambda: self._db.execute("SELECT 1").fetchone())

    # --- tracking -------------------------------------------------------------------------------

    async def track(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> TrackResult:
        def work() -> TrackResult:
            result = TrackResult()
            with _transaction(self._db):
                for ref in refs:
                    cursor = self._db.execute(
                        _Q["insert_project"],
                        {
                            "id": ref.id,
                            "kind": ref.kind.value,
                            "delete_after_download": int(delete_after_download),
                            "now": now,
                        },
                    )
                    (result.added if cursor.rowcount == 1 else result.existing).append(ref.id)
            return result

        return await self._run(work)

    async def revive(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> list[str]:
        def work() -> list[str]:
            revived: list[str] = []
            with _transaction(self._db):
                for ref in refs:
                    cursor = self._db.execute(
                        _Q["revive_project"],
                        {
                            "id": ref.id,
                            "kind": ref.kind.value,
                            "delete_after_download": int(delete_after_download),
                            "now": now,
                        },
                    )
                    if cursor.rowcount == 1:
                        revived.append(ref.id)
            return revived

        return await self._run(work)

    async def untrack(self, project_id: str) -> bool:
        def work() -> bool:
            with _transaction(self._db):
                return self._db.execute(_Q["delete_project"], {"id": project_id}).rowcount == 1

        return await self._run(work)

    async def get(self, project_id: str) -> ProjectRecord | None:
        row = await self._run(lambda: self._one("get_project", id=project_id))
        return project_from_row(row) if row is not None else None

    async def list_projects(
        self, *, state: State | None = None, limit: int = 100, cursor: str | None = None
    ) -> ProjectPage:
        rows = await self._run(
            lambda: self._all(
                "list_projects",
                state=state.value if state else None,
                cursor=cursor,
                limit=limit + 1,
            )
        )
        projects = [project_from_row(r) for r in rows[:limit]]
        return ProjectPage(projects, projects[-1].id if len(rows) > limit else None)

    async def count_by_state(self) -> dict[State, int]:
        rows = await self._run(lambda: self._all("count_by_state"))
        return {State(r["state"]): r["n"] for r in rows}

    async def outputs(self, project_id: str) -> list[OutputRecord]:
        rows = await self._run(lambda: self._all("outputs", project_id=project_id))
        return [output_from_row(r) for r in rows]

    async def note_active(self, failure: str, *, now: float) -> int:
        def work() -> int:
            with _transaction(self._db):
                cursor = self._db.execute(_Q["note_active"], {"failure": failure, "now": now})
                return cursor.rowcount

        return await self._run(work)

    async def outputs_of(self, project_ids: list[str]) -> dict[str, list[OutputRecord]]:
        rows = await self._run(lambda: self._all("outputs_of", ids=json.dumps(project_ids)))
        return group_outputs(project_ids, map(output_from_row, rows))

    async def render_durations(self, kind: Kind, *, limit: int) -> list[float]:
        rows = await self._run(lambda: self._all("render_durations", kind=kind.value, limit=limit))
        return [r["seconds"] for r in reversed(rows)]

    # --- scheduling -----------------------------------------------------------------------------

    async def claim_due(
        self, *, now: float, limit: int, owner: str, lease_seconds: float
    ) -> list[Claim]:
        def work() -> list[Claim]:
            claims = []
            with _transaction(self._db):
                for row in self._all("select_due", now=now, limit=limit):
                    (version,) = self._db.execute(_Q["next_lease_version"]).fetchone()
                    until = now + lease_seconds
                    self._db.execute(
                        _Q["lease_project"],
                        {"id": row["id"], "until": until, "owner": owner, "version": version},
                    )
                    record = t.leased(
                        project_from_row(row), owner=owner, until=until, version=version
                    )
                    claims.append(Claim(record, version))
            return claims

        return await self._run(work)

    async def next_due_at(self) -> float | None:
        row = await self._run(lambda: self._one("next_due_at"))
        return None if row is None else row["due_at"]

    async def release_leases(self, *, now: float, owner: str | None = None) -> int:
        def work() -> int:
            with _transaction(self._db):
                return self._db.execute(_Q["release_leases"], {"now": now, "owner": owner}).rowcount

        return await self._run(work)

    async def renew(self, claim: Claim, *, now: float, lease_seconds: float) -> bool:
        def work() -> bool:
            with _transaction(self._db):
                params = {"id": claim.id, "version": claim.version, "until": now + lease_seconds}
                return self._db.execute(_Q["renew"], params).rowcount == 1

        return await self._run(work)

    async def expedite(self, project_id: str, *, now: float) -> bool:
        def work() -> bool:
            with _transaction(self._db):
                self._db.execute(_Q["expedite"], {"id": project_id, "now": now})
                return self._one("is_active", id=project_id) is not None

        return await self._run(work)

    # --- fenced writes: a transition read, computed and written in one transaction ----------

    def _claimed(self, claim: Claim) -> ProjectRecord:
        """The claimed project's row, or :class:`LeaseLost` if the claim is stale."""
        row = self._one("fenced_project", id=claim.id, version=claim.version)
        if row is None:
            raise LeaseLost(f"lease on project {claim.id} was lost")
        return project_from_row(row)

    def _change(self, claim: Claim, change: Callable[[ProjectRecord], ProjectRecord]) -> None:
        """Write ``change`` of the claimed project (inside a transaction)."""
        self._db.execute(_Q["write_project"], project_changes(change(self._claimed(claim))))

    async def _apply(self, claim: Claim, change: Callable[[ProjectRecord], ProjectRecord]) -> None:
        def work() -> None:
            with _transaction(self._db):
                self._change(claim, change)

        await self._run(work)

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

        def work() -> None:
            with _transaction(self._db):
                after = change(self._claimed(claim))
                outputs = [output_from_row(r) for r in self._all("outputs", project_id=claim.id)]
                t.require_saved(claim.id, after.state, outputs)
                self._db.execute(_Q["write_project"], project_changes(after))
                if notify is None:
                    return
                row = self._one("get_project", id=claim.id)
                if row is None:  # pragma: no cover - the fenced write above found it
                    raise LeaseLost(f"project {claim.id} vanished")
                body = notify(project_from_row(row), outputs)
                self._db.execute(
                    _Q["enqueue_notification"], {"project_id": claim.id, "body": body, "now": now}
                )

        await self._run(work)

    async def record_complete(
        self, claim: Claim, *, now: float, due_at: float, outputs: list[NewOutput]
    ) -> list[OutputRecord]:
        def work() -> list[OutputRecord]:
            with _transaction(self._db):
                self._change(claim, lambda p: t.completed(p, now=now, due_at=due_at))
                for new in outputs:
                    self._db.execute(
                        _Q["upsert_output"],
                        {
                            "project_id": claim.id,
                            "idx": new.index,
                            "url": new.url,
                            "expires_at": new.expires_at,
                            "path": new.path,
                        },
                    )
                return [output_from_row(r) for r in self._all("outputs", project_id=claim.id)]

        return await self._run(work)

    def _output_write(
        self, query: str, claim: Claim, *, progress: bool = False, **params: object
    ) -> None:
        with _transaction(self._db):
            self._claimed(claim)
            self._db.execute(_Q[query], {"project_id": claim.id, **params})
            if progress:
                self._change(claim, t.progressed)

    async def record_output_verified(
        self, claim: Claim, *, index: int, size: int, sha256: str
    ) -> None:
        await self._run(
            lambda: self._output_write(
                "output_verified", claim, idx=index, bytes=size, sha256=sha256
            )
        )

    async def record_output_saved(self, claim: Claim, *, index: int, now: float) -> None:
        await self._run(
            lambda: self._output_write("output_saved", claim, progress=True, idx=index, now=now)
        )

    async def reset_output(self, claim: Claim, *, index: int) -> None:
        await self._run(lambda: self._output_write("reset_output", claim, idx=index))

    async def claim_notifications(
        self, *, now: float, limit: int, lease_seconds: float
    ) -> list[Notification]:
        def work() -> list[Notification]:
            with _transaction(self._db):
                rows = self._all("select_notifications", now=now, limit=limit)
                for row in rows:
                    self._db.execute(
                        _Q["lease_notification"], {"id": row["id"], "until": now + lease_seconds}
                    )
            return [notification_from_row(r) for r in rows]

        return await self._run(work)

    async def notification_sent(self, notification_id: int, *, now: float) -> None:
        await self._exec("notification_sent", id=notification_id, now=now)

    async def notification_failed(self, notification_id: int, *, due_at: float, error: str) -> None:
        await self._exec("notification_failed", id=notification_id, due_at=due_at, error=error)

    async def _exec(self, query: str, **params: object) -> None:
        def work() -> None:
            with _transaction(self._db):
                self._db.execute(_Q[query], params)

        await self._run(work)

    async def flush(self) -> None:
        if self.path != ":memory:":
            await self._run(lambda: self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
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


def _split_statements(sql: str) -> list[str]:
    """Split a migration into statements: comment lines dropped, then split at ``;`` (our
    migrations have none inside literals)."""
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in code.split(";") if s.strip()]
