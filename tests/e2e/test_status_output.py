"""``watcher status`` as a subprocess prints an API error message full of escape sequences as
visible text, not as commands to the operator's terminal."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from watcher import clock
from watcher.models import Kind, ProjectRef, RemoteStatus, State
from watcher.store import create_store

HOSTILE = "\x1b]0;owned\x07\x1b[2J\rfine\u202e"


async def store_an_error(url: str) -> None:
    """A project that ended ``error`` with a hostile message, as the API could send it."""
    async with create_store(url) as store:
        now = clock.now()
        await store.track(
            [ProjectRef(Kind.IMAGE, "cmhostile")], now=now, delete_after_download=False
        )
        (claim,) = await store.claim_due(now=now, limit=1, owner="test", lease_seconds=30)
        await store.record_final(
            claim,
            now=now,
            state=State.ERROR,
            remote_status=RemoteStatus.ERROR,
            error_code="bad\x1b[5m",
            error_message=HOSTILE,
        )


def test_status_escapes_what_the_api_wrote(tmp_path: Path) -> None:
    """The table shows ``\\x1b`` where the message had ESC; no control character is printed."""
    url = f"sqlite:///{tmp_path / 'watcher.db'}"
    asyncio.run(store_an_error(url))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env["WATCHER_DATABASE_URL"] = url
    result = subprocess.run(
        [sys.executable, "-m", "watcher", "status"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode("utf-8")
    assert "cmhostile" in out
    assert "\\x1b]0;owned\\x07" in out
    assert not any(c in out for c in "\x1b\x07\r\u202e")
