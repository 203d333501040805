"""SQL text of the backends, kept in ``.sql`` files: named queries and numbered migrations.

A queries file holds blocks that start with ``-- name: <name>``; a migrations folder holds files
named ``NNNN_<what>.sql``, applied in order, each once.

``{active}`` in a query stands for the list of active states
(:data:`watcher.models.ACTIVE_STATES`, in the order of :class:`~watcher.models.State`), so it is
spelled in one place. Migrations are history and keep the literal list they were written with
(the partial indexes' predicate, which the queries must repeat exactly for SQLite to use them).
"""

from __future__ import annotations

import re
from importlib import resources

from watcher.models import ACTIVE_STATES, State

_NAME_RE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def active_states_sql() -> str:
    """The active states as an SQL list: ``('polling', 'downloading', 'deleting')``."""
    return "(" + ", ".join(f"'{s.value}'" for s in State if s in ACTIVE_STATES) + ")"


def load_queries(backend: str) -> dict[str, str]:
    """Return the named queries of ``<backend>/queries.sql``, ``{active}`` filled in."""
    text = resources.files(__package__).joinpath(backend, "queries.sql").read_text("utf-8")
    text = text.replace("{active}", active_states_sql())
    parts = _NAME_RE.split(text)
    # The split alternates names and bodies after a preamble.
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def load_migrations(backend: str) -> list[tuple[int, str]]:
    """Return ``(version, sql)`` for every migration of ``backend``, in order."""
    folder = resources.files(__package__).joinpath(backend, "migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_\w+\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text("utf-8")))
    return sorted(found)
