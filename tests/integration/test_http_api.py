"""The control API over real TCP: a daemon in-process with its HTTP server on 127.0.0.1, real
SQLite and the real simulator."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.integration.http_support import CONTROL_TOKEN, eventually, running
from tests.support import Intercepted, watcher_settings
from watcher import __version__, clock
from watcher.daemon import Daemon
from watcher.http.app import MAX_BODY_BYTES, create_app, route_table
from watcher.http.openapi import openapi_document
from watcher.models import Kind, ProjectRef, RemoteStatus, State
from watcher.simulator.config import Faults, SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.timeline import ProjectOverrides
from watcher.store import SQLiteStore
from watcher.store.postgres import PostgresStore
from watcher.wiring import build

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]
JSON = {"content-type": "application/json"}
QUIET = SimConfig(
    seed=21,
    queued_seconds=(0.05, 0.2),
    rendering_seconds=(0.05, 0.3),
    error_rate=0,
    cancel_rate=0,
    output_bytes=(1_000, 5_000),
)


def make_daemon(
    server: SimulatorServer,
    root: Path,
    transport: httpx.AsyncBaseTransport | None = None,
    **extra: str,
) -> Daemon:
    """A daemon of ``server`` with a control token, on a SQLite file under ``root``."""
    extra.setdefault("control_token", CONTROL_TOKEN)
    settings = watcher_settings(server, root, **extra)
    store = SQLiteStore(str(root / "watcher.db"), exclusive=True)
    return build(settings, store, transport=transport)


async def project_state(client: httpx.AsyncClient, pid: str) -> str:
    """The project's state as the API shows it."""
    response = await client.get(f"/v1/projects/{pid}")
    assert response.status_code == 200, response.text
    state: str = response.json()["state"]
    return state


def validate(document: dict[str, Any], schema: str, instance: object) -> None:
    """Validate ``instance`` against a component schema of the OpenAPI ``document``."""
    root = {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
    jsonschema.Draft202012Validator(root).validate(instance)


async def test_health_and_readiness_answer(serve: Serve, tmp_path: Path) -> None:
    """/healthz and /readyz answer 200 without a token on a healthy daemon."""
    async with (
        running(make_daemon(serve(QUIET), tmp_path)) as run,
        httpx.AsyncClient(base_url=run.server.url) as anonymous,
    ):
        health = await anonymous.get("/healthz")
        ready = await anonymous.get("/readyz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["checks"] == {
        "store": "ok",
        "api_credentials": "ok",
        "api_payment": "ok",
        "shutting_down": False,
    }
    assert ready.json()["warnings"] == []


async def test_track_show_list_and_untrack(serve: Serve, tmp_path: Path) -> None:
    """POST tracks (201, then 200), the project is saved and shown with its files, and DELETE
    stops tracking it without any DELETE reaching Magic Hour or any saved file being removed."""
    server = serve(QUIET)
    (pid,) = server.simulator.create_projects(
        Kind.VIDEO, 1, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    async with running(make_daemon(server, tmp_path)) as run:
        client = run.client
        first = await client.post("/v1/projects", json={"id": pid, "kind": "video"})
        again = await client.post("/v1/projects", json={"id": pid, "kind": "video"})
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.headers["location"] == f"/v1/projects/{pid}"
        assert first.json()["delete_after_download"] is False
        other = await client.post(
            "/v1/projects", json={"id": "cm0other", "kind": "audio", "delete_after_download": True}
        )
        assert other.json()["delete_after_download"] is True

        assert await _wait_state(client, pid, {"saved"}) == "saved"
        shown = (await client.get(f"/v1/projects/{pid}")).json()
        assert shown["outputs"]
        for output in shown["outputs"]:
            data = (tmp_path / "downloads" / output["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == output["sha256"]
            assert output["state"] == "saved"

        listed = (await client.get("/v1/projects")).json()
        assert [p["id"] for p in listed["projects"]] == sorted([pid, "cm0other"])
        assert listed["next_cursor"] is None

        gone = await client.delete(f"/v1/projects/{pid}")
        assert (gone.status_code, gone.content) == (204, b"")
        assert (await client.get(f"/v1/projects/{pid}")).status_code == 404
        assert (await client.delete(f"/v1/projects/{pid}")).status_code == 404
        assert (await client.delete("/v1/projects/cm0other")).status_code == 204
        assert (await client.get("/v1/projects")).json()["projects"] == []
        await asyncio.sleep(0.3)
    assert not [e for e in server.simulator.events() if e.what == "delete"]
    for output in shown["outputs"]:
        assert (tmp_path / "downloads" / output["path"]).is_file()


async def _wait_state(client: httpx.AsyncClient, pid: str, wanted: set[str]) -> str:
    async def check() -> str | None:
        state = await project_state(client, pid)
        return state if state in wanted else None

    result: str = await eventually(check, within=15)
    return result


BAD_TRACKS: list[tuple[bytes, int, str]] = [
    (b'{"id": "bad/id", "kind": "image"}', 400, "invalid_id"),
    (b'{"id": "", "kind": "image"}', 400, "invalid_id"),
    (b'{"kind": "image"}', 400, "invalid_id"),
    (b'{"id": "cm1", "kind": "gif"}', 400, "invalid_kind"),
    (b'{"id": "cm1"}', 400, "invalid_kind"),
    (b'{"id": "cm1", "kind": "image"', 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b"[]", 400, "invalid_request"),
    (b'{"id": "cm1", "kind": "image", "color": "red"}', 400, "invalid_request"),
    (b'{"id": "cm1", "kind": "image", "delete_after_download": "yes"}', 400, "invalid_request"),
    (
        b'{"id": "cm1", "kind": "image", "pad": "' + b"x" * MAX_BODY_BYTES + b'"}',
        413,
        "body_too_large",
    ),
]


async def test_bad_requests_get_clear_json_errors(serve: Serve, tmp_path: Path) -> None:
    """Bad ids, unknown kinds, bad JSON, unknown fields and oversized bodies (declared or
    streamed) are refused with a JSON error naming the problem, and nothing is tracked."""
    async with running(make_daemon(serve(QUIET), tmp_path)) as run:
        client = run.client
        for body, status, error in BAD_TRACKS:
            response = await client.post("/v1/projects", content=body, headers=JSON)
            assert response.status_code == status, (body[:60], response.text)
            assert response.json()["error"] == error
            assert response.json()["message"]

        async def chunks() -> Any:
            for _ in range(80):
                yield b"x" * 1024

        streamed = await client.post("/v1/projects", content=chunks(), headers=JSON)
        assert (streamed.status_code, streamed.json()["error"]) == (413, "body_too_large")

        for query, fragment in [
            ("?status=finished", "unknown status"),
            ("?limit=0", "limit"),
            ("?limit=1001", "limit"),
            ("?limit=ten", "limit"),
            ("?cursor=../x", "cursor"),
            ("?state=saved", "unknown query parameters: state"),
        ]:
            response = await client.get(f"/v1/projects{query}")
            assert response.status_code == 400, query
            assert fragment in response.json()["message"]
        assert (await client.get("/v1/projects/bad.id")).json()["error"] == "invalid_id"
        assert (await client.get("/v1/projects/cmnothere")).json()["error"] == "not_tracked"
        assert (await client.get("/v1/nothing")).json()["error"] == "not_found"
        put = await client.put("/v1/projects/cm1")
        assert (put.status_code, put.json()["error"]) == (405, "method_not_allowed")
        assert (await client.get("/v1/projects")).json()["projects"] == []


async def test_a_kind_conflict_is_refused(serve: Serve, tmp_path: Path) -> None:
    """Tracking a tracked id again as another kind is refused with 409 and changes nothing."""
    async with running(make_daemon(serve(QUIET), tmp_path)) as run:
        await run.client.post("/v1/projects", json={"id": "cmsame", "kind": "image"})
        response = await run.client.post("/v1/projects", json={"id": "cmsame", "kind": "video"})
        assert (response.status_code, response.json()["error"]) == (409, "kind_conflict")
        assert (await run.client.get("/v1/projects/cmsame")).json()["kind"] == "image"


async def test_the_tracking_api_refuses_a_missing_or_wrong_token(
    serve: Serve, tmp_path: Path
) -> None:
    """Every /v1 route answers 401 (with WWW-Authenticate) without the right bearer token, and
    nothing changes; health, metrics and the document stay open."""
    async with running(make_daemon(serve(QUIET), tmp_path)) as run:
        await run.client.post("/v1/projects", json={"id": "cmkept", "kind": "image"})
        for authorization in (None, "Bearer wrong-token", f"Basic {CONTROL_TOKEN}", "Bearer"):
            headers = {} if authorization is None else {"authorization": authorization}
            async with httpx.AsyncClient(base_url=run.server.url, headers=headers) as client:
                answers = [
                    await client.get("/v1/projects"),
                    await client.post("/v1/projects", json={"id": "cmnew", "kind": "image"}),
                    await client.get("/v1/projects/cmkept"),
                    await client.delete("/v1/projects/cmkept"),
                ]
                for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
                    assert (await client.get(path)).status_code == 200, path
            for answer in answers:
                assert answer.status_code == 401, authorization
                assert answer.json()["error"] == "unauthorized"
                assert answer.headers["www-authenticate"].startswith("Bearer")
        page = (await run.client.get("/v1/projects")).json()
        assert [p["id"] for p in page["projects"]] == ["cmkept"]


async def test_without_a_control_token_loopback_needs_no_auth(serve: Serve, tmp_path: Path) -> None:
    """On a loopback address without WATCHER_CONTROL_TOKEN, the API takes requests as they are."""
    async with (
        running(make_daemon(serve(QUIET), tmp_path, control_token="")) as run,
        httpx.AsyncClient(base_url=run.server.url) as client,
    ):
        response = await client.post("/v1/projects", json={"id": "cmopen", "kind": "audio"})
    assert response.status_code == 201


async def walk_pages(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    """Every page of ``GET /v1/projects`` with ``params``, following ``next_cursor``."""
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = (
            await client.get(
                "/v1/projects", params={**params, **({"cursor": cursor} if cursor else {})}
            )
        ).json()
        pages.append(page)
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


def ids_of(pages: list[dict[str, Any]]) -> list[str]:
    """The project ids of ``pages``, in the order they came."""
    return [p["id"] for page in pages for p in page["projects"]]


async def test_pagination_walks_a_thousand_projects_once_each(serve: Serve, tmp_path: Path) -> None:
    """1,000 tracked projects come back over 10 pages of 100, in id order, each exactly once."""
    ids = [f"cmpage{i:04d}" for i in range(1000)]
    # A budget of one API call per 1,000 s keeps the daemon from polling them meanwhile.
    daemon = make_daemon(
        serve(QUIET), tmp_path, max_requests_per_second="0.001", shutdown_grace="0"
    )
    async with running(daemon) as run:
        await daemon.track([ProjectRef(Kind.IMAGE, i) for i in ids], delete_after_download=False)
        pages = await walk_pages(run.client, limit="100")
        assert len(pages) == 10
        assert ids_of(pages) == sorted(ids)
        assert sum(pages[-1]["counts"].values()) == 1000
        whole = (await run.client.get("/v1/projects", params={"limit": "1000"})).json()
        assert len(whole["projects"]) == 1000
        assert whole["next_cursor"] is None


async def test_a_status_filter_pages_through_only_that_state(serve: Serve, tmp_path: Path) -> None:
    """``?status=`` with a cursor walks every page of that state, and only that state."""
    ids = [f"cmfilter{i:04d}" for i in range(300)]
    daemon = make_daemon(
        serve(QUIET), tmp_path, max_requests_per_second="0.001", shutdown_grace="0"
    )
    async with running(daemon) as run:
        await daemon.track([ProjectRef(Kind.IMAGE, i) for i in ids], delete_after_download=False)
        claims = await daemon.store.claim_due(
            now=clock.now() + 3600, limit=300, owner="test", lease_seconds=60
        )
        canceled = sorted(c.id for c in claims if int(c.id[-4:]) % 3 == 0)
        for claim in claims:
            if claim.id in canceled:
                await daemon.store.record_final(claim, now=clock.now(), state=State.CANCELED)
        for status, expected in (
            ("canceled", canceled),
            ("polling", sorted(set(ids) - set(canceled))),
        ):
            pages = await walk_pages(run.client, status=status, limit="40")
            assert len(pages) > 1
            assert {p["state"] for page in pages for p in page["projects"]} == {status}
            assert ids_of(pages) == expected


async def test_status_filter_lists_only_that_state(serve: Serve, tmp_path: Path) -> None:
    """``?status=`` keeps only projects in that watcher state."""
    server = serve(QUIET)
    done = server.simulator.create_projects(
        Kind.IMAGE, 2, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    waiting = server.simulator.create_projects(Kind.IMAGE, 1, ProjectOverrides(queued_seconds=600))
    daemon = make_daemon(server, tmp_path, projects=" ".join([*done, *waiting]))
    async with running(daemon) as run:
        for pid in done:
            await _wait_state(run.client, pid, {"saved"})
        saved = (await run.client.get("/v1/projects", params={"status": "saved"})).json()
        polling = (await run.client.get("/v1/projects", params={"status": "polling"})).json()
    assert [p["id"] for p in saved["projects"]] == sorted(done)
    assert [p["id"] for p in polling["projects"]] == waiting
    assert saved["counts"] == {"polling": 1, "saved": 2}


async def test_openapi_documents_every_route_and_real_answers_fit_it(
    serve: Serve, tmp_path: Path
) -> None:
    """Every route the app serves is in /openapi.json (and nothing else), and real responses
    validate against the document's schemas."""
    server = serve(QUIET)
    (pid,) = server.simulator.create_projects(
        Kind.IMAGE, 1, ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=2)
    )
    daemon = make_daemon(server, tmp_path, projects=pid)
    async with running(daemon) as run:
        document = (await run.client.get("/openapi.json")).json()
        documented = {
            (path, method.upper())
            for path, item in document["paths"].items()
            for method in item
            if method != "parameters"
        }
        assert documented == route_table(create_app(daemon, daemon.store, daemon.metrics))
        await _wait_state(run.client, pid, {"saved"})
        validate(document, "Project", (await run.client.get(f"/v1/projects/{pid}")).json())
        validate(document, "ProjectPage", (await run.client.get("/v1/projects")).json())
        validate(document, "Readiness", (await run.client.get("/readyz")).json())
        validate(document, "Health", (await run.client.get("/healthz")).json())
        validate(document, "Error", (await run.client.get("/v1/projects/x.y")).json())
    assert document == openapi_document()
    assert document["openapi"].startswith("3.1")


async def test_metrics_parse_and_count_what_happened(serve: Serve, tmp_path: Path) -> None:
    """/metrics is Prometheus text that the official parser reads, with projects by state (zero
    for empty states), polls, API responses, downloads and their histograms."""
    server = serve(QUIET)
    done = server.simulator.create_projects(
        Kind.IMAGE, 3, ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=1)
    )
    async with running(make_daemon(server, tmp_path, projects=" ".join(done))) as run:
        for pid in done:
            await _wait_state(run.client, pid, {"saved"})
        response = await run.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("watcher_projects", (("scope", "fleet"), ("state", "saved")))] == 3
    assert samples[("watcher_projects", (("scope", "fleet"), ("state", "polling")))] == 0
    assert samples[("watcher_projects", (("scope", "fleet"), ("state", "failed")))] == 0
    assert samples[("watcher_polls_total", (("kind", "image"),))] >= 3
    assert samples[("watcher_api_responses_total", (("code", "200"), ("method", "GET")))] >= 3
    assert samples[("watcher_downloads_total", (("result", "saved"),))] == 3
    assert samples[("watcher_download_bytes_total", ())] > 0
    assert samples[("watcher_download_seconds_count", ())] == 3
    assert samples[("watcher_url_lifetime_left_seconds_count", ())] == 3
    assert samples[("watcher_time_to_terminal_seconds_count", ())] == 3
    assert samples[("watcher_rate_limit_paused_seconds", ())] == 0
    assert (
        samples[("watcher_http_requests_total", (("code", "200"), ("route", "/v1/projects/{id}")))]
        >= 3
    )


async def test_metrics_carry_the_standard_series_build_info_and_useful_lifetimes(
    serve: Serve, tmp_path: Path
) -> None:
    """/metrics over HTTP has the process_* and python_* series, watcher_build_info with the
    version, the fleet-wide gauges labelled scope="fleet", and URL lifetimes fine enough that a
    download made seconds after a 24 h URL was issued lands in a bucket narrower than an hour."""
    server = serve(QUIET)
    done = server.simulator.create_projects(
        Kind.IMAGE, 2, ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=1)
    )
    async with running(make_daemon(server, tmp_path, projects=" ".join(done))) as run:
        for pid in done:
            await _wait_state(run.client, pid, {"saved"})
        response = await run.client.get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        assert families[name].samples[0].value > 0, name
    assert families["python_info"].samples[0].labels["implementation"]
    assert "python_gc_collections" in families
    (build,) = families["watcher_build_info"].samples
    assert (build.labels, build.value) == ({"version": __version__}, 1)
    assert {s.labels["scope"] for s in families["watcher_projects"].samples} == {"fleet"}
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for s in families["watcher_url_lifetime_left_seconds"].samples
        if s.name.endswith("_bucket")
    )
    lowest_with_both = next(i for i, (_, count) in enumerate(buckets) if count == 2)
    assert lowest_with_both > 0
    width = buckets[lowest_with_both][0] - buckets[lowest_with_both - 1][0]
    assert width <= 600, buckets  # the simulator's URLs live 24 h; both were fresh
    assert buckets[0][0] <= 60  # a nearly expired URL is told apart too
    assert max(b for b, _ in buckets if b != float("inf")) > 24 * 3600


async def test_only_one_replica_reports_the_fleet_gauges(
    serve: Serve, tmp_path: Path, pg_url: str
) -> None:
    """Two replicas on one PostgreSQL store: scraped over HTTP, exactly one exposes
    watcher_projects (with the fleet's counts), so summing over replicas does not double them;
    both expose their own counters and build info."""
    server = serve(QUIET)
    done = server.simulator.create_projects(
        Kind.IMAGE, 2, ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=1)
    )

    def replica(name: str, **extra: str) -> Daemon:
        settings = watcher_settings(
            server,
            tmp_path,
            database_url=pg_url,
            replica_id=name,
            control_token=CONTROL_TOKEN,
            **extra,
        )
        return build(settings, PostgresStore(pg_url, max_size=4))

    async with (
        running(replica("a", projects=" ".join(done))) as a,
        running(replica("b")) as b,
    ):
        for pid in done:
            await _wait_state(a.client, pid, {"saved"})
        scrapes = [(await run.client.get("/metrics")).text for run in (a, b)]
    reported = []
    for text in scrapes:
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert "watcher_build_info" in families
        samples = families["watcher_projects"].samples if "watcher_projects" in families else []
        reported.append({s.labels["state"]: s.value for s in samples})
    assert sorted(len(r) for r in reported) == [0, len(State)]
    fleet = sum((Counter(r) for r in reported), Counter[str]())
    assert fleet["saved"] == 2


async def test_metrics_count_retries_rate_limit_pauses_and_deletes(
    serve: Serve, tmp_path: Path
) -> None:
    """Faults show up as retries by cause and client-wide pauses; deletes are counted by result."""
    server = serve(QUIET)
    done = server.simulator.create_projects(
        Kind.IMAGE, 4, ProjectOverrides(status=RemoteStatus.COMPLETE, outputs=1)
    )
    faults = [
        httpx.Response(429, headers={"Retry-After": "0"}, json={"message": "slow down"}),
        httpx.Response(503, json={"message": "unavailable"}),
    ]

    def first_calls_fail(request: httpx.Request) -> httpx.Response | None:
        """The first two API calls: a 429, then a 503; everything after goes through."""
        if "-projects/" in request.url.path and faults:
            return faults.pop(0)
        return None

    daemon = make_daemon(
        server,
        tmp_path,
        Intercepted(first_calls_fail),
        projects=" ".join(done),
        delete_after_download="true",
    )
    async with running(daemon) as run:
        for pid in done:
            await _wait_state(run.client, pid, {"deleted"})
        response = await run.client.get("/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    retries = {
        labels: n for (name, labels), n in samples.items() if name == "watcher_retries_total"
    }
    assert not faults  # both were served
    assert retries[(("cause", "rate_limited"),)] == 1, samples
    assert retries[(("cause", "http_503"),)] == 1, samples
    assert samples[("watcher_rate_limit_pauses_total", ())] == 1
    assert samples[("watcher_deletes_total", (("result", "deleted"),))] == 4


async def test_a_refused_token_keeps_readiness_and_shows_in_the_body_and_metrics(
    serve: Serve, tmp_path: Path
) -> None:
    """Once Magic Hour answers 401, /readyz still answers 200 (the pod stays in the Service, so
    webhooks and the control API keep working) with the credentials check and a warning naming
    the token, and watcher_api_refused{reason="unauthorized"} is 1."""
    server = serve(QUIET)
    async with running(make_daemon(server, tmp_path)) as run:
        server.simulator.set_token("mhk_live_rotated")
        await run.client.post("/v1/projects", json={"id": "cmrefused", "kind": "image"})
        await eventually(lambda: run.daemon.health.unauthorized)
        ready = await run.client.get("/readyz")
        tracked = await run.client.post("/v1/projects", json={"id": "cmstill", "kind": "image"})
        metrics = await run.client.get("/metrics")
        document = (await run.client.get("/openapi.json")).json()
    assert ready.status_code == 200
    body = ready.json()
    validate(document, "Readiness", body)
    assert body["ready"] is True
    assert body["checks"]["api_credentials"] == "refused"
    assert body["problems"] == []
    assert "WATCHER_API_TOKEN" in body["warnings"][0]
    assert tracked.status_code == 201
    refused = {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(metrics.text)
        if family.name == "watcher_api_refused"
        for s in family.samples
    }
    assert refused == {"unauthorized": 1, "payment_required": 0}


async def test_payment_required_keeps_readiness_and_shows_in_the_body(
    serve: Serve, tmp_path: Path
) -> None:
    """A 402 from Magic Hour is reported by /readyz (checks.api_payment, a warning) and the
    gauge, with the answer still 200."""
    server = serve(QUIET)

    def payment_required(request: httpx.Request) -> httpx.Response | None:
        """Every project GET answers 402."""
        if "-projects/" in request.url.path:
            return httpx.Response(402, json={"message": "out of credits"})
        return None

    daemon = make_daemon(server, tmp_path, Intercepted(payment_required))
    async with running(daemon) as run:
        await run.client.post("/v1/projects", json={"id": "cmpay", "kind": "image"})
        await eventually(lambda: run.daemon.health.payment_required)
        ready = await run.client.get("/readyz")
        metrics = await run.client.get("/metrics")
    assert ready.status_code == 200
    assert ready.json()["checks"]["api_payment"] == "required"
    assert "402" in ready.json()["warnings"][0]
    assert 'watcher_api_refused{reason="payment_required"} 1.0' in metrics.text


async def test_readiness_fails_while_shutting_down_then_the_port_closes(
    serve: Serve, tmp_path: Path
) -> None:
    """During the shutdown drain /readyz answers 503 (and /healthz 200); afterwards nothing
    listens on the port any more."""
    server = serve(
        SimConfig(
            seed=4, faults=Faults(rate_slow=1.0, slow_seconds=0.8), error_rate=0, cancel_rate=0
        )
    )
    (pid,) = server.simulator.create_projects(Kind.IMAGE, 1)
    with capture_logs() as logs:
        async with running(make_daemon(server, tmp_path, projects=pid)) as run:
            await asyncio.sleep(0.3)  # the first GET is in flight, and slow
            run.daemon.request_stop()
            ready = await run.client.get("/readyz")
            health = await run.client.get("/healthz")
            await asyncio.wait_for(run.task, 20)
            with pytest.raises(httpx.ConnectError):
                await run.client.get("/healthz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["shutting_down"] is True
    assert health.status_code == 200
    events = [e["event"] for e in logs]
    assert events.index("http_stopped") > events.index("shutdown_requested")
