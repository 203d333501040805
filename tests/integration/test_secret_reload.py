"""Secrets given as files, read again while the daemon runs (what SIGHUP does): the control API
and the webhook receiver use the new values at once and refuse the old ones."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from tests.integration.http_support import CONTROL_TOKEN, running
from tests.support import watcher_settings
from watcher.simulator.server import SimulatorServer
from watcher.store import SQLiteStore
from watcher.webhooks import signed_headers
from watcher.wiring import build

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]
NEW_CONTROL = "control-token-rotated-0002"
OLD_WEBHOOK = "whsec-first-secret-0001"
NEW_WEBHOOK = "whsec-rotated-secret-0002"


async def webhook(client: httpx.AsyncClient, secret: str) -> int:
    """The status of a webhook delivery signed with ``secret`` (about a project not tracked)."""
    body = json.dumps({"type": "image.completed", "payload": {"id": "cmuntracked"}}).encode()
    headers = {"content-type": "application/json", **signed_headers(secret, body, now=time.time())}
    response = await client.post("/webhooks/magic-hour", content=body, headers=headers)
    return response.status_code


async def test_reloaded_control_token_and_webhook_secret_apply_at_once(
    serve: Serve, tmp_path: Path
) -> None:
    """After ``reload_secrets`` the control API takes the new token and refuses the old one,
    and webhooks must be signed with the new secret; the log names the files, not the values."""
    control_file, webhook_file = tmp_path / "control", tmp_path / "webhook"
    control_file.write_text(CONTROL_TOKEN + "\n")
    webhook_file.write_text(OLD_WEBHOOK + "\n")
    settings = watcher_settings(
        serve(),
        tmp_path,
        control_token_file=str(control_file),
        webhook_secret_file=str(webhook_file),
    )
    daemon = build(settings, SQLiteStore(str(tmp_path / "watcher.db"), exclusive=True))
    with capture_logs() as logs:
        async with running(daemon) as run:
            assert (await run.client.get("/v1/projects")).status_code == 200
            assert await webhook(run.client, OLD_WEBHOOK) == 200
            control_file.write_text(NEW_CONTROL + "\n")
            webhook_file.write_text(NEW_WEBHOOK + "\n")

            changed = daemon.reload_secrets("SIGHUP")

            assert changed == ["WATCHER_CONTROL_TOKEN_FILE", "WATCHER_WEBHOOK_SECRET_FILE"]
            assert (await run.client.get("/v1/projects")).status_code == 401
            fresh = {"authorization": f"Bearer {NEW_CONTROL}"}
            assert (await run.client.get("/v1/projects", headers=fresh)).status_code == 200
            assert await webhook(run.client, OLD_WEBHOOK) == 401
            assert await webhook(run.client, NEW_WEBHOOK) == 200
    (reloaded,) = [e for e in logs if e["event"] == "secrets_reloaded"]
    assert reloaded["trigger"] == "SIGHUP"
    assert NEW_CONTROL not in repr(logs)
    assert NEW_WEBHOOK not in repr(logs)


async def test_an_empty_secret_file_keeps_the_secrets_in_use(serve: Serve, tmp_path: Path) -> None:
    """A file emptied mid-rotation is logged as a failed reload and the old token still works."""
    control_file = tmp_path / "control"
    control_file.write_text(CONTROL_TOKEN + "\n")
    settings = watcher_settings(serve(), tmp_path, control_token_file=str(control_file))
    daemon = build(settings, SQLiteStore(str(tmp_path / "watcher.db"), exclusive=True))
    with capture_logs() as logs:
        async with running(daemon) as run:
            control_file.write_text("")
            assert daemon.reload_secrets("SIGHUP") == []
            assert (await run.client.get("/v1/projects")).status_code == 200
    (failed,) = [e for e in logs if e["event"] == "secrets_reload_failed"]
    assert failed["error"] == "WATCHER_CONTROL_TOKEN_FILE: the file it names is empty"
