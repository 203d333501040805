"""Helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from watcher.api import MagicHourClient
from watcher.settings import Settings, load_settings
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.throttle import Throttle

FAST = SimConfig(
    seed=11,
    queued_seconds=(0.05, 0.4),
    rendering_seconds=(0.1, 0.8),
    error_rate=0.1,
    cancel_rate=0.05,
    output_bytes=(1_000, 60_000),
)


def watcher_env(server: SimulatorServer, root: Path, **extra: str) -> dict[str, str]:
    """The WATCHER_* variables of a daemon watching ``server``, keeping its files under ``root``."""
    env = {
        "WATCHER_API_TOKEN": server.simulator.config.token,
        "WATCHER_API_BASE_URL": server.base_url,
        "WATCHER_DATABASE_URL": f"sqlite:///{root / 'watcher.db'}",
        "WATCHER_DOWNLOAD_DIR": str(root / "downloads"),
        "WATCHER_POLL_INITIAL": "0.1",
        "WATCHER_POLL_MAX": "0.5",
        "WATCHER_MAX_REQUESTS_PER_SECOND": "2000",
        "WATCHER_MAX_CONCURRENT_REQUESTS": "16",
        "WATCHER_HTTP_ENABLED": "false",
        "WATCHER_LOG_LEVEL": "debug",
        "WATCHER_LEASE_SECONDS": "10",  # the store timeout follows it: 5 s, half of it
        "WATCHER_SHUTDOWN_GRACE": "5",
    }
    env.update({f"WATCHER_{k.upper()}": v for k, v in extra.items()})
    return env


def watcher_settings(server: SimulatorServer, root: Path, **extra: str) -> Settings:
    """Settings for an in-process daemon watching ``server``."""
    return load_settings(watcher_env(server, root, **extra))


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a process whose stdout and stderr go to ``log``: a pipe that nobody reads while the
    process runs fills up and blocks it at its next log line."""
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


class Intercepted(httpx.AsyncBaseTransport):
    """The real network, except for the requests ``answer`` answers itself: it returns a response
    for those (a proxy's error page, a CDN's refusal) and ``None`` to let a request through."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response | None]) -> None:
        self._answer = answer
        self._network = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = self._answer(request)
        if response is not None:
            return response
        return await self._network.handle_async_request(request)

    async def aclose(self) -> None:
        await self._network.aclose()


def api_client(http: httpx.AsyncClient, base_url: str, token: str) -> MagicHourClient:
    """An API client on ``http`` that tries each call once (a test sees the first error)."""
    return MagicHourClient(
        http,
        base_url=base_url,
        token=SecretStr(token),
        throttle=Throttle(rate=1000, concurrency=4),
        max_attempts=1,
    )


def run_watcher(
    args: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``watcher ARGS`` to its end, its output captured as text (any exit code)."""
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def watcher_status(env: dict[str, str], limit: int = 1000) -> dict[str, Any]:
    """What ``watcher status --json`` says of the store of ``env``."""
    done = run_watcher(["status", "--json", "--limit", str(limit)], env, timeout=30)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer
