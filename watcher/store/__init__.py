"""Durable state behind one interface: :class:`Store`, and :func:`create_store` to pick a backend
from ``WATCHER_DATABASE_URL``.

The PostgreSQL backend (and with it psycopg) is imported only when a URL names it: a SQLite
daemon never pays for the driver. Import :class:`~watcher.store.postgres.PostgresStore` from
:mod:`watcher.store.postgres`."""

from __future__ import annotations

from urllib.parse import urlsplit

from watcher.errors import ConfigError
from watcher.store import records
from watcher.store.base import Liveness, Store
from watcher.store.memory import InMemoryStore
from watcher.store.records import *  # noqa: F403 - the records are listed once, in records.__all__
from watcher.store.sqlite import SQLiteStore
from watcher.store.transitions import Ending

__all__ = [
    "Ending",
    "InMemoryStore",
    "Liveness",
    "SQLiteStore",
    "Store",
    "create_store",
    "sqlite_path",
]
__all__ += records.__all__

POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc:
        raise ConfigError(f"not a SQLite URL (expected sqlite:///path): {url}")
    path = parts.path.removeprefix("/")
    if not path:
        raise ConfigError(f"SQLite URL names no file: {url}")
    return path


def create_store(
    url: str,
    *,
    exclusive: bool = False,
    pool_min_size: int = 1,
    pool_max_size: int = 10,
    timeout: float = 10.0,
) -> Store:
    """Build the store that ``url`` names (``sqlite:///…``, ``postgresql://…``/``postgres://…``
    or ``memory://``); not yet opened.

    ``exclusive`` matters to SQLite only (PostgreSQL serves several replicas); the pool sizes to
    PostgreSQL only. ``timeout``: how long one call may wait for SQLite's write lock or for a
    pooled PostgreSQL connection before it fails with :class:`~watcher.errors.StoreUnavailable`.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SQLiteStore(sqlite_path(url), exclusive=exclusive, timeout=timeout)
    if scheme in POSTGRES_SCHEMES:
        from watcher.store.postgres import PostgresStore  # noqa: PLC0415 - psycopg only if used

        return PostgresStore(url, min_size=pool_min_size, max_size=pool_max_size, timeout=timeout)
    if scheme == "memory":
        return InMemoryStore()
    raise ConfigError(
        f"unsupported database URL scheme {scheme!r}: use sqlite:///path or postgresql://host/db"
    )
