"""PostgreSQL for the tests: where the server is, and databases made and dropped around a test.

The server is ``TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``,
trust authentication), reached as a superuser that may create databases. In CI (``CI`` set, as
``.ci/run`` does) tests that need it never skip: when it is down they fail with a message saying
so. On a machine without PostgreSQL, outside CI, they skip with that message instead, so the
rest of the suite still runs from a fresh clone.

Every name carries a random suffix, so test sessions running side by side on one server do not
meet. A migrated database is made once per session and cloned (``CREATE DATABASE … TEMPLATE``)
for every test, which is much faster than migrating each one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from watcher.store.postgres import PostgresStore, redact_url

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def unique_name(prefix: str) -> str:
    """A database name no other test or session uses."""
    return f"{prefix}_{secrets.token_hex(6)}"


def database_url(name: str, *, password: str | None = None) -> str:
    """The URL of database ``name`` on the test server, with ``password`` if given."""
    parts = urlsplit(ADMIN_URL)
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0] or 'postgres'}:{password}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{name}"))


def admin() -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection to the server's maintenance database, or a failed test."""
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip()
    message = (
        f"PostgreSQL is not reachable at {redact_url(ADMIN_URL)} ({reason}). The PostgreSQL "
        "tests need it: start it (pg_ctlcluster 15 main start) or point TEST_POSTGRES_URL "
        "at a server where this user may create databases."
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(f"{message} Skipped outside CI (with CI set, this fails).")


def create_database(name: str, *, template: str = "template1") -> None:
    """Create database ``name`` as a copy of ``template``."""
    with admin() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )


def drop_database(name: str) -> None:
    """Drop database ``name``, disconnecting whoever is still connected."""
    with admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def migrate(url: str) -> None:
    """Apply the store's migrations to the database at ``url``.

    It runs on a thread of its own with its own event loop, because the fixture asking for it may
    be set up from inside the test's running loop.
    """

    async def run() -> None:
        async with PostgresStore(url):
            pass

    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(lambda: asyncio.run(run())).result()
