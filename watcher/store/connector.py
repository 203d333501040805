"""The I/O under the SQL store: a small async interface each database driver implements.

:class:`~watcher.store.sql_store.SqlStore` holds every rule and names every query; a connector
only runs SQL text and says how its driver opens, migrates, commits and fails
(:mod:`~watcher.store.sqlite_connector`: sqlite3 on one dedicated thread;
:mod:`~watcher.store.postgres_connector`: a psycopg 3 async pool). Every driver error leaves a
connector as :class:`~watcher.errors.StoreError` (:class:`~watcher.errors.StoreUnavailable`
when worth retrying).

Work that must commit together is a coroutine function given a :class:`Session` and run by
:meth:`Connector.transaction`; it may await only the session's methods (the SQLite connector
runs it whole on its thread, in one step). A single statement goes through
:meth:`Connector.execute` (a write, in a transaction of its own: SQLite's ``BEGIN IMMEDIATE``
takes the write lock up front) or :meth:`Connector.fetchall` / :meth:`Connector.fetchone` (a
read, or on PostgreSQL a write whose rows are wanted, committed alone in autocommit).

What a driver adds beyond this (PostgreSQL's session-level advisory locks, later its
``LISTEN``/``NOTIFY``) lives on that connector and is used by the backend's store subclass.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from watcher.store.rows import Row

T = TypeVar("T")
Params = Mapping[str, object]


class Session(Protocol):
    """The statements of one transaction (SQL text in the driver's parameter style)."""

    async def execute(self, sql: str, params: Params, /) -> int:
        """Run a statement; return how many rows it touched."""

    async def executemany(self, sql: str, params: Iterable[Params], /) -> None:
        """Run a statement once for each set of parameters."""

    async def fetchone(self, sql: str, params: Params, /) -> Row | None:
        """Run a statement; return its first row, if any."""

    async def fetchall(self, sql: str, params: Params, /) -> Sequence[Row]:
        """Run a statement; return every row."""


Work = Callable[[Session], Coroutine[Any, Any, T]]


class Connector(abc.ABC):
    """A database, opened migrated, behind four calls. Unopened after construction."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply the migrations the database lacks. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every connection (and lock). Safe to call twice."""

    @abc.abstractmethod
    async def transaction(self, work: Work[T]) -> T:
        """Run ``work`` in one transaction: committed if it returns, rolled back if it raises."""

    @abc.abstractmethod
    async def execute(self, sql: str, params: Params, /) -> int:
        """Run one write statement as its own transaction; return how many rows it touched."""

    @abc.abstractmethod
    async def fetchall(self, sql: str, params: Params, /) -> Sequence[Row]:
        """Run one statement alone, outside any transaction; return every row."""

    @abc.abstractmethod
    async def fetchone(self, sql: str, params: Params, /) -> Row | None:
        """Run one statement alone, outside any transaction; return its first row, if any."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`~watcher.errors.StoreError` unless the database answers."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every committed write durable against power loss."""

    @abc.abstractmethod
    def array(self, values: list[str]) -> object:
        """``values`` as the parameter of a list the driver's SQL can read."""
