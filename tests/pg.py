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
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from watcher.store.postgres import PostgresStore, redact_url

BIN = Path("/usr/lib/postgresql/15/bin")
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


class OwnServer:
    """A PostgreSQL server of one test's own, which the test may stop and start again: its own
    data directory under ``/tmp`` (owned by ``postgres``) and its own port on 127.0.0.1. The
    machine's shared server is never touched.

    Made with ``initdb`` and driven with ``pg_ctl``, run as ``postgres`` when the tests run as
    root (``initdb`` refuses root). :meth:`remove` stops it and deletes its directory.
    """

    def __init__(self) -> None:
        if not (BIN / "initdb").exists():
            message = f"no PostgreSQL binaries at {BIN} (initdb, pg_ctl)"
            if os.environ.get("CI"):
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        self.root = Path(tempfile.mkdtemp(prefix="watcher-own-pg-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _pg(self, program: str, *args: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        result = subprocess.run(
            [*as_postgres, str(BIN / program), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"{program} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "server.log")
        self._pg("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        """Stop the server at once (``-m fast``: clients are disconnected)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def freeze(self) -> None:
        """Stop every process of the server (SIGSTOP): connections stay open, nothing answers,
        as when a host hangs or vanishes mid-failover."""
        postmaster, *_ = self._processes()
        os.kill(postmaster, signal.SIGSTOP)  # first: it forks no backend after this
        for pid in self._processes()[1:]:
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let the frozen server go on (SIGCONT)."""
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, signal.SIGCONT)

    def _processes(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended meanwhile
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def remove(self) -> None:
        """Stop the server if it runs (thawed first), and delete its directory."""
        try:
            if (self.data / "postmaster.pid").exists():
                with contextlib.suppress(OSError, ValueError):  # not frozen, or not started
                    self.thaw()
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
