"""The simulator's webhook events, delivered over real HTTP to a receiver on 127.0.0.1: signed
as Magic Hour signs them, carrying the project object, one per transition, retried on failure."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from watcher.errors import ConfigError
from watcher.models import Kind, ProjectSnapshot, RemoteStatus
from watcher.simulator import Event, SimConfig, Simulator, SimulatorServer
from watcher.simulator.timeline import ProjectOverrides
from watcher.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

SECRET = "whsec_simulator"


class Receiver:
    """An HTTP server that records every POST (headers and body) and answers ``status``."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/magic-hour"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        """The bodies received, verified against the secret (each must verify)."""
        bodies = []
        for headers, body in self.received:
            verify(
                SECRET,
                body,
                signature=headers.get(SIGNATURE_HEADER),
                timestamp=headers.get(TIMESTAMP_HEADER),
                now=time.time(),
            )
            bodies.append(json.loads(body))
        return bodies


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver, shut down after the test."""
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def hooked(receiver: Receiver) -> Iterator[Callable[..., SimulatorServer]]:
    """Start simulators that send their webhooks to ``receiver``."""
    servers: list[SimulatorServer] = []

    def start(**config: Any) -> SimulatorServer:
        values = {"seed": 5, "webhook_url": receiver.url, "webhook_secret": SECRET, **config}
        server = SimulatorServer(Simulator(SimConfig(**values))).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def deliveries(sim: Simulator) -> list[Event]:
    """The webhook deliveries the simulator logged (each once its answer came)."""
    return [e for e in sim.events() if e.what == "webhook"]


def overrides(status: RemoteStatus) -> ProjectOverrides:
    """Queued 0.1 s, rendering 0.2 s, ending with ``status``."""
    return ProjectOverrides(status=status, queued_seconds=0.1, rendering_seconds=0.2, outputs=2)


def test_a_render_sends_a_signed_started_then_completed_with_the_project_object(
    hooked: Callable[..., SimulatorServer], receiver: Receiver
) -> None:
    """Each event comes ``webhook_delay`` after its transition, signed, and its payload is the
    project object a GET answers, complete with download URLs that work."""
    server = hooked(webhook_delay=0.2)
    sim = server.simulator
    (pid,) = sim.create_projects(Kind.VIDEO, 1, overrides(RemoteStatus.COMPLETE))
    wait_for(lambda: len(deliveries(sim)) == 2)  # logged once answered: received before
    started, completed = receiver.events()
    assert started["type"] == "video.started"
    assert completed["type"] == "video.completed"
    first = ProjectSnapshot.parse(started["payload"])
    last = ProjectSnapshot.parse(completed["payload"])
    assert (first.id, first.status, first.downloads) == (pid, RemoteStatus.RENDERING, [])
    assert (last.id, last.status, len(last.downloads)) == (pid, RemoteStatus.COMPLETE, 2)
    truth = sim.truth(pid)
    assert truth.finishes_at is not None
    hooks = deliveries(sim)
    assert [e.status_code for e in hooks] == [200, 200]
    assert hooks[1].at - truth.finishes_at >= 0.2
    assert hooks[0].at < hooks[1].at
    content = httpx.get(last.downloads[1].url).content
    assert content == sim.expected_bytes(pid, 1)


def test_an_error_sends_errored_with_the_error_and_a_cancel_sends_nothing_at_its_end(
    hooked: Callable[..., SimulatorServer], receiver: Receiver
) -> None:
    """``errored`` carries the error object; a canceled render sends only ``started``; a project
    of no render time skips ``started``."""
    server = hooked(webhook_delay=0.0)
    sim = server.simulator
    (failed,) = sim.create_projects(Kind.IMAGE, 1, overrides(RemoteStatus.ERROR))
    (canceled,) = sim.create_projects(Kind.AUDIO, 1, overrides(RemoteStatus.CANCELED))
    instant = ProjectOverrides(status=RemoteStatus.COMPLETE, queued_seconds=0, rendering_seconds=0)
    (quick,) = sim.create_projects(Kind.IMAGE, 1, instant)
    wait_for(lambda: len(deliveries(sim)) == 4)
    time.sleep(0.5)  # the canceled one's end has passed: nothing more comes
    by_project: dict[str, list[str]] = {}
    for event in receiver.events():
        by_project.setdefault(event["payload"]["id"], []).append(event["type"])
        if event["type"] == "image.errored":
            snapshot = ProjectSnapshot.parse(event["payload"])
            assert snapshot.status == RemoteStatus.ERROR
            assert snapshot.error is not None
    assert by_project == {
        failed: ["image.started", "image.errored"],
        canceled: ["audio.started"],
        quick: ["image.completed"],
    }


def test_a_failed_delivery_is_retried_and_nothing_is_sent_without_a_url(
    hooked: Callable[..., SimulatorServer], receiver: Receiver, serve: Callable[..., Any]
) -> None:
    """A 500 is retried a second later, as Magic Hour retries; a simulator with no
    ``webhook_url`` sends nothing."""
    receiver.status = 500
    server = hooked(webhook_delay=0.0)
    sim = server.simulator
    instant = ProjectOverrides(status=RemoteStatus.COMPLETE, queued_seconds=0, rendering_seconds=0)
    (pid,) = sim.create_projects(Kind.IMAGE, 1, instant)
    wait_for(lambda: len(deliveries(sim)) == 1)
    receiver.status = 200
    wait_for(lambda: len(deliveries(sim)) == 2)
    assert [e.status_code for e in deliveries(sim)] == [500, 200]
    assert {e.project_id for e in deliveries(sim)} == {pid}
    quiet = serve(SimConfig(seed=5)).simulator
    quiet.create_projects(Kind.IMAGE, 1, instant)
    time.sleep(0.2)
    assert not [e for e in quiet.events() if e.what == "webhook"]
    assert len(receiver.received) == 2


def test_a_webhook_url_needs_a_secret() -> None:
    """Events cannot be sent unsigned."""
    with pytest.raises(ConfigError, match="webhook_secret"):
        SimConfig(webhook_url="http://127.0.0.1:9/hooks")
