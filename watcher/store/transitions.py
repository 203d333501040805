"""Every change of a project's record, defined once.

Each function takes the record as it is, the inputs of the change and ``now``, and returns the
record as it must become. It decides nothing about leases or transactions: a backend reads the
current row (fenced by the claim), applies the function, and persists what it returns
(:mod:`watcher.store.memory` keeps the result; the SQL stores write it with their named
``write_project`` query in the transaction that read the row). So a rule such as "a good GET
ends a run of failures" lives here alone, and no backend can drift from another.

Set-based writes that must stay atomic in SQL (claiming with its index, releasing every lease at
start-up, noting a failure on every active project) are defined here too, for the in-memory
store; the contract suite (``tests/integration/test_store_contract.py``) pins the SQL to them.

What a state requires of the outputs is :func:`require_saved`; which states are active is
:data:`watcher.models.ACTIVE_STATES`, spelled once for the SQL too (``{active}`` in a query).
"""

from __future__ import annotations

import dataclasses
from typing import TypedDict, Unpack

from watcher.errors import OutputsNotSaved
from watcher.models import ACTIVE_STATES, ProjectRef, RemoteStatus, State
from watcher.store.records import OutputRecord, OutputState, ProjectRecord

# The states a project may take only once every output it has is saved.
NEEDS_EVERY_OUTPUT_SAVED = frozenset({State.SAVED, State.DELETING, State.DELETED})


def require_saved(project_id: str, state: State, outputs: list[OutputRecord]) -> None:
    """Refuse (:class:`OutputsNotSaved`) to move a project to ``state`` while an output is not
    saved, or while it has none. Every backend calls this inside the transaction that would
    make the move, so no caller can finish a project with an output left behind."""
    if state not in NEEDS_EVERY_OUTPUT_SAVED:
        return
    unsaved = [o.index for o in outputs if o.state != OutputState.SAVED]
    if not outputs:
        raise OutputsNotSaved(f"project {project_id} cannot become {state}: it has no outputs")
    if unsaved:
        listed = ", ".join(map(str, unsaved))
        raise OutputsNotSaved(
            f"project {project_id} cannot become {state}: output(s) {listed} not saved"
        )


def tracked(ref: ProjectRef, *, now: float, delete_after_download: bool) -> ProjectRecord:
    """A project tracked from scratch: polling, due at once."""
    return ProjectRecord(
        id=ref.id,
        kind=ref.kind,
        state=State.POLLING,
        remote_status=None,
        delete_after_download=delete_after_download,
        due_at=now,
        attempt=0,
        polls=0,
        tracked_at=now,
        updated_at=now,
    )


def can_revive(p: ProjectRecord, ref: ProjectRef) -> bool:
    """Whether tracking ``ref`` again starts ``p`` over: it ended ``not_found``, same kind."""
    return p.kind == ref.kind and p.state == State.NOT_FOUND


def revived(p: ProjectRecord, *, now: float, delete_after_download: bool) -> ProjectRecord:
    """Tracked again from scratch: what the 404 left (note, counters, times) is cleared; the
    lease version stays, so a stale claim on the old run is still refused."""
    fresh = tracked(p.ref, now=now, delete_after_download=delete_after_download)
    return dataclasses.replace(fresh, lease_version=p.lease_version)


def leased(p: ProjectRecord, *, owner: str, until: float, version: int) -> ProjectRecord:
    """Claimed by ``owner`` until ``until``; a lease that ran out while held is an
    interruption."""
    taken_over = p.lease_owner is not None
    return dataclasses.replace(
        p,
        due_at=until,
        lease_owner=owner,
        lease_version=version,
        interruptions=p.interruptions + taken_over,
    )


def releasable(p: ProjectRecord, owner: str | None) -> bool:
    """Whether releasing the leases of ``owner`` (or all) frees ``p``: leased and active."""
    return (
        p.lease_owner is not None
        and (owner is None or p.lease_owner == owner)
        and p.state in ACTIVE_STATES
    )


def released(p: ProjectRecord, *, now: float) -> ProjectRecord:
    """The lease given up: due at once (or earlier, if it was)."""
    return dataclasses.replace(p, lease_owner=None, due_at=min(p.due_at, now))


def expedited(p: ProjectRecord, *, now: float) -> ProjectRecord:
    """An active, unleased project due now; a leased one is left to its holder."""
    if p.state not in ACTIVE_STATES or p.lease_owner is not None:
        return p
    return dataclasses.replace(p, due_at=min(p.due_at, now))


def noted(p: ProjectRecord, *, failure: str, now: float) -> ProjectRecord:
    """What holds every active project up, recorded on one of them."""
    return dataclasses.replace(p, failure=failure, updated_at=now)


def polled(
    p: ProjectRecord, *, now: float, remote_status: RemoteStatus, attempt: int, due_at: float
) -> ProjectRecord:
    """A GET saw a non-terminal status: a good answer ends a run of failures; the lease is
    released and the project due again at ``due_at``."""
    return dataclasses.replace(
        p,
        remote_status=remote_status,
        attempt=attempt,
        due_at=due_at,
        polls=p.polls + 1,
        updated_at=now,
        lease_owner=None,
        failures=0,
        failure=None,
        stalled_since=None,
        interruptions=0,
    )


def retried(
    p: ProjectRecord,
    *,
    now: float,
    due_at: float,
    failure: str,
    count_failure: bool,
    progressed: bool,
) -> ProjectRecord:
    """A transient fault: same state, due again at ``due_at``, lease released. A try that
    gained bytes before it failed is progress: the run of failures starts over."""
    failures, stalled_since = p.failures, p.stalled_since
    if progressed:
        failures, stalled_since = 0, None
    elif count_failure:
        failures += 1
        stalled_since = now if stalled_since is None else stalled_since
    return dataclasses.replace(
        p,
        due_at=due_at,
        failure=failure,
        failures=failures,
        stalled_since=stalled_since,
        updated_at=now,
        lease_owner=None,
        interruptions=0,
    )


def completed(p: ProjectRecord, *, now: float, due_at: float) -> ProjectRecord:
    """The project is complete and goes on to download, keeping its lease until ``due_at``.
    From polling this is a good GET, which ends a run of failed ones; a GET for fresh URLs of
    a project already downloading is no progress of its downloads, so their run goes on."""
    from_polling = p.state == State.POLLING
    return dataclasses.replace(
        p,
        state=State.DOWNLOADING,
        remote_status=RemoteStatus.COMPLETE,
        polls=p.polls + 1,
        failures=0 if from_polling else p.failures,
        stalled_since=None if from_polling else p.stalled_since,
        terminal_at=now if p.terminal_at is None else p.terminal_at,
        due_at=due_at,
        updated_at=now,
        interruptions=0,
    )


def takes_fresh_url(old: OutputRecord | None) -> bool:
    """Whether an output announced again replaces the stored one ``old``: only a pending one
    (or none yet) takes the fresh URL; a verified or saved one is kept as it is."""
    return old is None or old.state == OutputState.PENDING


def progressed(p: ProjectRecord) -> ProjectRecord:
    """An output was saved: the project's troubles on the way are over."""
    return dataclasses.replace(p, failures=0, stalled_since=None, failure=None)


def saved(p: ProjectRecord, *, now: float, due_at: float, delete_next: bool) -> ProjectRecord:
    """Every output is saved: what went wrong on the way (a cut download, a stale link) is over.
    Finished as ``saved`` (lease released), or on to ``deleting`` keeping the lease; due at
    ``due_at`` either way."""
    done = not delete_next
    return dataclasses.replace(
        p,
        state=State.DELETING if delete_next else State.SAVED,
        due_at=due_at,
        updated_at=now,
        failure=None,
        failures=0,
        stalled_since=None,
        lease_owner=None if done else p.lease_owner,
        finished_at=now if done else p.finished_at,
    )


class Ending(TypedDict, total=False):
    """How a project ended, beyond its final state; each part absent means ``None``.

    Declared once for every layer that passes it on (the workflow, the store, :func:`finished`).
    ``remote_status``: what a GET said, if a GET said so. ``error_code``, ``error_message``: the
    API's account of a render that ended in error. ``failure``: the watcher's own note.
    """

    remote_status: RemoteStatus | None
    error_code: str | None
    error_message: str | None
    failure: str | None


def finished(
    p: ProjectRecord, *, now: float, state: State, **ending: Unpack[Ending]
) -> ProjectRecord:
    """The project ended in a final ``state``. A ``remote_status`` means a GET said so (one
    more poll; a terminal one is the render's end); ``failed`` keeps the last failure when no
    new one is given."""
    remote_status, failure = ending.get("remote_status"), ending.get("failure")
    terminal = remote_status is not None and remote_status.is_terminal
    keep_failure = state == State.FAILED and failure is None
    return dataclasses.replace(
        p,
        state=state,
        remote_status=remote_status if remote_status is not None else p.remote_status,
        error_code=ending.get("error_code"),
        error_message=ending.get("error_message"),
        failure=p.failure if keep_failure else failure,
        finished_at=now,
        updated_at=now,
        lease_owner=None,
        terminal_at=now if terminal and p.terminal_at is None else p.terminal_at,
        polls=p.polls + (remote_status is not None),
    )


def output_verified(o: OutputRecord, *, size: int, sha256: str) -> OutputRecord:
    """The output's temporary file is complete; its size and digest are known."""
    return dataclasses.replace(o, state=OutputState.VERIFIED, bytes=size, sha256=sha256)


def output_uploading(o: OutputRecord, *, key: str) -> OutputRecord:
    """The output is being uploaded under the temporary object key ``key``."""
    return dataclasses.replace(o, upload_key=key)


def output_saved(o: OutputRecord, *, now: float) -> OutputRecord:
    """The output is under its final name (its temporary object, if any, is gone)."""
    return dataclasses.replace(o, state=OutputState.SAVED, saved_at=now, upload_key=None)


def output_reset(o: OutputRecord) -> OutputRecord:
    """The output is to be fetched again."""
    return dataclasses.replace(
        o, state=OutputState.PENDING, bytes=None, sha256=None, saved_at=None, upload_key=None
    )
