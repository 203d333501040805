"""The control API's client (``watcher track/status --url``) against ``httpx.MockTransport``."""

from __future__ import annotations

import json

import httpx
import pytest

from watcher.http.client import ControlApiError, ControlClient
from watcher.models import Kind, ProjectRef

URL = "http://watcher.test:8080"


def page(ids: list[str], next_cursor: str | None) -> dict[str, object]:
    """A ``GET /v1/projects`` answer listing ``ids``."""
    return {
        "projects": [{"id": pid} for pid in ids],
        "next_cursor": next_cursor,
        "counts": {"polling": 5},
    }


def test_track_sends_the_token_and_reports_new_or_known() -> None:
    """``track`` POSTs id and kind with the bearer token; 201 means new, 200 already tracked."""
    seen: list[httpx.Request] = []

    def api(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201 if len(seen) == 1 else 200, json={"id": "cm1"})

    with ControlClient(URL + "/", "tok", transport=httpx.MockTransport(api)) as client:
        first, _ = client.track(ProjectRef(Kind.VIDEO, "cm1"))
        again, _ = client.track(ProjectRef(Kind.VIDEO, "cm1"), delete_after_download=True)
    assert (first, again) == (True, False)
    assert seen[0].headers["authorization"] == "Bearer tok"
    assert str(seen[0].url) == f"{URL}/v1/projects"
    assert json.loads(seen[0].content) == {"id": "cm1", "kind": "video"}
    assert json.loads(seen[1].content)["delete_after_download"] is True


def test_status_follows_cursors_up_to_the_limit() -> None:
    """``status`` walks pages by ``next_cursor`` and stops at ``limit`` projects."""
    pages = {None: page(["a", "b"], "b"), "b": page(["c", "d"], "d"), "d": page(["e"], None)}
    asked: list[dict[str, str]] = []

    def api(request: httpx.Request) -> httpx.Response:
        asked.append(dict(request.url.params))
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    with ControlClient(URL, None, transport=httpx.MockTransport(api)) as client:
        everything = client.status(state="polling", limit=100)
        some = client.status(limit=3)
    assert [p["id"] for p in everything["projects"]] == ["a", "b", "c", "d", "e"]
    assert everything["counts"] == {"polling": 5}
    assert asked[0] == {"limit": "100", "status": "polling"}
    assert asked[1]["cursor"] == "b"
    assert [p["id"] for p in some["projects"]] == ["a", "b", "c"]
    assert asked[-1] == {"limit": "1", "cursor": "b"}


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (httpx.Response(401, json={"error": "unauthorized"}), "WATCHER_CONTROL_TOKEN"),
        (httpx.Response(400, json={"message": "invalid project id"}), "invalid project id"),
        (httpx.Response(502, text="<html>bad gateway</html>"), "HTTP 502"),
    ],
)
def test_refusals_become_clear_errors(answer: httpx.Response, message: str) -> None:
    """A refused token, an error answer or a proxy's page raise ``ControlApiError`` saying so."""
    with (
        ControlClient(URL, "tok", transport=httpx.MockTransport(lambda _: answer)) as client,
        pytest.raises(ControlApiError, match=message),
    ):
        client.status()


def test_an_unreachable_daemon_is_named() -> None:
    """A connection failure names the URL it could not reach."""

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        ControlClient(URL, None, transport=httpx.MockTransport(down)) as client,
        pytest.raises(ControlApiError, match=f"cannot reach the watcher's API at {URL}"),
    ):
        client.track(ProjectRef(Kind.IMAGE, "cm1"))
