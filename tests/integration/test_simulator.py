"""The simulator over real HTTP: a SimulatorServer on 127.0.0.1 driven with httpx."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest

from watcher.models import Kind, RemoteStatus
from watcher.simulator import (
    Event,
    Faults,
    ProjectOverrides,
    SimConfig,
    Simulator,
    SimulatorServer,
)

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0
TOKEN = "mhk_live_simulator"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Queued for 1 s and rendering for 1 s, always complete, URLs valid for a minute.
FIXED = SimConfig(
    seed=21,
    queued_seconds=(1.0, 1.0),
    rendering_seconds=(1.0, 1.0),
    error_rate=0.0,
    cancel_rate=0.0,
    output_bytes=(5_000, 150_000),
    url_lifetime=60.0,
)
DONE = ProjectOverrides(queued_seconds=0.0, rendering_seconds=0.0)


class FakeClock:
    """A clock the test moves by hand (read from the server thread, written by the test)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Served:
    """A running server, its simulator's clock and an HTTP client pointed at it."""

    server: SimulatorServer
    clock: FakeClock
    http: httpx.Client

    @property
    def sim(self) -> Simulator:
        return self.server.simulator

    def get(self, kind: Kind, project_id: str) -> httpx.Response:
        return self.http.get(f"{kind.api_path}/{project_id}", headers=AUTH)

    def download_url(self, kind: Kind, project_id: str, index: int = 0) -> str:
        response = self.get(kind, project_id)
        assert response.status_code == 200
        url: str = response.json()["downloads"][index]["url"]
        return url

    def last_event(self) -> Event:
        return self.sim.events()[-1]


Serve = Callable[..., Served]


@pytest.fixture
def serve_sim() -> Iterator[Serve]:
    """Start servers whose simulators run on a fake clock; stop them after the test."""
    started: list[Served] = []

    def start(config: SimConfig = FIXED) -> Served:
        clock = FakeClock()
        server = SimulatorServer(Simulator(config, clock=clock)).start()
        http = httpx.Client(base_url=server.base_url, timeout=10)
        started.append(Served(server, clock, http))
        return started[-1]

    yield start
    for served in started:
        served.http.close()
        served.server.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true (server-side effects land just after the client returns)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def stream_into(http: httpx.Client, url: str, received: bytearray, headers: httpx.Headers) -> None:
    """Download ``url`` into ``received``, keeping the response headers even if the body fails."""
    with http.stream("GET", url) as response:
        headers.update(response.headers)
        for chunk in response.iter_raw():
            received += chunk


# --- the API -------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer mhk_live_wrong", TOKEN, "Basic eDp5"])
def test_requests_without_the_right_bearer_token_get_401(
    serve_sim: Serve, header: str | None
) -> None:
    """GET and DELETE answer 401 {"message": "Unauthorized"} and log it."""
    served = serve_sim()
    (pid,) = served.sim.create_projects(Kind.IMAGE)
    headers = {} if header is None else {"Authorization": header}
    for method in ("GET", "DELETE"):
        response = served.http.request(method, f"/v1/image-projects/{pid}", headers=headers)
        assert (response.status_code, response.json()) == (401, {"message": "Unauthorized"})
    assert [(e.what, e.status_code) for e in served.sim.events()] == [
        ("get", 401),
        ("delete", 401),
    ]
    assert not served.sim.truth(pid).deleted


def test_unknown_ids_wrong_kinds_and_unknown_paths_get_json_404(serve_sim: Serve) -> None:
    """A project is found only under its own kind; everything else is 404 with a message."""
    served = serve_sim()
    (pid,) = served.sim.create_projects(Kind.VIDEO)
    assert served.get(Kind.VIDEO, pid).status_code == 200
    for path in (
        f"/v1/image-projects/{pid}",
        f"/v1/audio-projects/{pid}",
        "/v1/video-projects/cmissing",
        f"/v1/banana-projects/{pid}",
        "/v2/anything",
    ):
        response = served.http.get(path, headers=AUTH)
        assert (response.status_code, response.json()) == (404, {"message": "Not Found"}), path


def test_a_project_renders_then_serves_byte_exact_outputs_without_auth(serve_sim: Serve) -> None:
    """Status follows the clock; the outputs download byte for byte; the log says how."""
    served = serve_sim(replace(FIXED, image_outputs=(2, 2)))
    (pid,) = served.sim.create_projects(Kind.IMAGE)
    statuses = []
    for _ in range(3):
        statuses.append(served.get(Kind.IMAGE, pid).json()["status"])
        served.clock.advance(1.0)
    assert statuses == ["queued", "rendering", "complete"]
    body = served.get(Kind.IMAGE, pid).json()
    assert body["image_count"] == 2
    names = [httpx.URL(d["url"]).path.rsplit("/", 1)[1] for d in body["downloads"]]
    assert names == ["output.png", "output-1.png"]
    truth = served.sim.truth(pid)
    for index, link in enumerate(body["downloads"]):
        response = served.http.get(link["url"], headers={"User-Agent": "watcher-test/1"})
        assert response.status_code == 200
        assert response.content == served.sim.expected_bytes(pid, index)
        assert hashlib.sha256(response.content).hexdigest() == truth.outputs[index].sha256
        assert response.headers["content-length"] == str(truth.outputs[index].size)
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["content-type"] == "image/png"
    wait_for(lambda: served.last_event().completed is True)
    downloads = [e for e in served.sim.events() if e.what == "download"]
    assert [(e.index, e.status_code, e.completed) for e in downloads] == [
        (0, 200, True),
        (1, 200, True),
    ]
    assert all(
        e.authorization_sent is False and e.user_agent == "watcher-test/1" for e in downloads
    )
    assert downloads[0].bytes_sent == truth.outputs[0].size


def test_an_authorization_header_sent_to_a_download_is_recorded(serve_sim: Serve) -> None:
    """The file host ignores the header but the log flags it, so tests can catch a leak."""
    served = serve_sim()
    (pid,) = served.sim.create_projects(Kind.AUDIO, overrides=DONE)
    url = served.download_url(Kind.AUDIO, pid)
    assert served.http.get(url, headers=AUTH).status_code == 200
    assert served.last_event().authorization_sent is True


def test_range_requests_get_206_and_unsatisfiable_ones_416(serve_sim: Serve) -> None:
    """bytes=N-, bytes=N-M and bytes=-S return the right slice and Content-Range."""
    served = serve_sim()
    (pid,) = served.sim.create_projects(Kind.VIDEO, overrides=replace(DONE, output_size=200_000))
    url = served.download_url(Kind.VIDEO, pid)
    whole = served.sim.expected_bytes(pid, 0)
    cases = [
        ("bytes=150000-", 150_000, 200_000),
        ("bytes=65530-65545", 65_530, 65_546),
        ("bytes=-100", 199_900, 200_000),
        ("bytes=199999-999999", 199_999, 200_000),
    ]
    for header, start, end in cases:
        response = served.http.get(url, headers={"Range": header})
        assert response.status_code == 206, header
        assert response.content == whole[start:end], header
        assert response.headers["content-range"] == f"bytes {start}-{end - 1}/200000"
        assert response.headers["content-length"] == str(end - start)
    response = served.http.get(url, headers={"Range": "bytes=200000-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */200000"
    assert served.last_event().range == "bytes=200000-"


def test_expired_or_tampered_urls_get_403_and_a_new_get_signs_fresh_ones(serve_sim: Serve) -> None:
    """A URL dies after url_lifetime; a new GET returns a working URL with a later expiry."""
    served = serve_sim()
    (pid,) = served.sim.create_projects(Kind.IMAGE, overrides=DONE)
    old = served.download_url(Kind.IMAGE, pid)
    tampered = old[:-1] + ("0" if old[-1] != "0" else "1")
    assert served.http.get(tampered).status_code == 403
    assert served.http.get(old.split("?")[0]).status_code == 403
    served.clock.advance(61)
    expired = served.http.get(old)
    assert expired.status_code == 403
    assert b"AccessDenied" in expired.content
    fresh = served.get(Kind.IMAGE, pid).json()["downloads"][0]
    assert fresh["expires_at"] == "2023-11-14T22:15:21.000Z"  # T0 + 61 + 60
    assert served.http.get(fresh["url"]).content == served.sim.expected_bytes(pid, 0)


def test_delete_answers_204_then_get_and_delete_answer_404(serve_sim: Serve) -> None:
    """DELETE is permanent: 204 with no body, then 404 for GET, DELETE and the files."""
    served = serve_sim()
    (pid,) = served.sim.create_projects(Kind.AUDIO, overrides=DONE)
    url = served.download_url(Kind.AUDIO, pid)
    deleted = served.http.delete(f"/v1/audio-projects/{pid}", headers=AUTH)
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert served.get(Kind.AUDIO, pid).status_code == 404
    assert served.http.delete(f"/v1/audio-projects/{pid}", headers=AUTH).status_code == 404
    assert served.http.get(url).status_code == 404
    assert [e.status_code for e in served.sim.events() if e.what == "delete"] == [204, 404]


def test_get_after_delete_can_answer_disabled_instead(serve_sim: Serve) -> None:
    """With after_delete='disabled' the deleted project reads enabled: false, no downloads."""
    served = serve_sim(replace(FIXED, after_delete="disabled"))
    (pid,) = served.sim.create_projects(Kind.VIDEO, overrides=DONE)
    assert served.http.delete(f"/v1/video-projects/{pid}", headers=AUTH).status_code == 204
    body = served.get(Kind.VIDEO, pid).json()
    assert (body["enabled"], body["downloads"], body["download"]) == (False, [], None)


# --- admin ---------------------------------------------------------------------------------


def test_admin_api_creates_projects_tells_the_truth_and_lists_events(serve_sim: Serve) -> None:
    """POST /sim/projects, GET /sim/projects/{id} and GET /sim/events mirror the Python API."""
    served = serve_sim()
    overrides = {"status": "error", "queued_seconds": 0, "rendering_seconds": 0, "outputs": 1}
    created = served.http.post(
        "/sim/projects", headers=AUTH, json={"kind": "video", "count": 2, "overrides": overrides}
    )
    assert created.status_code == 201
    ids = created.json()["ids"]
    assert len(ids) == 2
    assert served.get(Kind.VIDEO, ids[0]).json()["status"] == "error"
    truth = served.http.get(f"/sim/projects/{ids[0]}", headers=AUTH).json()
    assert truth["kind"] == "video"
    assert truth["status"] == "error"
    assert truth["timeline"]["error"]["code"]
    assert truth["outputs"][0]["sha256"] == served.sim.expected_sha256(ids[0], 0)
    events = served.http.get("/sim/events", headers=AUTH).json()["events"]
    assert [(e["seq"], e["what"], e["method"], e["status_code"]) for e in events] == [
        (1, "admin", "POST", 201),
        (2, "get", "GET", 200),
        (3, "admin", "GET", 200),
    ]
    assert events[1]["project_id"] == ids[0]
    assert events[1]["user_agent"].startswith("python-httpx/")
    assert served.http.get("/sim/projects/cmissing", headers=AUTH).status_code == 404


def test_admin_api_requires_the_token_and_validates_input(serve_sim: Serve) -> None:
    """Admin endpoints answer 401 without the token and 400 on a bad request."""
    served = serve_sim()
    assert served.http.post("/sim/projects", json={"kind": "image"}).status_code == 401
    assert served.http.get("/sim/events").status_code == 401
    for body in ({"kind": "gif"}, {"kind": "image", "count": 0}, {"overrides": {"size": 1}}):
        response = served.http.post("/sim/projects", headers=AUTH, json=body)
        assert response.status_code == 400, body
        assert response.json()["message"]
    first_id = Simulator(FIXED).create_projects(Kind.IMAGE)
    assert served.sim.create_projects(Kind.IMAGE) == first_id  # the bad requests created none


def test_admin_endpoints_are_never_faulted(serve_sim: Serve) -> None:
    """Even when every API call and download is faulted, the admin API answers normally."""
    served = serve_sim(replace(FIXED, faults=Faults(rate_reset=1.0)))
    created = served.http.post("/sim/projects", headers=AUTH, json={"kind": "image"})
    (pid,) = created.json()["ids"]
    assert served.http.get(f"/sim/projects/{pid}", headers=AUTH).status_code == 200
    assert served.http.get("/sim/events", headers=AUTH).status_code == 200
    with pytest.raises(httpx.TransportError):
        served.get(Kind.IMAGE, pid)


# --- faults --------------------------------------------------------------------------------


def test_rate_limits_carry_retry_after_in_both_forms(serve_sim: Serve) -> None:
    """429 answers alternate Retry-After between delta-seconds and an HTTP-date."""
    served = serve_sim(replace(FIXED, faults=Faults(rate_429=1.0, retry_after=7)))
    (pid,) = served.sim.create_projects(Kind.IMAGE)
    first, second = served.get(Kind.IMAGE, pid), served.get(Kind.IMAGE, pid)
    assert (first.status_code, second.status_code) == (429, 429)
    assert first.headers["retry-after"] == "7"
    assert parsedate_to_datetime(second.headers["retry-after"]).timestamp() == T0 + 7
    assert [e.fault for e in served.sim.events()] == ["429", "429"]


def test_server_errors_vary_in_status_and_body(serve_sim: Serve) -> None:
    """5xx faults use 500/502/503/504 with HTML, empty or JSON bodies, and change nothing."""
    served = serve_sim(replace(FIXED, faults=Faults(rate_5xx=1.0)))
    (pid,) = served.sim.create_projects(Kind.AUDIO, overrides=DONE)
    responses = [served.http.delete(f"/v1/audio-projects/{pid}", headers=AUTH) for _ in range(30)]
    assert {r.status_code for r in responses} == {500, 502, 503, 504}
    kinds = {r.headers.get("content-type", "").split(";")[0] for r in responses if r.content}
    assert kinds == {"text/html", "application/json"}
    assert any(r.content == b"" for r in responses)
    assert not served.sim.truth(pid).deleted


def test_resets_drop_the_connection_without_a_response(serve_sim: Serve) -> None:
    """A reset fault closes the socket before any byte, for API calls and downloads alike."""
    served = serve_sim()
    (pid,) = served.sim.create_projects(Kind.IMAGE, overrides=DONE)
    url = served.download_url(Kind.IMAGE, pid)
    served.sim.set_faults(Faults(rate_reset=1.0))
    with pytest.raises(httpx.TransportError):
        served.get(Kind.IMAGE, pid)
    with pytest.raises(httpx.TransportError):
        served.http.get(url)
    resets = served.sim.events()[-2:]
    assert [(e.what, e.status_code, e.fault) for e in resets] == [
        ("get", None, "reset"),
        ("download", None, "reset"),
    ]
    served.sim.set_faults(Faults())
    assert served.get(Kind.IMAGE, pid).status_code == 200


def test_broken_json_is_a_200_whose_body_is_not_the_project(serve_sim: Serve) -> None:
    """A proxy page or truncated JSON arrives with status 200 and does not parse as a project."""
    served = serve_sim(replace(FIXED, faults=Faults(rate_broken_json=1.0)))
    (pid,) = served.sim.create_projects(Kind.IMAGE, overrides=DONE)
    bodies = [served.get(Kind.IMAGE, pid) for _ in range(12)]
    assert {b.status_code for b in bodies} == {200}
    assert {b.headers["content-type"].split(";")[0] for b in bodies} == {
        "text/html",
        "application/json",
    }
    for body in bodies:
        with pytest.raises(ValueError, match=r"."):
            body.json()


def test_truncated_downloads_promise_more_than_they_send(serve_sim: Serve) -> None:
    """Content-Length announces the whole body, fewer bytes arrive, then the connection closes."""
    served = serve_sim()
    (pid,) = served.sim.create_projects(Kind.VIDEO, overrides=replace(DONE, output_size=300_000))
    url = served.download_url(Kind.VIDEO, pid)
    served.sim.set_faults(Faults(rate_truncate=1.0))
    received, headers = bytearray(), httpx.Headers()
    with pytest.raises(httpx.RemoteProtocolError):
        stream_into(served.http, url, received, headers)
    assert headers["content-length"] == "300000"
    assert 0 < len(received) < 300_000
    assert bytes(received) == served.sim.expected_bytes(pid, 0)[: len(received)]
    wait_for(lambda: served.last_event().bytes_sent is not None)
    event = served.last_event()
    assert (event.fault, event.completed, event.bytes_sent) == ("truncate", False, len(received))


def test_slow_downloads_stall_mid_body_then_finish(serve_sim: Serve) -> None:
    """A slow fault pauses after the first chunk for slow_seconds; the bytes are still right."""
    served = serve_sim()
    (pid,) = served.sim.create_projects(Kind.AUDIO, overrides=replace(DONE, output_size=100_000))
    url = served.download_url(Kind.AUDIO, pid)
    served.sim.set_faults(Faults(rate_slow=1.0, slow_seconds=0.3))
    started = time.monotonic()
    response = served.http.get(url)
    assert time.monotonic() - started >= 0.3
    assert response.content == served.sim.expected_bytes(pid, 0)
    wait_for(lambda: served.last_event().completed is True)
    assert served.last_event().fault == "slow"


def test_a_1_gib_output_streams_any_range_and_stops_when_the_client_leaves(
    serve_sim: Serve,
) -> None:
    """A 1 GiB output serves its tail at once, and a client that hangs up ends the stream."""
    served = serve_sim()
    size = 1 << 30
    (pid,) = served.sim.create_projects(Kind.VIDEO, overrides=replace(DONE, output_size=size))
    url = served.download_url(Kind.VIDEO, pid)
    tail = served.http.get(url, headers={"Range": f"bytes={size - 70_000}-"})
    output = served.sim.output(pid, 0)
    assert tail.content == b"".join(served.sim.chunks(output, size - 70_000, size))
    assert served.http.head(url).headers["content-length"] == str(size)
    with served.http.stream("GET", url) as response:
        assert response.headers["content-length"] == str(size)
        next(response.iter_raw())
    wait_for(lambda: served.last_event().bytes_sent is not None)
    event = served.last_event()
    assert event.completed is False
    assert event.bytes_sent is not None
    assert event.bytes_sent < size // 4


def test_a_50_mb_output_downloads_whole_and_matches_its_sha256(serve_sim: Serve) -> None:
    """A 50 MB body streams in full and hashes to what the simulator reports."""
    served = serve_sim()
    size = 50_000_000
    (pid,) = served.sim.create_projects(Kind.VIDEO, overrides=replace(DONE, output_size=size))
    digest = hashlib.sha256()
    with served.http.stream("GET", served.download_url(Kind.VIDEO, pid)) as response:
        for chunk in response.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == served.sim.expected_sha256(pid, 0)


# --- the server and the command ------------------------------------------------------------


def test_servers_start_and_stop_quickly_many_times_in_one_process() -> None:
    """Each server gets its own port, answers, stops in well under a second and frees its port."""
    for _ in range(3):
        server = SimulatorServer()
        with server:
            port = server.port
            assert httpx.get(f"{server.base_url}/sim/events", headers=AUTH).status_code == 200
            started = time.monotonic()
        assert time.monotonic() - started < 1.0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/sim/events")
        server.stop()


_COMMAND = (
    "import argparse, sys\n"
    "from watcher.simulator import cli\n"
    "parser = argparse.ArgumentParser()\n"
    "cli.add_arguments(parser)\n"
    "sys.exit(cli.run(parser.parse_args(sys.argv[1:])))\n"
)


def test_the_command_prints_projects_and_serves_until_sigterm() -> None:
    """`watcher simulate` prints kind:id lines and its URL, serves, and exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--port=0", "--image=2", "--audio=1", "--seed=4", "--token=mhk_live_cli"]
    with subprocess.Popen(
        [sys.executable, "-c", _COMMAND, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(4)]
        expected = Simulator(SimConfig(seed=4))
        ids = expected.create_projects(Kind.IMAGE, 2) + expected.create_projects(Kind.AUDIO)
        assert lines[:3] == [f"image:{ids[0]}", f"image:{ids[1]}", f"audio:{ids[2]}"]
        prefix, _, rest = lines[3].partition(" on ")
        base_url, _, token = rest.partition(" with token ")
        assert (prefix, token) == ("# simulator listening", "mhk_live_cli")
        response = httpx.get(
            f"{base_url}/v1/audio-projects/{ids[2]}",
            headers={"Authorization": "Bearer mhk_live_cli"},
        )
        assert response.json()["status"] in {s.value for s in RemoteStatus}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
