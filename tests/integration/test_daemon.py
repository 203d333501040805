"""The daemon end to end, in-process, against the real simulator over HTTP and real SQLite."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from structlog.testing import capture_logs

from tests.support import Intercepted, watcher_settings
from watcher import clock
from watcher.backoff import GiveUpLimits
from watcher.daemon import Daemon, Outcome
from watcher.models import Kind, RemoteStatus, State
from watcher.settings import Settings
from watcher.simulator.config import Faults, SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator
from watcher.simulator.timeline import ProjectOverrides
from watcher.store import Claim, InMemoryStore, OutputState, SQLiteStore
from watcher.wiring import build
from watcher.workflow import WorkflowLimits

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]

EXPECTED_WITH_DELETE = {
    RemoteStatus.COMPLETE: State.DELETED,
    RemoteStatus.ERROR: State.ERROR,
    RemoteStatus.CANCELED: State.CANCELED,
}


def create_mixed(sim: Simulator, images: int, videos: int, audios: int) -> list[str]:
    """Create projects of every kind; return ``kind:id`` specs."""
    specs = []
    for kind, count in ((Kind.IMAGE, images), (Kind.VIDEO, videos), (Kind.AUDIO, audios)):
        specs += [f"{kind.value}:{pid}" for pid in sim.create_projects(kind, count)]
    return specs


async def run_daemon(daemon: Daemon, limit: float = 45) -> Outcome:
    return await asyncio.wait_for(daemon.run(), limit)


def assert_outputs_match(sim: Simulator, root: Path, project_id: str, kind: str) -> int:
    """Every output of the project is on disk, byte-identical; returns how many."""
    truth = sim.truth(project_id)
    for out in truth.outputs:
        folder = root / "downloads" / kind / project_id
        (path,) = folder.glob(f"{out.index}-*")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == out.sha256
        assert path.stat().st_size == out.size
    return len(truth.outputs)


def assert_delete_after_downloads(sim: Simulator) -> None:
    """No DELETE reached the simulator before every output of that project was fully served."""
    done: dict[str, set[int]] = {}
    for event in sim.events():
        if event.what == "download" and event.completed:
            assert event.project_id is not None
            assert event.index is not None
            done.setdefault(event.project_id, set()).add(event.index)
        if event.what == "delete" and event.status_code == 204:
            assert event.project_id is not None
            wanted = {o.index for o in sim.truth(event.project_id).outputs}
            assert done.get(event.project_id, set()) >= wanted, event


async def test_two_hundred_projects_end_in_the_right_states(serve: Serve, tmp_path: Path) -> None:
    """200 mixed projects end as the simulator decided, with every output saved byte for byte."""
    server = serve()
    sim = server.simulator
    specs = create_mixed(sim, 120, 40, 40)
    settings = watcher_settings(
        server, tmp_path, projects=" ".join(specs), delete_after_download="true"
    )
    store = SQLiteStore(str(tmp_path / "watcher.db"), exclusive=True)
    with capture_logs() as logs:
        outcome = await run_daemon(build(settings, store, until_done=True))

    async with SQLiteStore(str(tmp_path / "watcher.db")) as reader:
        page = await reader.list_projects(limit=1000)
        assert len(page.projects) == 200
        saved_outputs = 0
        for p in page.projects:
            truth = sim.truth(p.id)
            assert p.state == EXPECTED_WITH_DELETE[truth.timeline.final_status], p
            if p.state == State.DELETED:
                saved_outputs += assert_outputs_match(sim, tmp_path, p.id, p.kind.value)
                assert all(o.state == OutputState.SAVED for o in await reader.outputs(p.id))
            if p.state == State.ERROR:
                assert truth.timeline.error is not None
                assert p.error_code == truth.timeline.error.code
    expected_code = 0 if all(p.state == State.DELETED for p in page.projects) else 1
    assert outcome.exit_code == expected_code
    assert saved_outputs > 100
    assert_delete_after_downloads(sim)
    assert not any(e.authorization_sent for e in sim.events() if e.what == "download")
    assert not list((tmp_path / "downloads").rglob("*.part"))
    names = Counter(entry["event"] for entry in logs)
    assert names["download_saved"] == saved_outputs
    assert names["project_deleted"] == sum(1 for p in page.projects if p.state == State.DELETED)


async def test_restart_in_the_middle_loses_and_refetches_nothing(
    serve: Serve, tmp_path: Path
) -> None:
    """Stopping the daemon halfway and starting it again downloads every output exactly once."""
    server = serve(
        SimConfig(
            seed=5,
            queued_seconds=(0.1, 0.5),
            rendering_seconds=(0.2, 2.5),
            error_rate=0.0,
            cancel_rate=0.0,
            output_bytes=(1_000, 20_000),
        )
    )
    sim = server.simulator
    specs = create_mixed(sim, 40, 10, 10)
    settings = watcher_settings(server, tmp_path, projects=" ".join(specs))
    db = str(tmp_path / "watcher.db")

    first = build(settings, SQLiteStore(db, exclusive=True), until_done=True)

    async def stop_when_some_saved() -> None:
        while sum(1 for e in sim.events() if e.what == "download" and e.completed) < 15:
            await asyncio.sleep(0.02)
        first.request_stop()

    stopper = asyncio.create_task(stop_when_some_saved())
    await run_daemon(first)
    await stopper
    async with SQLiteStore(db) as reader:
        counts = await reader.count_by_state()
    assert counts.get(State.SAVED, 0) >= 1
    assert counts.get(State.POLLING, 0) + counts.get(State.DOWNLOADING, 0) >= 1

    second = await run_daemon(build(settings, SQLiteStore(db, exclusive=True), until_done=True))
    assert second.exit_code == 0
    assert second.counts == {State.SAVED: 60}
    completed = Counter(
        (e.project_id, e.index) for e in sim.events() if e.what == "download" and e.completed
    )
    expected = {
        (pid, o.index) for pid in (s.split(":")[1] for s in specs) for o in sim.truth(pid).outputs
    }
    assert set(completed) == expected
    assert max(completed.values()) == 1
    for spec in specs:
        kind, pid = spec.split(":")
        assert_outputs_match(sim, tmp_path, pid, kind)


async def test_not_found_and_unauthorized_end_clearly(serve: Serve, tmp_path: Path) -> None:
    """A 404 project ends not_found; a refused token stops polling with exit code 3 and is
    recorded on every project it holds up."""
    server = serve()
    (good,) = server.simulator.create_projects(
        Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    settings = watcher_settings(server, tmp_path, projects=f"{good} cmissing0000000000000000")
    outcome = await run_daemon(
        build(settings, SQLiteStore(str(tmp_path / "a.db")), until_done=True)
    )
    assert outcome.counts == {State.SAVED: 1, State.NOT_FOUND: 1}
    assert outcome.exit_code == 1

    others = server.simulator.create_projects(Kind.AUDIO, 3)
    seen_before = len(server.simulator.events())
    bad = watcher_settings(
        server,
        tmp_path,
        projects=" ".join([good, *(f"audio:{pid}" for pid in others)]),
        api_token="mhk_live_wrong",
        database_url=f"sqlite:///{tmp_path / 'b.db'}",
    )
    with capture_logs() as logs:
        outcome = await run_daemon(build(bad, SQLiteStore(str(tmp_path / "b.db")), until_done=True))
    assert outcome.exit_code == 3
    assert [e for e in logs if e["event"] == "api_unauthorized"]
    gets = [e for e in server.simulator.events()[seen_before:] if e.what == "get"]
    assert {e.status_code for e in gets} == {401}
    # One look at each project claimed together at most, then silence: no retry storm.
    assert len(gets) == len({e.project_id for e in gets}) <= 4
    assert "mhk_live_wrong" not in repr(logs)
    async with SQLiteStore(str(tmp_path / "b.db")) as store:
        page = await store.list_projects(limit=10)
    assert len(page.projects) == 4  # every project, not only the one that met the 401, says so
    for p in page.projects:
        assert p.state == State.POLLING  # resumable once the token is fixed: nothing is lost
        assert p.failure is not None
        assert p.failure.startswith("unauthorized: Magic Hour refused the API token")


async def test_a_restart_keeps_what_the_schedule_learned(serve: Serve, tmp_path: Path) -> None:
    """Render durations learned before a restart are read back from the store at start-up."""
    server = serve(
        SimConfig(
            seed=8,
            # Long enough that the first poll finds every project in progress even on a loaded
            # machine: only a render seen in progress is learned from.
            queued_seconds=(1.0, 1.5),
            rendering_seconds=(0.3, 0.8),
            error_rate=0.0,
            cancel_rate=0.0,
            output_bytes=(1_000, 2_000),
        )
    )
    specs = create_mixed(server.simulator, 15, 1, 3)
    settings = watcher_settings(server, tmp_path, projects=" ".join(specs))
    db = str(tmp_path / "watcher.db")
    first = build(settings, SQLiteStore(db, exclusive=True), until_done=True)
    assert (await run_daemon(first)).exit_code == 0
    learned = {kind: first.render_stats.count(kind) for kind in Kind}
    assert learned[Kind.IMAGE] >= 12  # enough for a window: the next start is not cold
    assert learned[Kind.AUDIO] >= 1

    second = build(settings, SQLiteStore(db, exclusive=True), until_done=True)
    with capture_logs() as logs:
        assert (await run_daemon(second)).exit_code == 0
    assert {kind: second.render_stats.count(kind) for kind in Kind} == learned
    assert second.render_stats.window(Kind.IMAGE) == first.render_stats.window(Kind.IMAGE)
    (started,) = [e for e in logs if e["event"] == "daemon_started"]
    assert started["render_samples"] == {k.value: n for k, n in learned.items()}


LEASE = 2.0


def short_lease(settings: Settings) -> Settings:
    """``settings`` with a lease shorter than the settings allow, to keep these tests short."""
    return settings.model_copy(update={"lease_seconds": LEASE})


def slow_api(seed: int, seconds: float) -> SimConfig:
    """A simulator whose every answer stalls ``seconds`` (longer than the shortest lease)."""
    return SimConfig(
        seed=seed,
        queued_seconds=(0.0, 0.0),
        rendering_seconds=(0.0, 0.0),
        error_rate=0.0,
        cancel_rate=0.0,
        output_bytes=(1_000, 1_000),
        faults=Faults(rate_slow=1.0, slow_seconds=seconds),
    )


async def until(condition: Callable[[], bool], limit: float) -> None:
    """Wait (polling every 20 ms) until ``condition()`` holds, failing after ``limit`` seconds."""
    deadline = asyncio.get_running_loop().time() + limit
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def test_work_stops_at_once_when_another_replica_takes_the_lease(
    serve: Serve, tmp_path: Path
) -> None:
    """Renewals that find the lease taken cancel the work, which then writes nothing."""
    server = serve(slow_api(seed=21, seconds=4.0))
    (pid,) = server.simulator.create_projects(Kind.IMAGE, 1)
    settings = short_lease(watcher_settings(server, tmp_path, projects=pid))
    store = InMemoryStore()
    daemon = build(settings, store)
    with capture_logs() as logs:
        running = asyncio.create_task(daemon.run())
        await until(lambda: daemon.dispatcher.working_on(pid), 5)
        (thief,) = await store.claim_due(
            now=clock.now() + LEASE + 0.1, limit=1, owner="thief", lease_seconds=600
        )
        # Two renewals refused, then stopped:
        await until(lambda: not daemon.dispatcher.working_on(pid), 3)
        daemon.request_stop()
        await running
    lost = [e for e in logs if e["event"] == "lease_lost"]
    assert [(e["project_id"], e.get("during")) for e in lost] == [(pid, "renewal")]
    p = await store.get(pid)
    assert p is not None
    assert (p.lease_owner, p.lease_version, p.polls) == ("thief", thief.version, 0)


async def test_an_own_lease_that_ran_out_is_taken_up_by_a_fresh_task(
    serve: Serve, tmp_path: Path
) -> None:
    """When a renewal stalls until the lease has run out mid-work, the daemon cancels that work
    and carries on under its new lease at once, instead of idling a whole lease. (A renewal that
    fails is an outage instead: nothing is claimed until a renewal goes through.)"""

    class MissesRenewals(InMemoryStore):
        stalled = False

        async def renew(self, claim: Claim, *, now: float, lease_seconds: float) -> bool:
            if not self.stalled:  # the first renewal answers only after the lease ran out
                self.stalled = True
                await asyncio.sleep(LEASE)
            return await super().renew(claim, now=now, lease_seconds=lease_seconds)

    server = serve(slow_api(seed=22, seconds=2.5))
    (pid,) = server.simulator.create_projects(
        Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    settings = short_lease(watcher_settings(server, tmp_path, projects=pid))
    store = MissesRenewals()
    with capture_logs() as logs:
        outcome = await run_daemon(build(settings, store, until_done=True), limit=30)
    assert outcome.counts == {State.SAVED: 1}
    assert [e["event"] for e in logs].count("lease_expired_while_working") == 1
    gets = [e for e in server.simulator.events() if e.what == "get"]
    assert len(gets) == 2  # the one cut short by the expired lease, then the one that saw it done


def poisoned_gets(poisoned: set[str]) -> Intercepted:
    """The real network, except that GETs of the ``poisoned`` projects get a proxy's HTML page."""

    def answer(request: httpx.Request) -> httpx.Response | None:
        path = request.url.path
        if request.method == "GET" and "-projects/" in path and path.rsplit("/", 1)[-1] in poisoned:
            html = b"<html><body>502 Bad Gateway</body></html>"
            return httpx.Response(200, headers={"content-type": "text/html"}, content=html)
        return None

    return Intercepted(answer)


def rendering_for_a_while(seed: int) -> SimConfig:
    """Projects that stay in progress for a minute: their GETs succeed all along."""
    return SimConfig(
        seed=seed,
        queued_seconds=(0.0, 0.0),
        rendering_seconds=(60.0, 60.0),
        error_rate=0.0,
        cancel_rate=0.0,
    )


async def test_a_project_whose_get_keeps_failing_while_others_work_is_quarantined(
    serve: Serve, tmp_path: Path
) -> None:
    """Poison is set aside with its cause; the healthy project goes on being polled."""
    server = serve(rendering_for_a_while(seed=31))
    poison, healthy = server.simulator.create_projects(Kind.IMAGE, 2)
    settings = watcher_settings(server, tmp_path, projects=f"{poison} {healthy}")
    store = InMemoryStore()
    limits = WorkflowLimits(max_poll_failures=3)
    daemon = build(settings, store, transport=poisoned_gets({poison}), limits=limits)
    with capture_logs() as logs:
        running = asyncio.create_task(daemon.run())
        await until(lambda: any(e["event"] == "project_quarantined" for e in logs), 20)
        daemon.request_stop()
        await running
    p = await store.get(poison)
    assert p is not None
    assert p.state == State.QUARANTINED
    assert p.failure is not None
    assert p.failure.startswith("quarantined: its GET failed 3 times in a row")
    assert "not the API's JSON" in p.failure or "html" in p.failure.lower()
    h = await store.get(healthy)
    assert h is not None
    assert (h.state, h.failures) == (State.POLLING, 0)


async def test_no_project_is_quarantined_when_every_get_fails(serve: Serve, tmp_path: Path) -> None:
    """When nothing answers (an outage, not poison), projects keep their place and retry."""
    server = serve(rendering_for_a_while(seed=32))
    ids = server.simulator.create_projects(Kind.IMAGE, 2)
    settings = watcher_settings(server, tmp_path, projects=" ".join(ids))
    store = InMemoryStore()
    limits = WorkflowLimits(max_poll_failures=3)
    daemon = build(settings, store, transport=poisoned_gets(set(ids)), limits=limits)

    def failed_often() -> bool:
        return len(store.projects) == 2 and all(p.failures >= 5 for p in store.projects.values())

    running = asyncio.create_task(daemon.run())
    await until(failed_often, 30)
    daemon.request_stop()
    await running
    assert {p.state for p in store.projects.values()} == {State.POLLING}
    assert min(p.failures for p in store.projects.values()) >= 5


async def test_a_refused_download_link_is_renewed_with_a_fresh_get(
    serve: Serve, tmp_path: Path
) -> None:
    """A 403 on a signed URL means stale: the project is fetched again for fresh links, and
    every output is saved byte for byte."""
    server = serve(
        SimConfig(
            seed=33,
            queued_seconds=(0.0, 0.0),
            rendering_seconds=(0.1, 0.1),
            error_rate=0.0,
            cancel_rate=0.0,
            video_outputs=(2, 2),
        )
    )
    (pid,) = server.simulator.create_projects(Kind.VIDEO, 1)
    settings = watcher_settings(server, tmp_path, projects=f"video:{pid}")
    refused: list[str] = []

    def refuse_first_links(request: httpx.Request) -> httpx.Response | None:
        """Each output's first download gets 403, as a CDN refuses a stale signed link."""
        path = request.url.path
        if path.startswith("/sim/files/") and path not in refused:
            refused.append(path)
            return httpx.Response(403, content=b"<Error><Code>AccessDenied</Code></Error>")
        return None

    transport = Intercepted(refuse_first_links)
    with capture_logs() as logs:
        daemon = build(settings, InMemoryStore(), until_done=True, transport=transport)
        outcome = await run_daemon(daemon)
    assert outcome.counts == {State.SAVED: 1}
    assert len(refused) == 2  # the first link of each output was refused
    stale = [e for e in logs if e["event"] == "download_url_stale"]
    assert stale
    assert all("403" in e["reason"] for e in stale)
    gets = [e for e in server.simulator.events() if e.what == "get"]
    assert len(gets) >= 2  # the first GET, and one for fresh links
    assert_outputs_match(server.simulator, tmp_path, pid, "video")


class ListsOneOutputLate(httpx.AsyncBaseTransport):
    """The real network, except that the first complete answer of a project's GET leaves its
    last output out (an API still collecting them), and the first download is refused with a
    403: the fresh GET that follows lists every output."""

    def __init__(self) -> None:
        self._network = httpx.AsyncHTTPTransport()
        self.trimmed = 0
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/sim/files/") and not self.refused:
            self.refused += 1
            return httpx.Response(403, content=b"<Error><Code>AccessDenied</Code></Error>")
        response = await self._network.handle_async_request(request)
        if request.method != "GET" or "-projects/" not in path or self.trimmed:
            return response
        body = json.loads(await response.aread())
        if body.get("status") != "complete":
            return httpx.Response(response.status_code, json=body)
        self.trimmed += 1
        body["downloads"] = body["downloads"][:-1]
        return httpx.Response(response.status_code, json=body)

    async def aclose(self) -> None:
        await self._network.aclose()


@pytest.mark.parametrize("delete", [False, True])
async def test_an_output_first_listed_by_the_fresh_get_is_saved_too(
    serve: Serve, tmp_path: Path, delete: bool
) -> None:
    """When the GET for fresh links lists an output the first GET did not, it is downloaded
    before the project ends saved (or deleted), never recorded and left behind."""
    server = serve(
        SimConfig(
            seed=34,
            queued_seconds=(0.0, 0.0),
            rendering_seconds=(0.0, 0.0),
            error_rate=0.0,
            cancel_rate=0.0,
            video_outputs=(3, 3),
            output_bytes=(1_000, 5_000),
        )
    )
    (pid,) = server.simulator.create_projects(Kind.VIDEO, 1)
    settings = watcher_settings(
        server, tmp_path, projects=f"video:{pid}", delete_after_download=str(delete).lower()
    )
    transport = ListsOneOutputLate()
    store = InMemoryStore()
    outcome = await run_daemon(build(settings, store, until_done=True, transport=transport))
    assert (transport.trimmed, transport.refused) == (1, 1)
    assert outcome.counts == {State.DELETED if delete else State.SAVED: 1}
    assert [o.state for o in await store.outputs(pid)] == [OutputState.SAVED] * 3
    assert assert_outputs_match(server.simulator, tmp_path, pid, "video") == 3
    if delete:
        assert_delete_after_downloads(server.simulator)


class CutsEveryFirstTransfer:
    """A proxy on 127.0.0.1 in front of the simulator that cuts the first transfer of every
    output half way (its headers promise the whole body), and relays everything else as is.
    The simulator signs links for the host it was asked through, so they lead here too."""

    def __init__(self, upstream: SimulatorServer) -> None:
        self.upstream = httpx.URL(upstream.base_url)
        self.cut: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                port = proxy.upstream.port
                assert port is not None
                conn = http.client.HTTPConnection(proxy.upstream.host, port, timeout=10)
                conn.request("GET", self.path, headers=dict(self.headers.items()))
                answer = conn.getresponse()
                body = answer.read()
                conn.close()
                path = urlsplit(self.path).path
                cut = path.startswith("/sim/files/") and path not in proxy.cut
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in {"connection", "transfer-encoding", "date", "server"}:
                        self.send_header(name, value)
                self.end_headers()
                if cut:
                    proxy.cut.append(path)
                    body = body[: len(body) // 2]
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        """Where the watcher should send its API calls."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


async def test_twelve_outputs_each_cut_once_are_all_saved(serve: Serve, tmp_path: Path) -> None:
    """A transfer cut after gaining bytes is progress: twelve outputs whose first transfer
    breaks half way each resume and are all saved, however many cuts that makes in all."""
    server = serve(
        SimConfig(
            seed=35,
            queued_seconds=(0.0, 0.0),
            rendering_seconds=(0.0, 0.0),
            error_rate=0.0,
            cancel_rate=0.0,
            image_outputs=(12, 12),
            output_bytes=(4_000, 8_000),
        )
    )
    (pid,) = server.simulator.create_projects(Kind.IMAGE, 1)
    proxy = CutsEveryFirstTransfer(server)
    try:
        settings = watcher_settings(server, tmp_path, projects=pid, api_base_url=proxy.base_url)
        store = InMemoryStore()
        outcome = await run_daemon(build(settings, store, until_done=True))
    finally:
        proxy.stop()
    assert len(proxy.cut) == 12
    assert outcome.counts == {State.SAVED: 1}
    assert assert_outputs_match(server.simulator, tmp_path, pid, "image") == 12
    resumed = [e for e in server.simulator.events() if e.what == "download" and e.range]
    assert len(resumed) == 12  # each cut transfer resumed where it broke


def cdn_down_for(requests: int) -> Intercepted:
    """The real network, except that the first ``requests`` downloads meet a CDN that answers
    503 (an outage), after which it serves again."""
    refused: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.startswith("/sim/files/") and len(refused) < requests:
            refused.append(request.url.path)
            return httpx.Response(503, content=b"<html>503 Service Unavailable</html>")
        return None

    return Intercepted(answer)


async def test_a_cdn_outage_is_waited_out_with_backoff(serve: Serve, tmp_path: Path) -> None:
    """Downloads failing again and again during an outage back off, however many tries that
    takes, and the project is saved once the CDN serves again."""
    server = serve(
        SimConfig(
            seed=36,
            queued_seconds=(0.0, 0.0),
            rendering_seconds=(0.0, 0.0),
            error_rate=0.0,
            cancel_rate=0.0,
            output_bytes=(1_000, 2_000),
        )
    )
    (pid,) = server.simulator.create_projects(Kind.AUDIO, 1)
    settings = watcher_settings(server, tmp_path, projects=f"audio:{pid}")
    with capture_logs() as logs:
        daemon = build(settings, InMemoryStore(), until_done=True, transport=cdn_down_for(12))
        outcome = await run_daemon(daemon)
    assert outcome.counts == {State.SAVED: 1}
    retries = [e for e in logs if e["event"] == "project_retry_scheduled"]
    assert [e["failures"] for e in retries] == list(range(1, 13))
    assert all("503" in e["cause"] for e in retries)
    assert_outputs_match(server.simulator, tmp_path, pid, "audio")


async def test_a_download_that_never_progresses_is_given_up(serve: Serve, tmp_path: Path) -> None:
    """Tries that gain nothing for as long as the limits allow end the project failed, with
    the count and the last cause."""
    server = serve(
        SimConfig(
            seed=37,
            queued_seconds=(0.0, 0.0),
            rendering_seconds=(0.0, 0.0),
            error_rate=0.0,
            cancel_rate=0.0,
        )
    )
    (pid,) = server.simulator.create_projects(Kind.AUDIO, 1)
    settings = watcher_settings(server, tmp_path, projects=f"audio:{pid}")
    store = InMemoryStore()
    limits = WorkflowLimits(give_up=GiveUpLimits(stalled_tries=4, stalled_seconds=0.0))
    daemon = build(settings, store, until_done=True, transport=cdn_down_for(10_000), limits=limits)
    outcome = await run_daemon(daemon)
    assert outcome.counts == {State.FAILED: 1}
    p = await store.get(pid)
    assert p is not None
    assert p.failure is not None
    assert p.failure.startswith("outputs could not be saved: 4 tries in a row over")
    assert "503" in p.failure


async def test_one_missing_project_among_good_ones_is_no_base_url_alarm(
    serve: Serve, tmp_path: Path
) -> None:
    """A single 404 among projects that exist is logged as that project's ``not_found`` (a
    warning with its path), never as a suspect ``WATCHER_API_BASE_URL``."""
    server = serve()
    good = server.simulator.create_projects(
        Kind.IMAGE, 2, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    settings = watcher_settings(server, tmp_path, projects=" ".join([*good, "cmissing00000001"]))
    with capture_logs() as logs:
        outcome = await run_daemon(
            build(settings, SQLiteStore(str(tmp_path / "w.db")), until_done=True)
        )
    assert outcome.counts == {State.SAVED: 2, State.NOT_FOUND: 1}
    (missing,) = [e for e in logs if e["event"] == "project_not_found"]
    assert missing["log_level"] == "warning"
    assert missing["path"] == "/v1/image-projects/cmissing00000001"
    assert not [e for e in logs if e["event"] == "api_base_url_suspect"]
