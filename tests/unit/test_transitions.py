"""The transitions every backend applies (watcher/store/transitions.py), where the contract suite
cannot reach them, and the one spelling of the active states."""

from __future__ import annotations

import dataclasses

import pytest

from watcher.models import ACTIVE_STATES, FINAL_STATES, Kind, ProjectRef, State
from watcher.store import InMemoryStore, ProjectRecord
from watcher.store import transitions as t
from watcher.store.sql import active_states_sql, load_migrations, load_queries

pytestmark = pytest.mark.anyio

T0 = 1_000_000.0


def leased_in(state: State) -> ProjectRecord:
    fresh = t.tracked(ProjectRef(Kind.IMAGE, "p"), now=T0, delete_after_download=False)
    return dataclasses.replace(fresh, state=state, lease_owner="r1", due_at=T0 + 30)


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
def test_a_final_project_is_never_released(state: State) -> None:
    """Releasing leases touches active projects only, whatever lease a final one still names."""
    assert not t.releasable(leased_in(state), None)
    assert not t.releasable(leased_in(state), "r1")


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_an_active_project_is_released_to_be_due_now(state: State) -> None:
    """A released active project is unleased and due at once."""
    p = leased_in(state)
    assert t.releasable(p, "r1")
    assert not t.releasable(p, "r2")
    released = t.released(p, now=T0 + 1)
    assert (released.lease_owner, released.due_at) == (None, T0 + 1)


async def test_the_memory_store_releases_active_projects_only() -> None:
    """The in-memory store counts and frees what the SQL ``release_leases`` does: a final
    project naming an owner (a row the SQL stores would skip) is left as it is."""
    store = InMemoryStore()
    store.projects["done"] = dataclasses.replace(leased_in(State.SAVED), id="done")
    store.projects["busy"] = dataclasses.replace(leased_in(State.DOWNLOADING), id="busy")
    assert await store.release_leases(now=T0 + 1) == 1
    assert store.projects["done"].lease_owner == "r1"
    assert store.projects["busy"].lease_owner is None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_active_states_are_spelled_once(backend: str) -> None:
    """Queries name the active states through ``{active}`` only, and its expansion is the
    predicate of the partial indexes the migrations built (SQLite uses them only then)."""
    expanded = "\n".join(load_queries(backend).values())
    migrations = "\n".join(sql for _, sql in load_migrations(backend))
    assert "'deleting'" not in expanded.replace(active_states_sql(), "")
    assert f"WHERE state IN {active_states_sql()}" in migrations
