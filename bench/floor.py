"""Scenario "floor": what one request costs the HTTP client itself, with nothing else around it.

A bare ``httpx.AsyncClient`` (one per run, 8 requests at a time, as the watcher's default
``MAX_CONCURRENT_REQUESTS``) GETs projects of the simulator and parses their JSON, then streams
200,000-byte outputs and drops the bytes. The CPU this process spent divided by the requests is
the floor under any client built on httpx on this machine: the watcher adds its store, schedule,
checksums and fsyncs on top; the SDK its per-request work on top. It puts the fleet's CPU target
in proportion (see RESULTS.md).
"""

from __future__ import annotations

import asyncio
import resource
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.sim import SimProcess
from bench.stats import fmt, markdown_table, ratio

SIM_CONFIG: dict[str, Any] = {
    "seed": 5,
    "timeline_start": "created",
    "error_rate": 0.0,
    "cancel_rate": 0.0,
}
QUEUED_FOREVER = {"queued_seconds": 10_000_000}
COMPLETE = {
    "status": "complete",
    "queued_seconds": 0,
    "rendering_seconds": 0,
    "outputs": 1,
    "output_size": 200_000,
}
CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class Floor:
    """One kind of request, repeated."""

    what: str
    requests: int
    seconds: float
    cpu: float

    @property
    def cpu_ms(self) -> float:
        """CPU milliseconds per request."""
        return ratio(self.cpu * 1000, self.requests)

    def to_json(self) -> dict[str, Any]:
        """The raw numbers, for ``--json``."""
        return {
            "what": self.what,
            "requests": self.requests,
            "seconds": self.seconds,
            "cpu": self.cpu,
            "cpu_ms": self.cpu_ms,
        }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(what: str, paths: list[str], sim: SimProcess, *, stream: bool) -> Floor:
    headers = {"authorization": f"Bearer {sim.token}"}
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=60.0) as client:

        async def one(path: str) -> None:
            async with limit:
                if stream:
                    async with client.stream("GET", path) as response:
                        async for _ in response.aiter_bytes():
                            pass
                else:
                    response = await client.get(path, headers=headers)
                    response.json()
                response.raise_for_status()

        await one(paths[0])  # the connection pool warm
        started, cpu = time.monotonic(), _cpu()
        await asyncio.gather(*(one(p) for p in paths))
        return Floor(what, len(paths), time.monotonic() - started, _cpu() - cpu)


def run(requests: int) -> list[Floor]:
    """``requests`` API GETs, then ``requests`` 200 KB downloads, on a fresh simulator."""
    with SimProcess(SIM_CONFIG) as sim:
        queued = sim.create(requests, QUEUED_FOREVER)
        gets = [f"/v1/image-projects/{pid}" for pid in queued]
        done = sim.create(requests, COMPLETE)
        urls = [sim.download_url(pid) for pid in done]
        return [
            asyncio.run(_measure("API GET + JSON", gets, sim, stream=False)),
            asyncio.run(_measure("200 KB download, streamed", urls, sim, stream=True)),
        ]


def table(floors: list[Floor]) -> str:
    """One row per kind of request."""
    rows = [
        (
            f.what,
            str(f.requests),
            fmt(ratio(f.requests, f.seconds), 0),
            fmt(f.cpu_ms, 3),
        )
        for f in floors
    ]
    headers = ("bare httpx.AsyncClient", "requests", "requests/s", "CPU ms / request")
    return markdown_table(headers, rows)
