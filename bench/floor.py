"""Scenario "floor": what one request costs the HTTP client itself, with nothing else around it.

Each candidate client (one per run) GETs projects of the simulator and parses their JSON, 8 at a
time (the watcher's default ``MAX_CONCURRENT_REQUESTS``) and 50 at a time, then streams
200,000-byte outputs (8 at a time) and drops the bytes. The CPU this process spent (user +
system, ``getrusage``) divided by the requests is the floor under any client built on that
stack on this machine: the watcher adds its store, schedule, checksums and fsyncs on top; the
SDK its per-request work on top. The simulator runs in another process; its CPU is not counted.

Candidates (``CANDIDATES``):

- ``httpx (httpcore)``: ``httpx.AsyncClient`` on its default transport (what the SDK uses);
- ``httpx + aiohttp (watcher)``: the watcher's own client, :func:`watcher.transport.http_client`
  (``httpx_aiohttp``'s transport with the error mapping);
- ``aiohttp alone``: a bare ``aiohttp.ClientSession``, the floor under the previous one.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
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
WIDE = 50


@dataclass(frozen=True, slots=True)
class Floor:
    """One kind of request, repeated, through one client."""

    client: str
    what: str
    in_flight: int
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
            "client": self.client,
            "what": self.what,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "seconds": self.seconds,
            "cpu": self.cpu,
            "cpu_ms": self.cpu_ms,
        }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# One request: (path or URL, whether to stream the body) -> done.
Send = Callable[[str, bool], Awaitable[None]]


def _httpx_sender(client: httpx.AsyncClient, headers: dict[str, str]) -> Send:
    async def send(path: str, stream: bool) -> None:
        if stream:
            async with client.stream("GET", path) as response:
                async for _ in response.aiter_raw():
                    pass
        else:
            response = await client.get(path, headers=headers)
            response.json()
        response.raise_for_status()

    return send


def _aiohttp_sender(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> Send:
    async def send(path: str, stream: bool) -> None:
        url = path if path.startswith("http") else base + path
        if stream:
            async with session.get(url) as response:
                async for _ in response.content.iter_any():
                    pass
        else:
            async with session.get(url, headers=headers) as response:
                await response.json()
        response.raise_for_status()

    return send


async def _run(
    send: Send, paths: list[str], *, stream: bool, in_flight: int
) -> tuple[float, float]:
    limit = asyncio.Semaphore(in_flight)

    async def one(path: str) -> None:
        async with limit:
            await send(path, stream)

    for path in paths[:in_flight]:  # the connection pool warm
        await one(path)
    started, cpu = time.monotonic(), _cpu()
    await asyncio.gather(*(one(p) for p in paths))
    return time.monotonic() - started, _cpu() - cpu


Workload = tuple[str, list[str], bool, int]  # what, paths, stream, in flight


async def _measure(client: str, sim: SimProcess, workloads: list[Workload]) -> list[Floor]:
    headers = {"authorization": f"Bearer {sim.token}"}
    floors = []
    for what, paths, stream, in_flight in workloads:
        if client == HTTPX:
            async with httpx.AsyncClient(base_url=sim.base_url, timeout=60.0) as http:
                seconds, cpu = await _run(
                    _httpx_sender(http, headers), paths, stream=stream, in_flight=in_flight
                )
        elif client == WATCHER:
            async with _watcher_client(sim.base_url) as http:
                seconds, cpu = await _run(
                    _httpx_sender(http, headers), paths, stream=stream, in_flight=in_flight
                )
        else:
            async with aiohttp.ClientSession() as session:
                seconds, cpu = await _run(
                    _aiohttp_sender(session, sim.base_url, headers),
                    paths,
                    stream=stream,
                    in_flight=in_flight,
                )
        floors.append(Floor(client, what, in_flight, len(paths), seconds, cpu))
    return floors


def _watcher_client(base_url: str) -> httpx.AsyncClient:
    from watcher.settings import load_settings  # noqa: PLC0415 - only this candidate needs it
    from watcher.transport import http_client  # noqa: PLC0415

    http = http_client(load_settings({"WATCHER_API_TOKEN": "mhk_live_bench"}))
    http.base_url = httpx.URL(base_url)
    return http


HTTPX = "httpx (httpcore)"
WATCHER = "httpx + aiohttp (watcher)"
AIOHTTP = "aiohttp alone"
CANDIDATES = (HTTPX, WATCHER, AIOHTTP)
GET = "API GET + JSON"
DOWNLOAD = "200 KB download, streamed"


def run(requests: int, candidates: tuple[str, ...] = CANDIDATES) -> list[Floor]:
    """For every candidate: ``requests`` API GETs at 8 and at 50 in flight, then ``requests``
    200 KB downloads, on one simulator (each download URL is fetched once per candidate)."""
    with SimProcess(SIM_CONFIG) as sim:
        queued = sim.create(requests, QUEUED_FOREVER)
        gets = [f"/v1/image-projects/{pid}" for pid in queued]
        done = sim.create(requests, COMPLETE)
        urls = [sim.download_url(pid) for pid in done]
        workloads: list[Workload] = [
            (GET, gets, False, CONCURRENCY),
            (GET, gets, False, WIDE),
            (DOWNLOAD, urls, True, CONCURRENCY),
        ]
        floors: list[Floor] = []
        for client in candidates:
            floors.extend(asyncio.run(_measure(client, sim, workloads)))
        return floors


def find(floors: list[Floor], client: str, what: str, in_flight: int = CONCURRENCY) -> Floor:
    """The measurement of ``what`` through ``client``."""
    return next(
        f for f in floors if f.client == client and f.what == what and f.in_flight == in_flight
    )


def table(floors: list[Floor]) -> str:
    """One row per client and kind of request."""
    rows = [
        (
            f.client,
            f.what,
            str(f.in_flight),
            str(f.requests),
            fmt(ratio(f.requests, f.seconds), 0),
            fmt(f.cpu_ms, 3),
        )
        for f in floors
    ]
    headers = ("client", "request", "in flight", "requests", "requests/s", "CPU ms / request")
    return markdown_table(headers, rows)
