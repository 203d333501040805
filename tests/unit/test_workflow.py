"""The per-project workflow alone: the in-memory store, a scripted API and CDN behind
``httpx.MockTransport``, a fake clock. Every transition and fault path a project can take, each
asserted on what the store holds, the bytes on disk and the requests the API saw."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from tests.unit.fake_time import FakeClock
from watcher.api import MagicHourClient
from watcher.backoff import GiveUpLimits, PollPolicy
from watcher.downloader import Downloader
from watcher.errors import DiskFull, StoreError, StoreUnavailable, Unauthorized
from watcher.health import AUTH_RECHECK_SECONDS, PAYMENT_PAUSE_SECONDS, ApiHealth
from watcher.metrics import Metrics
from watcher.models import Kind, ProjectRef, RemoteStatus, State
from watcher.outage import StoreHealth
from watcher.receive import TransferLimits
from watcher.settings import load_settings
from watcher.store import Claim, InMemoryStore, OutputState, ProjectRecord
from watcher.throttle import Throttle
from watcher.workflow import Workflow, WorkflowLimits

pytestmark = pytest.mark.anyio

API = "https://api.test"
CDN = "https://cdn.test"
TOKEN = "mhk_live_unit_token"
START = 1_800_000_000.0
LEASE = 60.0
PID = "cwf0000000000000000000001"
OTHER = "cwf0000000000000000000002"

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def body(pid: str, status: str = "rendering", **extra: Any) -> dict[str, Any]:
    """A project as ``GET /v1/image-projects/{id}`` answers it."""
    return {"id": pid, "status": status, "enabled": True, "downloads": [], "error": None} | extra


def link(name: str, expires: float = START + 3600) -> dict[str, str]:
    """A download link of the CDN, expiring at ``expires``."""
    when = datetime.fromtimestamp(expires, UTC).isoformat()
    return {"url": f"{CDN}/{name}", "expires_at": when}


def complete(pid: str, *names: str, **extra: Any) -> dict[str, Any]:
    """A complete project listing ``names`` on the CDN."""
    return body(pid, "complete", downloads=[link(n) for n in names], **extra)


def content(name: str) -> bytes:
    """What the CDN serves as ``name``."""
    return hashlib.sha256(name.encode()).digest() * 64


class Cut(httpx.AsyncByteStream):
    """A body that breaks off after ``head`` (a connection reset mid-transfer)."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset by peer")


@dataclass
class Api:
    """The scripted Magic Hour API and CDN. Each project's GETs answer in turn (the last one
    repeats); a CDN file answers its scripted statuses in turn, then its bytes."""

    gets: dict[str, list[httpx.Response]] = field(default_factory=dict)
    deletes: dict[str, int] = field(default_factory=dict)
    cdn: dict[str, list[int]] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)
    cut: set[str] = field(default_factory=set)  # files whose next transfer is cut midway
    on_get: Callable[[str], Awaitable[None]] | None = None

    def answer(self, pid: str, *answers: dict[str, Any] | int) -> None:
        """Script the GETs of ``pid``: a body (200) or a bare status."""
        self.gets[pid] = [
            httpx.Response(a, json={"message": "no"})
            if isinstance(a, int)
            else httpx.Response(200, json=a)
            for a in answers
        ]

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, str(request.url)))
        url = str(request.url)
        if url.startswith(CDN):
            name = request.url.path.lstrip("/")
            statuses = self.cdn.get(name, [])
            if statuses:
                return httpx.Response(statuses.pop(0))
            if name in self.cut:
                self.cut.discard(name)
                size = {"content-length": str(len(content(name)))}
                return httpx.Response(200, headers=size, stream=Cut(content(name)[:1000]))
            return httpx.Response(200, content=content(name))
        pid = request.url.path.rsplit("/", 1)[-1]
        if request.method == "DELETE":
            return httpx.Response(self.deletes.get(pid, 204))
        if self.on_get is not None:
            await self.on_get(pid)
        answers = self.gets[pid]
        return answers.pop(0) if len(answers) > 1 else answers[0]

    def count(self, method: str, prefix: str = "") -> int:
        """How many ``method`` requests went to URLs starting with ``prefix``."""
        return sum(1 for m, u in self.seen if m == method and u.startswith(prefix))


@dataclass
class Rig:
    """A workflow over the in-memory store, the scripted API and a fake clock."""

    store: InMemoryStore
    api: Api
    clock: FakeClock
    health: ApiHealth
    store_health: StoreHealth
    workflow: Workflow
    root: Path
    store_failures: list[str]

    async def track(self, pid: str = PID, *, delete: bool = False) -> None:
        ref = ProjectRef(Kind.IMAGE, pid)
        await self.store.track([ref], now=self.clock.now(), delete_after_download=delete)

    async def claim(self, pid: str = PID) -> Claim:
        """Claim ``pid`` once it is due (the clock moves to its due time)."""
        record = await self.store.get(pid)
        assert record is not None
        self.clock.time = max(self.clock.time, record.due_at)
        claims = await self.store.claim_due(
            now=self.clock.now(), limit=100, owner="me", lease_seconds=LEASE
        )
        (claim,) = [c for c in claims if c.id == pid]
        return claim

    async def step(self, pid: str = PID) -> ProjectRecord:
        """Claim ``pid``, run its work once, return what the store then holds."""
        await self.workflow.run(await self.claim(pid))
        return await self.record(pid)

    async def record(self, pid: str = PID) -> ProjectRecord:
        record = await self.store.get(pid)
        assert record is not None
        return record

    def file(self, name: str, pid: str = PID) -> Path:
        (path,) = (self.root / "image" / pid).glob(f"*{name}")
        return path


class Refusing(Downloader):
    """A downloader on a full disk."""

    async def fetch(self, url: str, final: Path, on_verified: Any) -> Any:
        raise DiskFull(f"no space left on the device for {final.name}")


def rig_for(
    tmp_path: Path,
    *,
    store: InMemoryStore | None = None,
    limits: WorkflowLimits | None = None,
    notify: bool = False,
    downloader: type[Downloader] = Downloader,
) -> tuple[Rig, httpx.AsyncClient]:
    """A rig over ``tmp_path`` (the download folder) and the client it is to be closed with."""
    clock = FakeClock(START)
    api = Api()
    store = store or InMemoryStore()
    metrics = Metrics()
    settings = load_settings({"WATCHER_API_TOKEN": TOKEN, "WATCHER_POLL_INITIAL": "2"})
    health = ApiHealth(settings, metrics=metrics, now=clock.now)
    http = httpx.AsyncClient(transport=httpx.MockTransport(api.handler), follow_redirects=True)
    # On the fake clock: a refusal's pause is waited out at once, by moving the clock.
    throttle = Throttle(rate=1000, concurrency=8, now=clock.now, sleep=clock.sleep)
    client = MagicHourClient(
        http, base_url=API, token=SecretStr(TOKEN), throttle=throttle, max_attempts=1
    )
    health.throttle = throttle
    store_health = StoreHealth(initial=0.01, maximum=0.02, rng=random.Random(1))
    failures: list[str] = []

    def store_failed(exc: StoreError, *, during: str) -> None:
        failures.append(during)
        store_health.failed(exc, during=during)
        store_health.recovered()  # the store answers again at once

    workflow = Workflow(
        store=store,
        api=client,
        downloader=downloader(http, limits=TransferLimits(min_rate=0)),
        health=health,
        store_health=store_health,
        policy=PollPolicy(2.0, 60.0),
        limits=limits or WorkflowLimits(),
        lease_seconds=LEASE,
        download_dir=tmp_path,
        stopping=asyncio.Event(),
        on_store_failed=store_failed,
        metrics=metrics,
        notify=notify,
        now=clock.now,
        rng=random.Random(7),
    )
    rig = Rig(store, api, clock, health, store_health, workflow, tmp_path, failures)
    return rig, http


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made, http = rig_for(tmp_path)
    async with http:
        yield made


# --- polling ----------------------------------------------------------------------------------


async def test_a_rendering_project_is_rescheduled_and_released(rig: Rig) -> None:
    """running -> rescheduled: the status is recorded, the next poll is due later, the lease is
    given back, and no failure is counted."""
    await rig.track()
    rig.api.answer(PID, body(PID, "rendering"))
    with capture_logs() as logs:
        record = await rig.step()
    assert (record.state, record.remote_status, record.polls) == (
        State.POLLING,
        RemoteStatus.RENDERING,
        1,
    )
    assert record.lease_owner is None
    assert record.due_at > rig.clock.now()
    assert record.failures == 0
    changed = [e for e in logs if e["event"] == "project_status_changed"]
    assert [(e["status"], e["previous"]) for e in changed] == [("rendering", None)]


async def test_a_complete_project_is_downloaded_and_saved(rig: Rig) -> None:
    """complete -> download -> saved: every output's bytes are on disk under its final name,
    each output is recorded saved, and no temporary file is left."""
    await rig.track()
    rig.api.answer(PID, complete(PID, "a.png", "b.png"))
    record = await rig.step()
    assert record.state == State.SAVED
    assert record.lease_owner is None
    outputs = await rig.store.outputs(PID)
    assert [o.state for o in outputs] == [OutputState.SAVED, OutputState.SAVED]
    assert rig.file("a.png").read_bytes() == content("a.png")
    assert rig.file("b.png").read_bytes() == content("b.png")
    assert not list(rig.root.rglob("*.part"))
    assert rig.api.count("DELETE") == 0


async def test_delete_after_download_deletes_only_once_every_output_is_saved(rig: Rig) -> None:
    """delete_after_download -> deleted: the DELETE is the last request, sent when every file
    is on disk and recorded saved."""
    await rig.track(delete=True)
    rig.api.answer(PID, complete(PID, "a.png"))
    record = await rig.step()
    assert record.state == State.DELETED
    assert rig.api.seen[-1][0] == "DELETE"
    assert rig.api.count("GET", CDN) == 1
    assert rig.file("a.png").read_bytes() == content("a.png")


async def test_a_delete_answered_404_counts_as_done(rig: Rig) -> None:
    """A project already gone when deleted ends deleted, not failed."""
    await rig.track(delete=True)
    rig.api.answer(PID, complete(PID, "a.png"))
    rig.api.deletes[PID] = 404
    with capture_logs() as logs:
        record = await rig.step()
    assert record.state == State.DELETED
    (deleted,) = [e for e in logs if e["event"] == "project_deleted"]
    assert deleted["already_gone"] is True


async def test_a_refused_delete_keeps_the_saved_outputs(rig: Rig) -> None:
    """A DELETE the API refuses (403) ends the project saved, with the refusal as its note."""
    await rig.track(delete=True)
    rig.api.answer(PID, complete(PID, "a.png"))
    rig.api.deletes[PID] = 403
    record = await rig.step()
    assert record.state == State.SAVED
    assert record.failure is not None
    assert record.failure.startswith("not deleted:")
    assert rig.file("a.png").exists()


async def test_an_error_status_ends_the_project_with_the_api_error(rig: Rig) -> None:
    """error -> error: the API's code and message are kept."""
    await rig.track()
    rig.api.answer(PID, body(PID, "error", error={"code": "nsfw", "message": "refused"}))
    record = await rig.step()
    assert (record.state, record.error_code, record.error_message) == (
        State.ERROR,
        "nsfw",
        "refused",
    )
    assert record.remote_status == RemoteStatus.ERROR


async def test_a_canceled_project_ends_canceled(rig: Rig) -> None:
    """canceled -> canceled, with nothing downloaded."""
    await rig.track()
    rig.api.answer(PID, body(PID, "canceled"))
    record = await rig.step()
    assert record.state == State.CANCELED
    assert rig.api.count("GET", CDN) == 0


async def test_a_project_the_api_does_not_know_ends_not_found(rig: Rig) -> None:
    """A 404 while polling ends the project not_found (nothing is retried)."""
    await rig.track()
    rig.api.answer(PID, 404)
    record = await rig.step()
    assert record.state == State.NOT_FOUND
    assert record.lease_owner is None


async def test_first_gets_all_404_make_the_run_suspect_its_base_url(rig: Rig) -> None:
    """When every GET of the run so far answered 404 (three projects), the base URL is blamed,
    once."""
    ids = [f"cwf00000000000000000000{i}x" for i in range(4)]
    for pid in ids:
        await rig.track(pid)
        rig.api.answer(pid, 404)
    with capture_logs() as logs:
        for pid in ids:
            await rig.step(pid)
    assert [e["not_found"] for e in logs if e["event"] == "api_base_url_suspect"] == [3]


async def test_a_complete_project_without_downloads_is_retried(rig: Rig) -> None:
    """complete with no downloads listed is a fault of the answer: tried again later."""
    await rig.track()
    rig.api.answer(PID, complete(PID))
    record = await rig.step()
    assert record.state == State.POLLING
    assert record.failures == 1
    assert record.failure == "complete but the API listed no downloads"


async def test_a_project_deleted_before_its_outputs_were_saved_fails(rig: Rig) -> None:
    """complete but disabled: its outputs are gone, so the project fails and nothing is
    fetched."""
    await rig.track()
    rig.api.answer(PID, complete(PID, "a.png", enabled=False))
    record = await rig.step()
    assert record.state == State.FAILED
    assert record.failure == "the project was deleted before its outputs were saved"
    assert rig.api.count("GET", CDN) == 0


# --- API refusals and faults ------------------------------------------------------------------


async def test_a_refused_token_stops_polling_until_the_recheck(rig: Rig) -> None:
    """401: the project waits for the recheck without a failure counted, every active project
    is noted, health says unauthorized, and the first success releases the project held."""
    await rig.track()
    await rig.track(OTHER)
    rig.api.answer(PID, 401, body(PID, "rendering"))
    released: list[set[str]] = []
    rig.health.on_release = released.append
    record = await rig.step()
    assert rig.health.unauthorized
    assert rig.health.paused(rig.clock.now())
    assert record.due_at - rig.clock.now() == pytest.approx(AUTH_RECHECK_SECONDS)
    assert record.failures == 0
    other = await rig.record(OTHER)
    assert other.failure is not None
    assert "HTTP 401" in other.failure
    rig.clock.advance(AUTH_RECHECK_SECONDS)
    record = await rig.step()
    assert not rig.health.unauthorized
    assert released == [{PID}]
    assert record.remote_status == RemoteStatus.RENDERING


def test_a_new_token_read_before_a_refused_project_is_put_off_leaves_it_due(
    tmp_path: Path,
) -> None:
    """A new token read (SIGHUP) after a 401's refusal but before the refused project is put
    off (the refusal's store writes come in between) leaves nothing to wait for: the project is
    made due at once, not held for the recheck five minutes later."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    health = ApiHealth(load_settings({"WATCHER_API_TOKEN_FILE": str(token)}), now=lambda: 1000.0)
    released: list[set[str]] = []
    health.on_release = released.append
    health.refused(Unauthorized("HTTP 401"))
    token.write_text("mhk_live_new_token_0002\n")
    health.reload_secrets("SIGHUP")
    health.hold(PID)
    assert released == [set(), {PID}]
    health.refused(Unauthorized("HTTP 401"))  # refused again, with no new token: held
    health.hold(OTHER)
    assert released == [set(), {PID}]


async def test_payment_required_pauses_polling_then_recovers(rig: Rig) -> None:
    """402: the project waits for the payment pause, uncounted; the next answer ends it."""
    await rig.track()
    rig.api.answer(PID, 402, body(PID, "rendering"))
    record = await rig.step()
    assert rig.health.payment_required
    assert record.due_at - rig.clock.now() == pytest.approx(PAYMENT_PAUSE_SECONDS)
    assert record.failures == 0
    with capture_logs() as logs:
        await rig.step()
    assert not rig.health.payment_required
    assert [e["event"] for e in logs if e["event"] == "api_recovered"] == ["api_recovered"]


async def test_rate_limited_gets_are_retried_no_sooner_than_asked(rig: Rig) -> None:
    """429 with Retry-After: a counted failure, the next try no sooner than the server asked."""
    await rig.track()
    rig.api.gets[PID] = [
        httpx.Response(429, headers={"retry-after": "120"}),
        httpx.Response(200, json=body(PID, "rendering")),
    ]
    record = await rig.step()
    assert (record.state, record.failures) == (State.POLLING, 1)
    assert record.due_at >= rig.clock.now() + 120
    record = await rig.step()
    assert (record.failures, record.remote_status) == (0, RemoteStatus.RENDERING)


async def test_server_errors_are_retried_with_backoff(rig: Rig) -> None:
    """5xx: retried with a growing delay, each failure counted, none ending the project."""
    await rig.track()
    rig.api.answer(PID, 503)
    delays = []
    for failures in (1, 2, 3):
        record = await rig.step()
        assert (record.state, record.failures) == (State.POLLING, failures)
        delays.append(record.due_at - rig.clock.now())
    assert all(0 < d <= 60.0 for d in delays)
    assert max(delays) > 2.0  # backed off beyond the initial delay


async def test_a_poison_project_is_quarantined_while_others_answer(tmp_path: Path) -> None:
    """A GET that fails max_poll_failures times in a row while another project's GET succeeds
    quarantines that project, naming the last failure."""
    rig, http = rig_for(tmp_path, limits=WorkflowLimits(max_poll_failures=2))
    async with http:
        await rig.track()
        await rig.track(OTHER)
        rig.api.answer(PID, 503)
        rig.api.answer(OTHER, body(OTHER, "rendering"))
        assert (await rig.step()).failures == 1
        await rig.step(OTHER)  # another project's GET works
        record = await rig.step()
    assert record.state == State.QUARANTINED
    assert record.failure is not None
    assert record.failure.startswith("quarantined: its GET failed 2 times in a row")


async def test_no_project_is_quarantined_when_no_get_succeeds(tmp_path: Path) -> None:
    """In an outage (no GET succeeds) failures only back off: nothing is quarantined."""
    rig, http = rig_for(tmp_path, limits=WorkflowLimits(max_poll_failures=2))
    async with http:
        await rig.track()
        rig.api.answer(PID, 503)
        for _ in range(4):
            record = await rig.step()
    assert (record.state, record.failures) == (State.POLLING, 4)


# --- downloads --------------------------------------------------------------------------------


async def test_an_expired_url_is_refreshed_and_the_output_saved(rig: Rig) -> None:
    """URL expired (403 from the CDN) -> a fresh GET -> the fresh link is saved."""
    await rig.track()
    rig.api.answer(PID, complete(PID, "old.png"), complete(PID, "new.png"))
    rig.api.cdn["old.png"] = [403]
    record = await rig.step()
    assert record.state == State.SAVED
    assert rig.api.count("GET", API) == 2
    (output,) = await rig.store.outputs(PID)
    assert (rig.root / output.path).read_bytes() == content("new.png")


async def test_a_refresh_that_lists_new_outputs_saves_them_too(rig: Rig) -> None:
    """The fresh GET lists an output the first did not: both are saved."""
    await rig.track()
    rig.api.answer(PID, complete(PID, "a.png"), complete(PID, "a2.png", "b.png"))
    rig.api.cdn["a.png"] = [410]
    record = await rig.step()
    assert record.state == State.SAVED
    outputs = await rig.store.outputs(PID)
    assert len(outputs) == 2
    assert all(o.state == OutputState.SAVED for o in outputs)
    assert rig.file("b.png").read_bytes() == content("b.png")


async def test_links_refused_again_and_again_fail_the_project(rig: Rig) -> None:
    """Every link refused, fresh ones included, past refused_links: no usable URL is left."""
    await rig.track()
    rig.api.answer(PID, complete(PID, "a.png"))
    rig.api.cdn["a.png"] = [403] * 10
    record = await rig.step()
    assert record.state == State.FAILED
    assert record.failure is not None
    assert "no usable download URL left, 4 links in a row were refused" in record.failure
    assert rig.api.count("GET", API) == 4  # the first GET, then three fresh ones


async def test_a_project_gone_when_urls_are_refreshed_fails(rig: Rig) -> None:
    """A 404 to the GET for fresh URLs means the outputs are lost: failed, not not_found."""
    await rig.track()
    rig.api.answer(PID, complete(PID, "a.png"), 404)
    rig.api.cdn["a.png"] = [403]
    record = await rig.step()
    assert record.state == State.FAILED
    assert record.failure is not None
    assert record.failure.startswith("outputs can no longer be fetched: the project is gone")


async def test_a_full_disk_is_retried_later_without_counting(tmp_path: Path) -> None:
    """Disk full: the project is tried again after disk_full_retry_seconds; no failure counted."""
    limits = WorkflowLimits(disk_full_retry_seconds=7.0)
    rig, http = rig_for(tmp_path, limits=limits, downloader=Refusing)
    async with http:
        await rig.track()
        rig.api.answer(PID, complete(PID, "a.png"))
        with capture_logs() as logs:
            record = await rig.step()
    assert (record.state, record.failures) == (State.DOWNLOADING, 0)
    assert record.due_at - rig.clock.now() == pytest.approx(7.0)
    assert [e["event"] for e in logs if e["event"] == "disk_full"] == ["disk_full"]


async def test_downloads_without_progress_give_up(tmp_path: Path) -> None:
    """A CDN that answers 503 and gains no byte: tries back off, counted, and after
    stalled_tries (over stalled_seconds) the project fails saying so."""
    limits = WorkflowLimits(give_up=GiveUpLimits(stalled_tries=3, stalled_seconds=100.0))
    rig, http = rig_for(tmp_path, limits=limits)
    async with http:
        await rig.track()
        rig.api.answer(PID, complete(PID, "a.png"))
        rig.api.cdn["a.png"] = [503] * 10
        states = []
        for _ in range(5):
            record = await rig.step()
            states.append(record.state)
            if record.state.is_final:
                break
            rig.clock.advance(60)
    assert states[-1] == State.FAILED
    assert states[:-1] == [State.DOWNLOADING] * (len(states) - 1)
    assert len(states) >= 3  # not before stalled_tries
    assert record.failure is not None
    assert "gained no byte" in record.failure


async def test_a_cut_transfer_that_gained_bytes_starts_the_count_over(tmp_path: Path) -> None:
    """A transfer cut after some bytes is progress: retried with the run of failures before it
    reset, then resumed and saved."""

    rig, http = rig_for(tmp_path)
    async with http:
        await rig.track()
        rig.api.answer(PID, complete(PID, "a.png"))
        rig.api.cdn["a.png"] = [503]  # a failure first, that gains nothing
        rig.api.cut.add("a.png")
        assert (await rig.step()).failures == 1
        record = await rig.step()
        assert (record.state, record.failures) == (State.DOWNLOADING, 0)
        assert list(rig.root.rglob("*.part"))
        record = await rig.step()
    assert record.state == State.SAVED
    assert rig.file("a.png").read_bytes() == content("a.png")


# --- crashes, leases, the store ---------------------------------------------------------------


class BuggyStore(InMemoryStore):
    """A store whose poll write hits a bug (its message naming the token)."""

    async def record_poll(self, *args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError(f"a bug, for the test, near {TOKEN}")


async def test_a_crash_is_noted_and_the_third_in_a_row_quarantines(tmp_path: Path) -> None:
    """Each crash is recorded with the exception (the token redacted) and retried; after
    max_crashes in a row the project is quarantined with that cause."""
    rig, http = rig_for(tmp_path, store=BuggyStore())
    async with http:
        await rig.track()
        rig.api.answer(PID, body(PID, "rendering"))
        first = await rig.step()
        assert first.state == State.POLLING
        assert first.failure == (
            "crashed (1x in a row): ZeroDivisionError: a bug, for the test, near [redacted]"
        )
        await rig.step()
        record = await rig.step()
    assert record.state == State.QUARANTINED
    assert record.failure == (
        "quarantined after 3 crashes in a row: ZeroDivisionError: a bug, for the test, "
        "near [redacted]"
    )


async def test_work_interrupted_again_and_again_is_quarantined(rig: Rig) -> None:
    """A project whose leases ran out max_interruptions times in a row (its workers died) is
    quarantined at the next claim, not worked on again."""
    await rig.track()
    rig.api.answer(PID, body(PID, "rendering"))
    for _ in range(3):  # claimed, and never released: the lease runs out
        await rig.claim()
    record = await rig.step()
    assert record.state == State.QUARANTINED
    assert record.failure is not None
    assert "interrupted 3 times in a row" in record.failure
    assert rig.api.count("GET") == 0


async def test_a_lease_lost_mid_work_writes_nothing(rig: Rig) -> None:
    """Our lease ran out and another replica claimed the project while our GET was in flight:
    our answer is not written, and the other replica's lease stands."""
    await rig.track()
    rig.api.answer(PID, body(PID, "rendering"))
    taken: list[Claim] = []

    async def steal(_: str) -> None:
        rig.clock.advance(LEASE + 1)
        taken.extend(
            await rig.store.claim_due(
                now=rig.clock.now(), limit=1, owner="thief", lease_seconds=LEASE
            )
        )

    rig.api.on_get = steal
    with capture_logs() as logs:
        record = await rig.step()
    assert [e["event"] for e in logs if e["event"] == "lease_lost"] == ["lease_lost"]
    (thief,) = taken
    assert (record.lease_owner, record.lease_version, record.polls) == ("thief", thief.version, 0)


class FlakyStore(InMemoryStore):
    """A store whose first poll write does not get through (an outage)."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = 1

    async def record_poll(self, claim: Claim, **kwargs: Any) -> None:
        if self.refusals:
            self.refusals -= 1
            raise StoreUnavailable("the store does not answer")
        await super().record_poll(claim, **kwargs)


async def test_work_whose_store_write_failed_resumes_under_the_same_lease(tmp_path: Path) -> None:
    """A store outage mid-work ends nothing: the work waits for the store, then redoes the
    step from what the store holds, under the same lease."""
    rig, http = rig_for(tmp_path, store=FlakyStore())
    async with http:
        await rig.track()
        rig.api.answer(PID, body(PID, "rendering"))
        record = await rig.step()
    assert rig.store_failures == ["work"]
    assert (record.state, record.remote_status, record.polls) == (
        State.POLLING,
        RemoteStatus.RENDERING,
        1,
    )
    assert rig.api.count("GET", API) == 2  # the GET is redone, as after a crash


async def test_a_final_state_is_announced_from_what_the_store_wrote(tmp_path: Path) -> None:
    """With notifications on, the event is queued with the final state, in the same write."""
    rig, http = rig_for(tmp_path, notify=True)
    async with http:
        await rig.track()
        rig.api.answer(PID, body(PID, "canceled"))
        record = await rig.step()
    ((notification, _, sent),) = rig.store.notifications.values()
    event = json.loads(notification.body)
    assert sent is None
    assert event["type"] == "project.canceled"
    assert event["payload"]["id"] == PID
    assert event["payload"]["state"] == record.state.value
