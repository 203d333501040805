"""Notifications out, against a local receiver that checks every signature on its own: events
for every final state, and delivery after the receiver comes back, across a daemon restart."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from tests.integration.http_support import (
    CONTROL_TOKEN,
    Receiver,
    eventually,
    free_port,
    running,
)
from tests.support import Intercepted, watcher_settings
from watcher import clock
from watcher.daemon import Daemon, Outcome
from watcher.models import Kind, RemoteStatus
from watcher.notify import Notifier
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.timeline import ProjectOverrides
from watcher.store import SQLiteStore
from watcher.wiring import build

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]
SECRET = "notify-secret-for-tests"
CONFIG = SimConfig(
    seed=9,
    queued_seconds=(0.05, 0.2),
    rendering_seconds=(0.05, 0.2),
    output_bytes=(1_000, 9_000),
)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    """Receivers started by the test, stopped after it."""
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.stop()


def make_daemon(
    server: SimulatorServer,
    root: Path,
    url: str,
    *,
    until_done: bool,
    transport: httpx.AsyncBaseTransport | None = None,
    **extra: str,
) -> Daemon:
    """A daemon notifying ``url``, retrying fast, on the SQLite file under ``root``."""
    settings = watcher_settings(server, root, notify_url=url, notify_secret=SECRET, **extra)
    daemon = build(
        settings,
        SQLiteStore(str(root / "watcher.db"), exclusive=True),
        until_done=until_done,
        transport=transport,
    )
    notifier = Notifier(url, SECRET, poll_seconds=0.1, base_delay=0.2, max_delay=0.5, timeout=2)
    daemon.side_tasks.append(functools.partial(notifier.run, daemon, daemon.store, daemon.metrics))
    return daemon


async def run_until_done(daemon: Daemon) -> Outcome:
    """Run an ``until_done`` daemon to its end."""
    return await asyncio.wait_for(daemon.run(), 30)


def check_files(event: dict[str, object]) -> int:
    """Every output the event lists is on disk with the size and sha256 it states."""
    payload = event["payload"]
    assert isinstance(payload, dict)
    for output in payload["outputs"]:
        data = Path(output["absolute_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == output["sha256"]
        assert len(data) == output["bytes"]
    return len(payload["outputs"])


async def test_every_final_state_is_announced_with_paths_and_checksums(
    serve: Serve, tmp_path: Path, receivers: list[Receiver]
) -> None:
    """Saved, deleted, error and canceled projects each produce one signed event whose outputs
    name files whose sha256 matches what the simulator served."""
    server = serve(CONFIG)
    sim = server.simulator
    saved = sim.create_projects(
        Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=2)
    )
    errored = sim.create_projects(Kind.VIDEO, 1, ProjectOverrides(status=RemoteStatus.ERROR))
    canceled = sim.create_projects(Kind.AUDIO, 1, ProjectOverrides(status=RemoteStatus.CANCELED))
    receiver = Receiver(free_port(), SECRET).start()
    receivers.append(receiver)
    projects = f"{saved[0]} video:{errored[0]} audio:{canceled[0]}"
    with capture_logs() as logs:
        outcome = await run_until_done(
            make_daemon(server, tmp_path, receiver.url, until_done=True, projects=projects)
        )
    assert outcome.counts
    assert receiver.refused == 0
    by_project = {e["payload"]["id"]: e for e in receiver.events}
    assert len(receiver.events) == 3 == len(by_project)
    assert by_project[saved[0]]["type"] == "project.saved"
    assert by_project[errored[0]]["type"] == "project.error"
    assert by_project[errored[0]]["payload"]["error"]["code"]
    assert by_project[canceled[0]]["type"] == "project.canceled"
    assert check_files(by_project[saved[0]]) == 2
    truth = {o.sha256 for o in sim.truth(saved[0]).outputs}
    assert {o["sha256"] for o in by_project[saved[0]]["payload"]["outputs"]} == truth
    assert len({e["id"] for e in receiver.events}) == 3
    assert Counter(e["event"] for e in logs)["notification_sent"] == 3
    assert SECRET not in repr(logs)


async def test_a_receiver_down_at_first_gets_the_event_once_after_a_restart(
    serve: Serve, tmp_path: Path, receivers: list[Receiver]
) -> None:
    """With the receiver down, the daemon finishes and exits with the event unsent; once the
    receiver is up, the restarted daemon delivers it exactly once, listing the saved files."""
    server = serve(CONFIG)
    sim = server.simulator
    (pid,) = sim.create_projects(
        Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=2)
    )
    port = free_port()
    receiver = Receiver(port, SECRET)
    with capture_logs() as first_logs:
        first = await run_until_done(
            make_daemon(server, tmp_path, receiver.url, until_done=True, projects=pid)
        )
    assert first.exit_code == 0
    failures = [e for e in first_logs if e["event"] == "notification_failed"]
    assert failures
    assert "ConnectError" in failures[0]["error"]
    assert receiver.events == []

    receivers.append(receiver.start())
    second = make_daemon(server, tmp_path, receiver.url, until_done=False)
    task = asyncio.create_task(second.run())
    await eventually(lambda: receiver.events, within=10)
    await asyncio.sleep(0.5)  # time enough for a duplicate to show up, if there were one
    second.request_stop()
    await asyncio.wait_for(task, 20)

    (event,) = receiver.events
    assert event["type"] == "project.saved"
    assert event["payload"]["id"] == pid
    assert check_files(event) == 2
    async with SQLiteStore(str(tmp_path / "watcher.db")) as store:
        assert (
            await store.claim_notifications(now=clock.now() + 3600, limit=10, lease_seconds=1) == []
        )


def refused_links(project_id: str) -> Intercepted:
    """The real network, except that every download of ``project_id`` is refused with 403."""
    files = f"/sim/files/{project_id}/"
    return Intercepted(
        lambda request: httpx.Response(403) if request.url.path.startswith(files) else None
    )


async def test_a_failed_project_is_announced_with_its_cause(
    serve: Serve, tmp_path: Path, receivers: list[Receiver]
) -> None:
    """A project whose outputs cannot be fetched ends failed, and the event says why and lists
    no file."""
    server = serve(CONFIG)
    (pid,) = server.simulator.create_projects(
        Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=1)
    )
    receiver = Receiver(free_port(), SECRET).start()
    receivers.append(receiver)
    daemon = make_daemon(
        server, tmp_path, receiver.url, until_done=True, projects=pid, transport=refused_links(pid)
    )
    outcome = await run_until_done(daemon)
    assert outcome.exit_code == 1
    (event,) = receiver.events
    assert event["type"] == "project.failed"
    payload = event["payload"]
    assert payload["id"] == pid
    assert payload["state"] == "failed"
    assert "refused" in payload["failure"]
    assert [o for o in payload["outputs"] if o.get("sha256")] == []


async def test_each_event_says_what_the_control_api_shows(
    serve: Serve, tmp_path: Path, receivers: list[Receiver]
) -> None:
    """The payload of every final event (saved, deleted, error, canceled) is exactly what
    GET /v1/projects/{id} answers afterwards: it is built from the row the store wrote."""
    server = serve(CONFIG)
    sim = server.simulator
    complete = ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=2)
    saved, deleted = sim.create_projects(Kind.IMAGE, 2, complete)
    (errored,) = sim.create_projects(Kind.VIDEO, 1, ProjectOverrides(status=RemoteStatus.ERROR))
    (canceled,) = sim.create_projects(Kind.AUDIO, 1, ProjectOverrides(status=RemoteStatus.CANCELED))
    receiver = Receiver(free_port(), SECRET).start()
    receivers.append(receiver)
    projects = f"{saved} video:{errored} audio:{canceled}"
    daemon = make_daemon(
        server,
        tmp_path,
        receiver.url,
        until_done=False,
        projects=projects,
        control_token=CONTROL_TOKEN,
    )
    async with running(daemon) as run:
        tracked = await run.client.post(
            "/v1/projects", json={"id": deleted, "kind": "image", "delete_after_download": True}
        )
        assert tracked.status_code == 201, tracked.text
        await eventually(lambda: len(receiver.events) == 4, within=20)
        shown = {}
        for pid in (saved, deleted, errored, canceled):
            response = await run.client.get(f"/v1/projects/{pid}")
            assert response.status_code == 200, response.text
            shown[pid] = response.json()
    by_project = {e["payload"]["id"]: e for e in receiver.events}
    types = {pid: by_project[pid]["type"] for pid in shown}
    assert types == {
        saved: "project.saved",
        deleted: "project.deleted",
        errored: "project.error",
        canceled: "project.canceled",
    }
    announced = {pid: by_project[pid]["payload"] for pid in shown}
    for payload in announced.values():
        for output in payload["outputs"]:
            del output["absolute_path"]
    assert announced == shown
    assert all(answer["terminal_at"] is not None for answer in shown.values())
