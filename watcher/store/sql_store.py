"""The SQL store: every store method once, over a :class:`~watcher.store.connector.Connector`.

Queries are named, one file per dialect (``sql/<dialect>/queries.sql``), and say the same thing
under the same name; what the store does with them is written here once. A backend's subclass
(:class:`~watcher.store.sqlite.SQLiteStore`, :class:`~watcher.store.postgres.PostgresStore`)
adds only what its SQL cannot say the same way: how due projects and notifications are claimed
(PostgreSQL: one ``FOR UPDATE SKIP LOCKED`` statement; SQLite, the single writer: select, then
lease), and what only a shared database has (the fleet's rate budget and gauge reporter).

Every transition is read, computed (:mod:`watcher.store.transitions`) and written in one
transaction, fenced by ``lease_version`` (:class:`LeaseLost`);
:class:`~watcher.store.writes.TransitionWrites` says which change each ``record_*`` method makes.

Adding to the store: a new table gets a migration in each dialect's folder, its statements a
name in each ``queries.sql``, and its methods go here once (and into the in-memory store); only
what one database alone can do goes to its subclass, over what its connector offers (PostgreSQL
sessions that outlive a call, such as advisory locks or ``LISTEN``, belong to
:class:`~watcher.store.postgres_connector.PostgresConnector`).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from watcher.models import Kind, ProjectRef, State
from watcher.store import transitions as t
from watcher.store.base import Store
from watcher.store.connector import Connector, Session
from watcher.store.records import (
    Change,
    Claim,
    LeaseLost,
    NewOutput,
    NotificationBuilder,
    OutputRecord,
    ProjectPage,
    ProjectRecord,
    TrackResult,
    group_outputs,
)
from watcher.store.rows import (
    Row,
    output_from_row,
    project_changes,
    project_from_row,
)

C = TypeVar("C", bound=Connector)


class SqlStore(Store, Generic[C]):
    """A :class:`Store` in a SQL database reached through ``connector``, with the dialect's
    named ``queries``. Abstract: a dialect's subclass says how it claims projects
    (:meth:`claim_due`) and notifications (:meth:`claim_notifications`)."""

    def __init__(self, connector: C, queries: dict[str, str]) -> None:
        self.connector = connector
        self._q = queries

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        await self.connector.open()

    async def close(self) -> None:
        await self.connector.close()

    async def ping(self) -> None:
        await self.connector.ping()

    async def flush(self) -> None:
        await self.connector.flush()

    # --- tracking -------------------------------------------------------------------------------

    def _refs(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> dict[str, object]:
        return {
            "ids": self.connector.array([ref.id for ref in refs]),
            "kinds": self.connector.array([ref.kind.value for ref in refs]),
            "delete_after_download": delete_after_download,
            "now": now,
        }

    async def track(
        self, refs: list[ProjectRef], *, now: float, delete_after_download: bool
    ) -> TrackResult:
        params = self._refs(refs, now=now, delete_after_download=delete_after_download)
        rows = await self.connector.transaction(
            lambda s: self._due_rows(s, self._q["insert_projects"], params)
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
        params = self._refs(refs, now=now, delete_after_download=delete_after_download)
        rows = await self.connector.transaction(
            lambda s: self._due_rows(s, self._q["revive_projects"], params)
        )
        revived = {row["id"] for row in rows}
        return [pid for pid in dict.fromkeys(ref.id for ref in refs) if pid in revived]

    async def untrack(self, project_id: str) -> bool:
        return await self.connector.execute(self._q["delete_project"], {"id": project_id}) == 1

    async def get(self, project_id: str) -> ProjectRecord | None:
        row = await self.connector.fetchone(self._q["get_project"], {"id": project_id})
        return project_from_row(row) if row is not None else None

    async def list_projects(
        self, *, state: State | None = None, limit: int = 100, cursor: str | None = None
    ) -> ProjectPage:
        params = {"state": state.value if state else None, "cursor": cursor, "limit": limit + 1}
        rows = await self.connector.fetchall(self._q["list_projects"], params)
        projects = [project_from_row(r) for r in rows[:limit]]
        return ProjectPage(projects, projects[-1].id if len(rows) > limit else None)

    async def count_by_state(self) -> dict[State, int]:
        rows = await self.connector.fetchall(self._q["count_by_state"], {})
        return {State(r["state"]): r["n"] for r in rows}

    async def outputs(self, project_id: str) -> list[OutputRecord]:
        rows = await self.connector.fetchall(self._q["outputs"], {"project_id": project_id})
        return [output_from_row(r) for r in rows]

    async def note_active(self, failure: str, *, now: float) -> int:
        return await self.connector.execute(
            self._q["note_active"], {"failure": failure, "now": now}
        )

    async def outputs_of(self, project_ids: list[str]) -> dict[str, list[OutputRecord]]:
        rows = await self.connector.fetchall(
            self._q["outputs_of"], {"ids": self.connector.array(project_ids)}
        )
        return group_outputs(project_ids, map(output_from_row, rows))

    async def render_durations(self, kind: Kind, *, limit: int) -> list[float]:
        params = {"kind": kind.value, "limit": limit}
        rows = await self.connector.fetchall(self._q["render_durations"], params)
        return [r["seconds"] for r in reversed(rows)]

    # --- waking the fleet ------------------------------------------------------------------------

    async def _announce_due(self, s: Session) -> None:
        """Inside the transaction of a write that makes work due: tell every replica, at commit,
        to look for it now. Nothing here: a store that one daemon alone works on wakes it in
        process (the daemon's own wake-up, and its claim loop's next look for another
        process's ``watcher track``)."""

    async def _due_rows(self, s: Session, sql: str, params: dict[str, object]) -> list[Row]:
        """The rows of a write that makes them due, announced (:meth:`_announce_due`) if any."""
        rows = list(await s.fetchall(sql, params))
        if rows:
            await self._announce_due(s)
        return rows

    # --- scheduling -----------------------------------------------------------------------------

    async def next_due_at(self) -> float | None:
        row = await self.connector.fetchone(self._q["next_due_at"], {})
        return None if row is None else row["due_at"]

    async def release_leases(self, *, now: float, owner: str | None = None) -> int:
        async def work(s: Session) -> int:
            released = await s.execute(self._q["release_leases"], {"now": now, "owner": owner})
            if released:
                await self._announce_due(s)
            return released

        return await self.connector.transaction(work)

    async def renew(self, claim: Claim, *, now: float, lease_seconds: float) -> bool:
        params = {"id": claim.id, "version": claim.version, "until": now + lease_seconds}
        return await self.connector.execute(self._q["renew"], params) == 1

    async def expedite(self, project_id: str, *, now: float) -> bool:
        async def work(s: Session) -> bool:
            if await s.execute(self._q["expedite"], {"id": project_id, "now": now}):
                await self._announce_due(s)
            return await s.fetchone(self._q["is_active"], {"id": project_id}) is not None

        return await self.connector.transaction(work)

    # --- fenced writes: a transition read, computed and written in one transaction ----------

    async def _claimed(self, s: Session, claim: Claim) -> ProjectRecord:
        """The claimed project's row (locked where the dialect can), or :class:`LeaseLost` if
        the claim is stale."""
        params = {"id": claim.id, "version": claim.version}
        row = await s.fetchone(self._q["fenced_project"], params)
        if row is None:
            raise LeaseLost(f"lease on project {claim.id} was lost")
        return project_from_row(row)

    async def _change(self, s: Session, claim: Claim, change: Change) -> None:
        """Write ``change`` of the claimed project (inside a transaction)."""
        await self._write(s, change(await self._claimed(s, claim)))

    async def _write(self, s: Session, after: ProjectRecord) -> None:
        """Write the claimed project's record as a transition made it (fenced by its lease)."""
        await s.execute(self._q["write_project"], project_changes(after))

    async def _outputs(self, s: Session, project_id: str) -> list[OutputRecord]:
        rows = await s.fetchall(self._q["outputs"], {"project_id": project_id})
        return [output_from_row(r) for r in rows]

    async def _apply(self, claim: Claim, change: Change) -> None:
        await self.connector.transaction(lambda s: self._change(s, claim, change))

    async def _finish(
        self,
        claim: Claim,
        change: Change,
        *,
        now: float,
        notify: NotificationBuilder | None,
        saved_output: int | None = None,
    ) -> None:
        """Write ``change`` of the project (refused unless every output is saved where its new
        state needs it, ``saved_output`` recorded saved first) and queue the event ``notify``
        builds from the row as written, in one transaction."""

        async def work(s: Session) -> None:
            after = change(await self._claimed(s, claim))
            if saved_output is not None:
                params = {"project_id": claim.id, "idx": saved_output, "now": now}
                await s.execute(self._q["output_saved"], params)
            outputs = await self._outputs(s, claim.id)
            t.require_saved(claim.id, after.state, outputs)
            await self._write(s, after)
            if notify is None:
                return
            row = await s.fetchone(self._q["get_project"], {"id": claim.id})
            if row is None:  # pragma: no cover - the fenced write above found it
                raise LeaseLost(f"project {claim.id} vanished")
            body = notify(project_from_row(row), outputs)
            params = {"project_id": claim.id, "body": body, "now": now}
            await s.execute(self._q["enqueue_notification"], params)

        await self.connector.transaction(work)

    async def record_complete(
        self, claim: Claim, *, now: float, due_at: float, outputs: list[NewOutput]
    ) -> list[OutputRecord]:
        async def work(s: Session) -> list[OutputRecord]:
            await self._change(s, claim, lambda p: t.completed(p, now=now, due_at=due_at))
            await s.executemany(
                self._q["upsert_output"],
                [
                    {
                        "project_id": claim.id,
                        "idx": new.index,
                        "url": new.url,
                        "expires_at": new.expires_at,
                        "path": new.path,
                    }
                    for new in outputs
                ],
            )
            return await self._outputs(s, claim.id)

        return await self.connector.transaction(work)

    async def _output_write(
        self, query: str, claim: Claim, *, progress: bool = False, **params: object
    ) -> None:
        async def work(s: Session) -> None:
            before = await self._claimed(s, claim)  # the fence, and what progress changes
            await s.execute(self._q[query], {"project_id": claim.id, **params})
            if progress:
                await self._write(s, t.progressed(before))

        await self.connector.transaction(work)

    async def record_output_verified(
        self, claim: Claim, *, index: int, size: int, sha256: str
    ) -> None:
        await self._output_write("output_verified", claim, idx=index, bytes=size, sha256=sha256)

    async def record_output_uploading(self, claim: Claim, *, index: int, key: str) -> None:
        await self._output_write("output_uploading", claim, idx=index, upload_key=key)

    async def record_output_saved(self, claim: Claim, *, index: int, now: float) -> None:
        await self._output_write("output_saved", claim, progress=True, idx=index, now=now)

    async def reset_output(self, claim: Claim, *, index: int) -> None:
        await self._output_write("reset_output", claim, idx=index)

    # --- the outbox ------------------------------------------------------------------------------

    async def notification_sent(self, notification_id: int, *, now: float) -> None:
        await self.connector.execute(
            self._q["notification_sent"], {"id": notification_id, "now": now}
        )

    async def notification_failed(self, notification_id: int, *, due_at: float, error: str) -> None:
        params = {"id": notification_id, "due_at": due_at, "error": error}
        await self.connector.execute(self._q["notification_failed"], params)
