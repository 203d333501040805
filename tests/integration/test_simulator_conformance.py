"""The simulator answers like the real API: it satisfies the official SDK and the OpenAPI spec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import jsonschema
import pytest
from magic_hour import AsyncClient, Client
from magic_hour.types import models
from make_api_request import ApiError

from watcher.models import Kind, RemoteStatus
from watcher.simulator import ProjectOverrides, SimConfig, Simulator, SimulatorServer

ROOT = Path(__file__).resolve().parents[2]
SPEC_NAME = "magic-hour-api.openapi.json"
# The official documents live in shared/, beside the checkout (CI lays a copy there too).
SPEC_PLACES = (ROOT.parent / "shared" / "spec", Path("/work/shared/spec"))
TOKEN = "mhk_live_simulator"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

MODELS: dict[Kind, Any] = {
    Kind.IMAGE: models.V1ImageProjectsGetResponse,
    Kind.VIDEO: models.V1VideoProjectsGetResponse,
    Kind.AUDIO: models.V1AudioProjectsGetResponse,
}
FAR = 3600.0
IN_STATUS = {
    RemoteStatus.QUEUED: ProjectOverrides(queued_seconds=FAR),
    RemoteStatus.RENDERING: ProjectOverrides(queued_seconds=0.0, rendering_seconds=FAR),
    **{
        status: ProjectOverrides(status=status, queued_seconds=0.0, rendering_seconds=0.0)
        for status in (RemoteStatus.COMPLETE, RemoteStatus.ERROR, RemoteStatus.CANCELED)
    },
}


# --- the OpenAPI document as JSON Schema ---------------------------------------------------


@cache
def spec() -> dict[str, Any]:
    """The API's OpenAPI document (3.0), found beside the repository or in the shared folder."""
    for place in SPEC_PLACES:
        if (place / SPEC_NAME).is_file():
            document: dict[str, Any] = json.loads((place / SPEC_NAME).read_text())
            return document
    pytest.fail(f"{SPEC_NAME} not found in any of {[str(p) for p in SPEC_PLACES]}")


def to_json_schema(node: Any) -> Any:
    """Turn an OpenAPI 3.0 schema into JSON Schema: ``nullable: true`` becomes a null type."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: to_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") and "type" in node:
        converted["type"] = [node["type"], "null"]
    return converted


def response_schema(kind: Kind, method: str, status: int) -> dict[str, Any]:
    """The JSON Schema of one documented response."""
    operation = spec()["paths"][f"{kind.api_path}/{{id}}"][method]
    content = operation["responses"][str(status)]["content"]["application/json"]
    schema: dict[str, Any] = to_json_schema(content["schema"])
    return schema


FORMATS = jsonschema.FormatChecker(formats=())


def is_date_time(value: object) -> bool:
    """RFC 3339 date-time with a zone, as the API sends (``2024-10-19T05:16:19.027Z``)."""
    return not isinstance(value, str) or (
        "T" in value and datetime.fromisoformat(value).tzinfo is not None
    )


def is_uri(value: object) -> bool:
    """An absolute URI."""
    return not isinstance(value, str) or bool(urlsplit(value).scheme and urlsplit(value).netloc)


FORMATS.checks("date-time", raises=ValueError)(is_date_time)
FORMATS.checks("uri")(is_uri)


def validate(schema: dict[str, Any], instance: Any) -> None:
    """Validate ``instance`` against ``schema``, formats included."""
    jsonschema.Draft7Validator(schema, format_checker=FORMATS).validate(instance)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorServer]:
    """One simulator for the whole module, on the real clock, with small outputs."""
    config = SimConfig(seed=8, output_bytes=(1_000, 40_000), error_rate=0.0, cancel_rate=0.0)
    with SimulatorServer(Simulator(config)) as running:
        yield running


@pytest.fixture
def http(server: SimulatorServer) -> Iterator[httpx.Client]:
    """A plain HTTP client pointed at the simulator."""
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        yield client


# --- the project object --------------------------------------------------------------------


@pytest.mark.parametrize("status", list(IN_STATUS))
@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_and_status_satisfies_the_sdk_model_and_the_spec(
    server: SimulatorServer, http: httpx.Client, kind: Kind, status: RemoteStatus
) -> None:
    """The GET body validates as the SDK's model and the spec's 200 schema, with no extra field."""
    (pid,) = server.simulator.create_projects(kind, overrides=IN_STATUS[status])
    response = http.get(f"{kind.api_path}/{pid}", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    model = MODELS[kind].model_validate(body)
    assert (model.id, model.status) == (pid, status.value)
    fields = {field.alias or name for name, field in MODELS[kind].model_fields.items()}
    assert set(body) == fields
    validate(response_schema(kind, "get", 200), body)
    assert bool(body["downloads"]) is (status is RemoteStatus.COMPLETE)
    assert (body["error"] is not None) is (status is RemoteStatus.ERROR)


def test_the_spec_schema_does_reject_a_wrong_body(
    server: SimulatorServer, http: httpx.Client
) -> None:
    """The schema check can fail: a body missing a required field or with a bad date is refused."""
    (pid,) = server.simulator.create_projects(Kind.IMAGE)
    body = http.get(f"/v1/image-projects/{pid}", headers=AUTH).json()
    schema = response_schema(Kind.IMAGE, "get", 200)
    for broken in (
        {k: v for k, v in body.items() if k != "image_count"},
        {**body, "created_at": "x"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate(schema, broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(response_schema(Kind.IMAGE, "get", 404), {"message": "Gone"})


@pytest.mark.parametrize("kind", list(Kind))
def test_error_answers_match_the_spec(
    server: SimulatorServer, http: httpx.Client, kind: Kind
) -> None:
    """401 and 404 bodies of GET and DELETE validate against the spec's error schemas."""
    (pid,) = server.simulator.create_projects(kind)
    for method in ("get", "delete"):
        unauthorized = http.request(method.upper(), f"{kind.api_path}/{pid}")
        assert unauthorized.status_code == 401
        validate(response_schema(kind, method, 401), unauthorized.json())
        missing = http.request(method.upper(), f"{kind.api_path}/cmissing", headers=AUTH)
        assert missing.status_code == 404
        validate(response_schema(kind, method, 404), missing.json())
    deleted = http.delete(f"{kind.api_path}/{pid}", headers=AUTH)
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert "204" in spec()["paths"][f"{kind.api_path}/{{id}}"]["delete"]["responses"]


# --- the official SDK against the simulator ------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", list(Kind))
async def test_the_async_sdk_waits_and_downloads_the_exact_bytes(
    server: SimulatorServer, kind: Kind, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's check_result polls to complete and saves files equal to the simulator's bytes."""
    monkeypatch.setenv("MAGIC_HOUR_POLL_INTERVAL", "0.02")
    sim = server.simulator
    overrides = ProjectOverrides(
        status=RemoteStatus.COMPLETE,
        # Long beside the 0.02 s interval, so even a loaded machine sees each phase.
        queued_seconds=0.5,
        rendering_seconds=0.5,
        outputs=2 if kind is Kind.IMAGE else None,
    )
    (pid,) = sim.create_projects(kind, overrides=overrides)
    async with httpx.AsyncClient(timeout=10) as transport:
        client = AsyncClient(token=TOKEN, base_url=server.base_url, httpx_client=transport)
        projects = getattr(client.v1, f"{kind.value}_projects")
        result = await projects.check_result(
            pid, wait_for_completion=True, download_outputs=True, download_directory=str(tmp_path)
        )
    assert result.status == "complete"
    outputs = sim.truth(pid).outputs
    assert [Path(p).name for p in result.downloaded_paths] == [o.name for o in outputs]
    for path, output in zip(result.downloaded_paths, outputs, strict=True):
        assert await anyio.Path(path).read_bytes() == sim.expected_bytes(pid, output.index)
    events = [e for e in sim.events() if e.project_id == pid]
    assert sum(e.what == "get" for e in events) >= 3  # queued, rendering, complete
    downloads = [e for e in events if e.what == "download"]
    assert [(e.completed, e.authorization_sent) for e in downloads] == [(True, False)] * len(
        outputs
    )


@pytest.mark.anyio
@pytest.mark.parametrize("status", [RemoteStatus.ERROR, RemoteStatus.CANCELED])
async def test_the_async_sdk_reports_failed_projects(
    server: SimulatorServer, status: RemoteStatus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_result stops on error and canceled and surfaces the simulator's error object."""
    monkeypatch.setenv("MAGIC_HOUR_POLL_INTERVAL", "0.02")
    sim = server.simulator
    overrides = ProjectOverrides(status=status, queued_seconds=0.0, rendering_seconds=0.05)
    (pid,) = sim.create_projects(Kind.VIDEO, overrides=overrides)
    async with httpx.AsyncClient(timeout=10) as transport:
        client = AsyncClient(token=TOKEN, base_url=server.base_url, httpx_client=transport)
        result = await client.v1.video_projects.check_result(
            pid, wait_for_completion=True, download_outputs=True
        )
    assert result.status == status.value
    assert result.downloaded_paths is None
    expected = sim.truth(pid).timeline.error
    if expected is None:
        assert result.error is None
    else:
        assert (result.error.code, result.error.message) == (expected.code, expected.message)


@pytest.mark.anyio
async def test_the_async_sdk_deletes_and_then_gets_404(server: SimulatorServer) -> None:
    """The SDK's delete succeeds once; its get then raises ApiError with status 404."""
    (pid,) = server.simulator.create_projects(Kind.AUDIO)
    async with httpx.AsyncClient(timeout=10) as transport:
        client = AsyncClient(token=TOKEN, base_url=server.base_url, httpx_client=transport)
        await client.v1.audio_projects.delete(id=pid)
        with pytest.raises(ApiError) as raised:
            await client.v1.audio_projects.get(id=pid)
    assert raised.value.status_code == 404


def test_the_sync_sdk_waits_and_downloads_a_video(
    server: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The synchronous client's check_result also completes and saves the exact bytes."""
    monkeypatch.setenv("MAGIC_HOUR_POLL_INTERVAL", "0.02")
    sim = server.simulator
    overrides = ProjectOverrides(
        status=RemoteStatus.COMPLETE, queued_seconds=0.05, rendering_seconds=0.05
    )
    (pid,) = sim.create_projects(Kind.VIDEO, overrides=overrides)
    with httpx.Client(timeout=10) as transport:
        client = Client(token=TOKEN, base_url=server.base_url, httpx_client=transport)
        result = client.v1.video_projects.check_result(
            pid, wait_for_completion=True, download_outputs=True, download_directory=str(tmp_path)
        )
    assert result.status == "complete"
    assert result.download is not None
    (path,) = result.downloaded_paths
    assert Path(path) == tmp_path / "output.mp4"
    assert Path(path).read_bytes() == sim.expected_bytes(pid, 0)
