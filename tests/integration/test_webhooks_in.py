"""Magic Hour webhooks into a running daemon over real TCP: verified events make their project
be polled at once; forged, tampered, stale or unsigned ones change nothing."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from tests.integration.http_support import CONTROL_TOKEN, eventually, free_port, running
from tests.support import watcher_settings
from watcher.daemon import Daemon
from watcher.models import Kind, RemoteStatus, State
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator
from watcher.simulator.timeline import ProjectOverrides
from watcher.store import SQLiteStore
from watcher.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signed_headers
from watcher.wiring import build

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]
SECRET = "whsec_integration"
CONFIG = SimConfig(seed=8, error_rate=0, cancel_rate=0, output_bytes=(1_000, 8_000))
# Still queued at the daemon's first GET, complete a moment later.
QUICKLY = ProjectOverrides(
    status=RemoteStatus.COMPLETE, queued_seconds=0.8, rendering_seconds=0.2, outputs=2
)
DONE = ProjectOverrides(status=RemoteStatus.COMPLETE, queued_seconds=0, rendering_seconds=0)
WAITING = ProjectOverrides(queued_seconds=600)


def make_daemon(server: SimulatorServer, root: Path, **extra: str) -> Daemon:
    """A daemon whose next poll after the first is at least 30 s away, with webhooks on."""
    values = {
        "control_token": CONTROL_TOKEN,
        "webhook_secret": SECRET,
        "poll_initial": "30",
        "poll_max": "60",
        **extra,
    }
    settings = watcher_settings(server, root, **values)
    return build(settings, SQLiteStore(str(root / "watcher.db"), exclusive=True))


def event_body(kind: Kind, pid: str, event: str = "completed") -> bytes:
    """A webhook body as Magic Hour sends it."""
    return json.dumps({"type": f"{kind.value}.{event}", "payload": {"id": pid}}).encode()


def gets(sim: Simulator, pid: str) -> int:
    """How many GETs of ``pid`` the simulator answered."""
    return sum(1 for e in sim.events() if e.what == "get" and e.project_id == pid)


async def deliver(
    client: httpx.AsyncClient, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    """POST a webhook delivery."""
    return await client.post(
        "/webhooks/magic-hour",
        content=body,
        headers={"content-type": "application/json", **headers},
    )


async def state_of(daemon: Daemon, pid: str) -> State | None:
    """The project's state in the store, or ``None`` if it is not tracked."""
    record = await daemon.store.get(pid)
    return None if record is None else record.state


async def is_state(daemon: Daemon, pid: str, state: State) -> bool:
    """Whether the project is in ``state`` in the store."""
    return await state_of(daemon, pid) == state


def completed_downloads(sim: Simulator, pid: str) -> list[int]:
    """The output indexes of ``pid`` whose download the simulator served completely."""
    return sorted(
        e.index
        for e in sim.events()
        if e.what == "download" and e.project_id == pid and e.completed and e.index is not None
    )


async def test_a_valid_event_gets_the_project_saved_after_one_more_get(
    serve: Serve, tmp_path: Path
) -> None:
    """A verified ``image.completed`` makes the simulator see a GET within a second although
    the next poll was 30 s away, and that one GET is enough to save the project."""
    server = serve(CONFIG)
    sim = server.simulator
    (pid,) = sim.create_projects(Kind.IMAGE, 1, QUICKLY)
    daemon = make_daemon(server, tmp_path, projects=pid)
    with capture_logs() as logs:
        async with running(daemon) as run:
            await eventually(lambda: gets(sim, pid) == 1)
            assert await is_state(daemon, pid, State.POLLING)
            await eventually(lambda: sim.truth(pid).status == RemoteStatus.COMPLETE)
            body = event_body(Kind.IMAGE, pid)
            sent_at = time.monotonic()
            answer = await deliver(run.client, body, signed_headers(SECRET, body, now=time.time()))
            assert answer.status_code == 200
            assert answer.json()["action"] == "expedited"
            await eventually(lambda: gets(sim, pid) == 2, within=1.0, step=0.005)
            assert time.monotonic() - sent_at < 1.0
            await eventually(lambda: is_state(daemon, pid, State.SAVED), within=5)
    assert gets(sim, pid) == 2
    assert completed_downloads(sim, pid) == [0, 1]
    (received,) = [e for e in logs if e["event"] == "webhook_received"]
    assert (received["action"], received["type"], received["project_id"]) == (
        "expedited",
        "image.completed",
        pid,
    )
    assert SECRET not in repr(logs)


def forged(body: bytes, variant: str) -> tuple[bytes, dict[str, str]]:
    """A delivery of ``body`` spoiled in one way."""
    now = time.time()
    headers = signed_headers(SECRET, body, now=now)
    if variant == "forged signature":
        return body, signed_headers("not-the-secret", body, now=now)
    if variant == "tampered body":
        return body.replace(b"completed", b"errored"), headers
    if variant == "old timestamp":
        return body, signed_headers(SECRET, body, now=now - 301)
    if variant == "missing signature":
        return body, {TIMESTAMP_HEADER: headers[TIMESTAMP_HEADER]}
    assert variant == "missing timestamp"
    return body, {SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}


VARIANTS = (
    "forged signature",
    "tampered body",
    "old timestamp",
    "missing signature",
    "missing timestamp",
)


async def test_a_bad_signature_is_refused_and_changes_nothing(serve: Serve, tmp_path: Path) -> None:
    """A forged signature, a tampered body, a replayed old timestamp or a missing header each
    get 401: the tracked project is not polled early and an unknown one is not auto-tracked."""
    server = serve(CONFIG)
    sim = server.simulator
    (pid,) = sim.create_projects(Kind.VIDEO, 1, WAITING)
    (stranger,) = sim.create_projects(Kind.VIDEO, 1, DONE)
    daemon = make_daemon(server, tmp_path, projects=f"video:{pid}", webhook_auto_track="true")
    with capture_logs() as logs:
        async with running(daemon) as run:
            await eventually(lambda: gets(sim, pid) == 1)
            before = await daemon.store.get(pid)
            for variant in VARIANTS:
                for target in (pid, stranger):
                    body = event_body(Kind.VIDEO, target)
                    answer = await deliver(run.client, *forged(body, variant))
                    assert answer.status_code == 401, variant
                    assert answer.json()["error"] == "invalid_signature"
            await asyncio.sleep(0.5)  # a valid event is acted on within milliseconds
            after = await daemon.store.get(pid)
            assert await daemon.store.get(stranger) is None
    assert gets(sim, pid) == 1
    assert gets(sim, stranger) == 0
    assert before is not None
    assert after == before
    reasons = Counter(e["reason"] for e in logs if e["event"] == "webhook_rejected")
    assert reasons == {
        "bad_signature": 4,
        "stale_timestamp": 2,
        "missing_header": 4,
    }
    assert not [e for e in logs if e["event"] == "webhook_received"]


async def test_duplicate_deliveries_are_harmless(serve: Serve, tmp_path: Path) -> None:
    """The same event delivered three times at once is accepted each time, and the project is
    still saved once, each output downloaded once."""
    server = serve(CONFIG)
    sim = server.simulator
    (pid,) = sim.create_projects(Kind.AUDIO, 1, QUICKLY)
    daemon = make_daemon(server, tmp_path, projects=f"audio:{pid}")
    async with running(daemon) as run:
        await eventually(lambda: gets(sim, pid) == 1)
        await eventually(lambda: sim.truth(pid).status == RemoteStatus.COMPLETE)
        body = event_body(Kind.AUDIO, pid)
        headers = signed_headers(SECRET, body, now=time.time())
        answers = await asyncio.gather(*(deliver(run.client, body, headers) for _ in range(3)))
        await eventually(lambda: is_state(daemon, pid, State.SAVED), within=5)
        late = await deliver(run.client, body, headers)
        await asyncio.sleep(0.3)
        assert await is_state(daemon, pid, State.SAVED)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert late.json() == {"action": "ignored", "note": "already final (saved)"}
    assert completed_downloads(sim, pid) == [0, 1]
    assert 2 <= gets(sim, pid) <= 4


async def test_auto_track_on_tracks_and_saves_an_unknown_project(
    serve: Serve, tmp_path: Path
) -> None:
    """With WATCHER_WEBHOOK_AUTO_TRACK=true an event about an untracked project tracks it, of
    the event's kind, and one GET saves it."""
    server = serve(CONFIG)
    sim = server.simulator
    (pid,) = sim.create_projects(Kind.VIDEO, 1, DONE)
    daemon = make_daemon(server, tmp_path, webhook_auto_track="true")
    async with running(daemon) as run:
        body = event_body(Kind.VIDEO, pid)
        answer = await deliver(run.client, body, signed_headers(SECRET, body, now=time.time()))
        await eventually(lambda: is_state(daemon, pid, State.SAVED), within=5)
        record = await daemon.store.get(pid)
    assert answer.json() == {"action": "tracked", "note": None}
    assert record is not None
    assert record.kind == Kind.VIDEO
    assert gets(sim, pid) == 1


async def test_auto_track_off_ignores_unknown_projects_and_event_types(
    serve: Serve, tmp_path: Path
) -> None:
    """Without auto-tracking, an event about an untracked project, or of an unknown type, is
    acknowledged with 200 and changes nothing; a signed but unreadable event gets 400."""
    server = serve(CONFIG)
    sim = server.simulator
    (pid,) = sim.create_projects(Kind.IMAGE, 1, DONE)
    daemon = make_daemon(server, tmp_path)
    async with running(daemon) as run:
        now = time.time()
        body = event_body(Kind.IMAGE, pid)
        untracked = await deliver(run.client, body, signed_headers(SECRET, body, now=now))
        other = json.dumps({"type": "workspace.renamed", "payload": {}}).encode()
        unknown = await deliver(run.client, other, signed_headers(SECRET, other, now=now))
        bad = event_body(Kind.IMAGE, "../../etc")
        unreadable = await deliver(run.client, bad, signed_headers(SECRET, bad, now=now))
        await asyncio.sleep(0.5)
        tracked = (await run.client.get("/v1/projects")).json()["projects"]
    assert untracked.status_code == 200
    assert untracked.json()["action"] == "ignored"
    assert "WATCHER_WEBHOOK_AUTO_TRACK" in untracked.json()["note"]
    assert (unknown.status_code, unknown.json()["action"]) == (200, "ignored")
    assert (unreadable.status_code, unreadable.json()["error"]) == (400, "invalid_event")
    assert tracked == []
    assert gets(sim, pid) == 0


async def test_without_a_secret_the_webhook_route_is_off(serve: Serve, tmp_path: Path) -> None:
    """Without WATCHER_WEBHOOK_SECRET the route answers 404 webhooks_disabled, signed or not."""
    server = serve(CONFIG)
    daemon = make_daemon(server, tmp_path, webhook_secret="")
    async with running(daemon) as run:
        body = event_body(Kind.IMAGE, "cm1")
        answer = await deliver(run.client, body, signed_headers(SECRET, body, now=time.time()))
    assert (answer.status_code, answer.json()["error"]) == (404, "webhooks_disabled")
    assert "WATCHER_WEBHOOK_SECRET" in answer.json()["message"]


# --- the payload trusted: the simulator sends signed events with the project object ----------


def hooked_config(port: int, **extra: object) -> SimConfig:
    """``CONFIG``, sending its webhooks to a daemon's HTTP server on ``port``, 0.1 s late."""
    url = f"http://127.0.0.1:{port}/webhooks/magic-hour"
    values: dict[str, Any] = {
        "seed": 8,
        "error_rate": 0,
        "cancel_rate": 0,
        "output_bytes": (1_000, 8_000),
        "webhook_url": url,
        "webhook_secret": SECRET,
        "webhook_delay": 0.1,
        **extra,
    }
    return SimConfig(**values)


def delivered(sim: Simulator, pid: str) -> int:
    """How many webhook deliveries about ``pid`` the daemon answered 2xx."""
    return sum(
        1
        for e in sim.events()
        if e.what == "webhook" and e.project_id == pid and e.status_code == 200
    )


async def test_a_signed_payload_is_acted_on_without_another_get(
    serve: Serve, tmp_path: Path
) -> None:
    """With the simulator sending ``started`` then ``completed`` (or ``errored``) events, each
    carrying the project object, every project costs its first GET and no other: the
    ``started`` payload records ``rendering``, the ``completed`` one's download URLs are saved
    from, the ``errored`` one's error is recorded."""
    port = free_port()
    server = serve(hooked_config(port))
    sim = server.simulator

    def render(status: RemoteStatus) -> ProjectOverrides:
        return ProjectOverrides(status=status, queued_seconds=0.8, rendering_seconds=0.4, outputs=2)

    (image,) = sim.create_projects(Kind.IMAGE, 1, render(RemoteStatus.COMPLETE))
    (video,) = sim.create_projects(Kind.VIDEO, 1, render(RemoteStatus.COMPLETE))
    (failed,) = sim.create_projects(Kind.AUDIO, 1, render(RemoteStatus.ERROR))
    daemon = make_daemon(server, tmp_path, projects=f"image:{image} video:{video} audio:{failed}")
    with capture_logs() as logs:
        async with running(daemon, port=port):
            await eventually(lambda: is_state(daemon, image, State.SAVED), within=10)
            await eventually(lambda: is_state(daemon, video, State.SAVED), within=10)
            await eventually(lambda: is_state(daemon, failed, State.ERROR), within=10)
            # Logged by the simulator once answered, which may be just after the work it led to.
            await eventually(lambda: all(delivered(sim, p) == 2 for p in (image, video, failed)))
            error = await daemon.store.get(failed)
    for pid in (image, video, failed):
        assert gets(sim, pid) == 1, pid
        assert delivered(sim, pid) == 2, pid
    assert completed_downloads(sim, image) == [0, 1]
    assert completed_downloads(sim, video) == [0, 1]
    for index in (0, 1):
        (saved,) = (tmp_path / "downloads" / "image" / image).glob(f"{index}-*")
        assert saved.read_bytes() == sim.expected_bytes(image, index)
    assert error is not None
    truth = sim.truth(failed).timeline.error
    assert truth is not None
    assert (error.error_code, error.error_message) == (truth.code, truth.message)
    actions = Counter(e["action"] for e in logs if e["event"] == "webhook_received")
    assert actions == {"announced": 6}
    used = [(e["project_id"], e["status"]) for e in logs if e["event"] == "webhook_payload_used"]
    assert sorted(used) == sorted(
        [
            (image, "rendering"),
            (image, "complete"),
            (video, "rendering"),
            (video, "complete"),
            (failed, "rendering"),
            (failed, "error"),
        ]
    )


async def test_while_events_arrive_polling_relaxes_and_still_finds_a_cancel(
    serve: Serve, tmp_path: Path
) -> None:
    """A render that is canceled sends only ``started``. While that event is recent, the
    project is polled no sooner than WATCHER_WEBHOOK_FALLBACK_POLL after it (its normal cadence
    is ten times denser); once no event has come for that long, polling is back to normal and
    finds the cancel."""
    port = free_port()
    server = serve(hooked_config(port))
    sim = server.simulator
    canceled = ProjectOverrides(
        status=RemoteStatus.CANCELED, queued_seconds=0.3, rendering_seconds=3.0
    )
    (pid,) = sim.create_projects(Kind.IMAGE, 1, canceled)
    fallback = 1.5
    daemon = make_daemon(
        server,
        tmp_path,
        projects=pid,
        poll_initial="0.15",
        poll_max="5",
        webhook_fallback_poll=str(fallback),
    )
    async with running(daemon, port=port):
        await eventually(lambda: delivered(sim, pid) == 1, within=10)
        await eventually(lambda: is_state(daemon, pid, State.CANCELED), within=15)
    (started,) = [e.at for e in sim.events() if e.what == "webhook" and e.project_id == pid]
    polls = [e.at for e in sim.events() if e.what == "get" and e.project_id == pid]
    after = [at for at in polls if at > started]
    gaps = [b - a for a, b in itertools.pairwise([started, *after])]
    assert gaps[0] >= fallback * 0.95  # relaxed while the event is recent
    assert len(gaps) >= 3
    assert max(gaps[1:]) < fallback  # back to normal once events stopped
    assert delivered(sim, pid) == 1
