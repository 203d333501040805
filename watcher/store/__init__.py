"""Durable state behind one interface: :class:`Store`, and :func:`open_store` to pick a backend
from ``WATCHER_DATABASE_URL``."""

from __future__ import annotations

from urllib.parse import urlsplit

from watcher.errors import ConfigError
from watcher.store.base import (
    Claim,
    LeaseLost,
    NewOutput,
    Notification,
    OutputRecord,
    OutputState,
    ProjectPage,
    ProjectRecord,
    Store,
    TrackResult,
)
from watcher.store.memory import InMemoryStore
from watcher.store.sqlite import SQLiteStore

__all__ = [
    "Claim",
    "InMemoryStore",
    "LeaseLost",
    "NewOutput",
    "Notification",
    "OutputRecord",
    "OutputState",
    "ProjectPage",
    "ProjectRecord",
    "SQLiteStore",
    "Store",
    "TrackResult",
    "create_store",
    "sqlite_path",
]


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc:
        raise ConfigError(f"not a SQLite URL (expected sqlite:///path): {url}")
    path = parts.path.removeprefix("/")
    if not path:
        raise ConfigError(f"SQLite URL names no file: {url}")
    return path


def create_store(url: str, *, exclusive: bool = False) -> Store:
    """Build the store that ``url`` names (``sqlite:///…`` or ``memory://``); not yet opened."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SQLiteStore(sqlite_path(url), exclusive=exclusive)
    if scheme == "memory":
        return InMemoryStore()
    raise ConfigError(f"unsupported database URL scheme {scheme!r}: use sqlite:///path")
