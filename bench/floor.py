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
- ``aiohttp alone``: a bare ``aiohttp.ClientSession``, the floor under the previous one;
- ``watcher get_project``: the API GETs only, through the watcher's own
  :meth:`watcher.api.MagicHourClient.get_project` on that client, wired as the daemon wires it
  (its throttle out of the way, metrics on): the floor plus what the API client adds per GET
  (headers, the throttle, retries, the body's cap, the project's validation).

``python bench/floor.py [--requests N] [--rounds R] [--candidate C ...]`` runs the GETs alone
(no downloads) R times and prints each round's table and the least CPU per GET of each
candidate: the least is the round the machine's other load disturbed least. To compare two
versions of the watcher, run it from each tree (``PYTHONPATH=TREE python bench/floor.py
--candidate 'watcher get_project'``), alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.append(str(Path(__file__).resolve().parent.parent))

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


def _api_sender(http: httpx.AsyncClient, sim: SimProcess) -> Send:
    """``get_project`` of the watcher's API client, as :func:`watcher.wiring.build` makes it."""
    from pydantic import SecretStr  # noqa: PLC0415 - only this candidate needs the watcher

    from watcher.api import MagicHourClient  # noqa: PLC0415
    from watcher.metrics import Metrics  # noqa: PLC0415
    from watcher.models import Kind, ProjectRef  # noqa: PLC0415
    from watcher.throttle import Throttle  # noqa: PLC0415

    api = MagicHourClient(
        http,
        base_url=sim.base_url,
        token=SecretStr(sim.token),
        throttle=Throttle(rate=1_000_000.0, concurrency=WIDE),
        metrics=Metrics(),
        user_agent="magic-hour-watcher/bench (replica floor)",
    )

    async def send(path: str, stream: bool) -> None:
        del stream  # GETs only
        await api.get_project(ProjectRef(Kind.IMAGE, path.rsplit("/", 1)[1]))

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
        elif client == API:
            if stream:
                continue  # the API client makes no downloads
            async with _watcher_client(sim.base_url) as http:
                seconds, cpu = await _run(
                    _api_sender(http, sim), paths, stream=stream, in_flight=in_flight
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
API = "watcher get_project"
CANDIDATES = (HTTPX, WATCHER, AIOHTTP, API)
GET = "API GET + JSON"
DOWNLOAD = "200 KB download, streamed"


def run(
    requests: int, candidates: tuple[str, ...] = CANDIDATES, *, downloads: bool = True
) -> list[Floor]:
    """For every candidate: ``requests`` API GETs at 8 and at 50 in flight, then (with
    ``downloads``) ``requests`` 200 KB downloads, on one simulator (each download URL is
    fetched once per candidate)."""
    with SimProcess(SIM_CONFIG) as sim:
        queued = sim.create(requests, QUEUED_FOREVER)
        gets = [f"/v1/image-projects/{pid}" for pid in queued]
        workloads: list[Workload] = [
            (GET, gets, False, CONCURRENCY),
            (GET, gets, False, WIDE),
        ]
        if downloads:
            done = sim.create(requests, COMPLETE)
            urls = [sim.download_url(pid) for pid in done]
            workloads.append((DOWNLOAD, urls, True, CONCURRENCY))
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


def main() -> int:
    """Run the rounds of GETs and print each round's table and the least CPU per GET."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--candidate", action="append", choices=CANDIDATES, dest="candidates")
    args = parser.parse_args()
    candidates = tuple(args.candidates or CANDIDATES)
    import watcher  # noqa: PLC0415

    print(f"watcher from {Path(watcher.__file__).parent}")
    rounds = []
    for r in range(args.rounds):
        rounds.append(run(args.requests, candidates, downloads=False))
        print(f"round {r}:\n{table(rounds[-1])}", flush=True)
    for client in candidates:
        for in_flight in (CONCURRENCY, WIDE):
            least = min(find(f, client, GET, in_flight).cpu_ms for f in rounds)
            print(f"least: {client}, {in_flight} in flight: {least:.3f} ms CPU per GET")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
