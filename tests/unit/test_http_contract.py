"""The OpenAPI document is a contract: it names exactly the routes, methods and query parameters
the app serves, and its parameter schemas accept exactly what the handlers accept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import pytest

from watcher.http.app import LIST_PARAMETERS, create_app, route_table
from watcher.http.openapi import openapi_document
from watcher.settings import load_settings
from watcher.store import InMemoryStore
from watcher.wiring import build

pytestmark = pytest.mark.anyio

DOCUMENT = openapi_document()
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def documented_methods(path: str) -> set[str]:
    """The methods the document gives ``path``."""
    return {m.upper() for m in DOCUMENT["paths"][path] if m != "parameters"}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app of an idle daemon on an in-memory store, without a control token."""
    daemon = build(load_settings({"WATCHER_API_TOKEN": "t"}), InMemoryStore())
    transport = httpx.ASGITransport(app=create_app(daemon, daemon.store, daemon.metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        yield http


def concrete(path: str) -> str:
    """``path`` with its template filled in."""
    return path.replace("{id}", "cm8abc123")


def test_the_document_names_every_route_and_method() -> None:
    """Every (path, method) the app serves is in the document, and nothing else is."""
    daemon = build(load_settings({"WATCHER_API_TOKEN": "t"}), InMemoryStore())
    app = create_app(daemon, daemon.store, daemon.metrics)
    documented = {(path, m) for path in DOCUMENT["paths"] for m in documented_methods(path)}
    assert documented == route_table(app)


@pytest.mark.parametrize("path", sorted(DOCUMENT["paths"]))
async def test_a_wrong_method_is_answered_405_with_every_documented_method(
    client: httpx.AsyncClient, path: str
) -> None:
    """A method a route lacks gets 405 ``method_not_allowed`` whose ``Allow`` header lists every
    method the document gives that path (and HEAD beside GET), not just one route's."""
    allowed = documented_methods(path)
    for method in (m for m in METHODS if m not in allowed):
        response = await client.request(method, concrete(path))
        assert response.status_code == 405, (method, path)
        assert response.json()["error"] == "method_not_allowed"
        header = {m.strip() for m in response.headers["allow"].split(",")}
        assert header == allowed | ({"HEAD"} if "GET" in allowed else set()), (method, path)


def list_parameters() -> dict[str, dict[str, Any]]:
    """The query parameters the document gives ``GET /v1/projects``, by name."""
    return {p["name"]: p for p in DOCUMENT["paths"]["/v1/projects"]["get"]["parameters"]}


def test_the_documented_query_parameters_are_the_accepted_ones() -> None:
    """The document lists exactly the query parameters the handler accepts."""
    assert set(list_parameters()) == LIST_PARAMETERS


SAMPLES = {
    "cursor": ["cm8abc123", "a", "A-b_c", "a" * 64, "a" * 65, "x.y", "-ab", "_ab", "a b", "é"],
    "limit": ["1", "100", "1000", "0", "1001", "ten", "-1", "2.5"],
    "status": ["polling", "saved", "quarantined", "Saved", "unknown", "complete"],
}


def schema_accepts(schema: dict[str, Any], raw: str) -> bool:
    """Whether the query string value ``raw`` is valid under ``schema`` (an integer schema
    reads ``raw`` as the number it spells, as a client would send it)."""
    value: object = raw
    if schema.get("type") == "integer":
        try:
            value = int(raw)
        except ValueError:
            value = raw
    return jsonschema.Draft202012Validator(schema).is_valid(value)


@pytest.mark.parametrize("name", sorted(SAMPLES))
async def test_each_parameter_schema_accepts_exactly_what_the_handler_accepts(
    client: httpx.AsyncClient, name: str
) -> None:
    """For sample values of each query parameter, the documented schema and the handler agree:
    a value the schema allows is answered 200, one it refuses 400 ``invalid_parameter``."""
    schema = list_parameters()[name]["schema"]
    for raw in SAMPLES[name]:
        response = await client.get("/v1/projects", params={name: raw})
        expected = 200 if schema_accepts(schema, raw) else 400
        assert response.status_code == expected, (name, raw, response.text)
        if expected == 400:
            assert response.json()["error"] == "invalid_parameter"


async def test_the_id_parameter_schema_accepts_exactly_what_the_handlers_accept(
    client: httpx.AsyncClient,
) -> None:
    """The documented pattern of ``{id}`` and the handlers agree: an id it allows is looked up
    (404 ``not_tracked`` on an empty store), one it refuses is 400 ``invalid_id``."""
    (parameter,) = DOCUMENT["paths"]["/v1/projects/{id}"]["parameters"]
    for raw in SAMPLES["cursor"]:
        for method in ("GET", "DELETE"):
            response = await client.request(method, f"/v1/projects/{quote(raw)}")
            expected = "not_tracked" if schema_accepts(parameter["schema"], raw) else "invalid_id"
            assert response.json()["error"] == expected, (method, raw)
