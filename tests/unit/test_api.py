"""Unit tests of :mod:`watcher.api` against a scripted fake server (``httpx.MockTransport``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from email.utils import formatdate
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.unit.fake_time import FakeClock
from watcher.api import (
    MAX_BODY_BYTES,
    MAX_RETRY_AFTER,
    MagicHourClient,
    describe_transport_error,
    parse_retry_after,
)
from watcher.errors import (
    ApiError,
    ApiRejected,
    InvalidRequest,
    PaymentRequired,
    ProjectNotFound,
    RateLimited,
    TransientApiError,
    Unauthorized,
    WatcherError,
)
from watcher.metrics import Metrics
from watcher.models import Kind, ProjectRef, RemoteStatus
from watcher.throttle import Throttle

pytestmark = pytest.mark.anyio

TOKEN = "mhk_live_T0kenThatMustNeverLeak9876"
BASE_URL = "https://api.example.test"
REF = ProjectRef(Kind.IMAGE, "cm2xproj0001")

Reply = httpx.Response | Exception
Script = Callable[[httpx.Request], Reply]


def project_json(project_id: str = REF.id, status: str = "rendering") -> dict[str, Any]:
    """A project body as the API sends it, with fields the watcher ignores."""
    return {
        "id": project_id,
        "name": None,
        "status": status,
        "type": "AI_IMAGE",
        "created_at": "2024-10-18T05:16:19.027Z",
        "enabled": True,
        "credits_charged": 5,
        "downloads": [],
        "error": None,
        "image_count": 1,
    }


def ok() -> httpx.Response:
    return httpx.Response(200, json=project_json())


class FakeApi:
    """Answers requests from a script, one reply per request; the last reply repeats."""

    def __init__(self, *replies: Reply | Script) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if callable(reply) and not isinstance(reply, httpx.Response):
            reply = reply(request)
        if isinstance(reply, Exception):
            raise reply
        return reply


class Harness:
    """A client wired to a fake server, a fake clock for its throttle and a fake retry sleep."""

    def __init__(
        self,
        api: FakeApi,
        http: httpx.AsyncClient,
        max_attempts: int,
        token: str = TOKEN,
        reload_token: Callable[[], SecretStr | None] | None = None,
    ) -> None:
        self.api = api
        self.http = http
        self.clock = FakeClock()
        self.retry_sleeps: list[float] = []
        self.retries: list[tuple[str, int, float]] = []
        self.metrics = Metrics()
        self.throttle = Throttle(
            rate=10_000, concurrency=8, now=self.clock.now, sleep=self.clock.sleep
        )
        self.client = MagicHourClient(
            http,
            base_url=BASE_URL + "/",
            token=SecretStr(token),
            throttle=self.throttle,
            max_attempts=max_attempts,
            on_retry=lambda exc, attempt, wait: self.retries.append((exc.cause, attempt, wait)),
            metrics=self.metrics,
            sleep=self._sleep,
            reload_token=reload_token,
        )

    async def _sleep(self, seconds: float) -> None:
        self.retry_sleeps.append(seconds)

    def responses(self, method: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "watcher_api_responses_total", {"method": method, "code": code}
        )
        return value or 0.0


@asynccontextmanager
async def harness(
    *replies: Reply | Script,
    max_attempts: int = 3,
    token: str = TOKEN,
    reload_token: Callable[[], SecretStr | None] | None = None,
) -> AsyncIterator[Harness]:
    api = FakeApi(*replies)
    async with httpx.AsyncClient(transport=httpx.MockTransport(api)) as http:
        yield Harness(api, http, max_attempts, token, reload_token)


def _messages(exc: BaseException) -> Iterator[str]:
    """Every text a traceback of ``exc`` would show: its str and repr, and its chain's."""
    seen: BaseException | None = exc
    while seen is not None:
        yield str(seen)
        yield repr(seen)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)


# --- success -----------------------------------------------------------------------------------


async def test_get_parses_the_project() -> None:
    """A 200 with a project body gives a snapshot, in one request to the kind's path."""
    async with harness(ok()) as h:
        snapshot = await h.client.get_project(REF)
    assert snapshot.id == REF.id
    assert snapshot.status is RemoteStatus.RENDERING
    [request] = h.api.requests
    assert request.method == "GET"
    assert str(request.url) == f"{BASE_URL}/v1/image-projects/{REF.id}"
    assert request.headers["accept"] == "application/json"
    assert h.retry_sleeps == []
    assert h.responses("GET", "200") == 1


@pytest.mark.parametrize("kind", list(Kind))
async def test_each_kind_uses_its_collection(kind: Kind) -> None:
    """Video and audio projects are fetched from their own collections."""
    async with harness(ok()) as h:
        await h.client.get_project(ProjectRef(kind, REF.id))
    assert h.api.requests[0].url.path == f"/v1/{kind.value}-projects/{REF.id}"


async def test_bearer_token_is_sent_to_the_api() -> None:
    """API requests carry the token as a bearer credential."""
    async with harness(ok()) as h:
        await h.client.get_project(REF)
    assert h.api.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


async def test_a_request_carries_the_clients_own_headers_and_timeout() -> None:
    """What ``build_request`` would merge from the client is on every API request: its headers
    (the API's own win where both set one) and its timeout."""
    async with harness(ok()) as h:
        h.http.headers["X-Client"] = "kept"
        h.http.timeout = httpx.Timeout(7.0, connect=3.0)
        client = MagicHourClient(
            h.http, base_url=BASE_URL, token=SecretStr(TOKEN), throttle=h.throttle
        )
        await client.get_project(REF)
    [request] = h.api.requests
    assert request.headers["x-client"] == "kept"
    assert request.headers["accept-encoding"] == h.http.headers["accept-encoding"]
    assert request.headers["accept"] == "application/json"
    assert request.headers.get_list("user-agent") == ["magic-hour-watcher"]
    assert request.extensions["timeout"] == httpx.Timeout(7.0, connect=3.0).as_dict()


async def test_a_new_token_is_sent_from_the_next_request_on() -> None:
    """``set_token`` between requests: the next request carries the new token only."""
    async with harness(ok()) as h:
        await h.client.get_project(REF)
        h.client.set_token(SecretStr(NEW_TOKEN))
        await h.client.get_project(REF)
        await h.client.get_project(REF)
    sent = [r.headers.get_list("authorization") for r in h.api.requests]
    assert sent == [[f"Bearer {TOKEN}"], [f"Bearer {NEW_TOKEN}"], [f"Bearer {NEW_TOKEN}"]]


async def test_a_different_project_in_the_body_is_refused() -> None:
    """A body describing another project is not taken for the one asked about."""
    other = httpx.Response(200, json=project_json("someoneelse"))
    async with harness(other, max_attempts=1) as h:
        with pytest.raises(TransientApiError, match="someoneelse") as caught:
            await h.client.get_project(REF)
    assert caught.value.cause == "bad_body"


# --- errors that are not retried ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        (401, Unauthorized, "Unauthorized"),
        (402, PaymentRequired, "Not enough credits"),
        (404, ProjectNotFound, "Project not found"),
        (400, ApiRejected, "Invalid id"),
        (422, ApiRejected, "video is a template and cannot be deleted"),
    ],
)
async def test_client_errors_are_not_retried(
    code: int, error: type[ApiError], message: str
) -> None:
    """401/402/404/other 4xx map to their own errors after exactly one request."""
    reply = httpx.Response(code, json={"message": message})
    async with harness(reply) as h:
        with pytest.raises(error) as caught:
            await h.client.get_project(REF)
    assert len(h.api.requests) == 1
    assert h.retry_sleeps == []
    assert caught.value.status_code == code
    assert message in str(caught.value)
    assert not isinstance(caught.value, TransientApiError)


async def test_error_message_from_a_non_json_body() -> None:
    """A 4xx with a non-JSON body still gives a readable, single-line message."""
    reply = httpx.Response(400, text="<html>\n<body>Bad\n request</body>\n</html>")
    async with harness(reply) as h:
        with pytest.raises(ApiRejected) as caught:
            await h.client.get_project(REF)
    assert "\n" not in str(caught.value)
    assert "Bad request" in str(caught.value)


# --- transient faults --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
async def test_transient_statuses_are_retried_until_attempts_run_out(code: int) -> None:
    """408, 429 and 5xx are retried; after ``max_attempts`` the last error is raised."""
    reply = httpx.Response(code, text="<html>upstream sad</html>")
    async with harness(reply, max_attempts=4) as h:
        with pytest.raises(TransientApiError) as caught:
            await h.client.get_project(REF)
    assert len(h.api.requests) == 4
    assert len(h.retries) == 3
    assert caught.value.status_code == code
    assert isinstance(caught.value, RateLimited) == (code == 429)


@pytest.mark.parametrize("code", [500, 502, 503, 504, 408])
async def test_transient_status_then_success(code: int) -> None:
    """A fault followed by a good answer returns the project, with one retry logged."""
    async with harness(httpx.Response(code), ok()) as h:
        snapshot = await h.client.get_project(REF)
    assert snapshot.id == REF.id
    assert len(h.api.requests) == 2
    assert [(cause, attempt) for cause, attempt, _ in h.retries] == [(f"http_{code}", 1)]
    assert len(h.retry_sleeps) == 1
    assert 0 <= h.retry_sleeps[0] <= 30


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        (httpx.ConnectError("connection refused"), "network"),
        (httpx.ReadError("connection reset by peer"), "network"),
        (httpx.RemoteProtocolError("peer closed connection"), "network"),
        (httpx.ConnectTimeout("timed out"), "timeout"),
        (httpx.ReadTimeout("timed out"), "timeout"),
    ],
)
async def test_network_faults_are_retried(fault: Exception, cause: str) -> None:
    """Connection failures and timeouts are retried, then surface as TransientApiError."""
    async with harness(fault, max_attempts=3) as h:
        with pytest.raises(TransientApiError) as caught:
            await h.client.get_project(REF)
    assert len(h.api.requests) == 3
    assert caught.value.cause == cause
    assert caught.value.__cause__ is None  # httpx's error (and its request) are not chained
    async with harness(fault, ok()) as h:
        assert (await h.client.get_project(REF)).id == REF.id
    assert len(h.api.requests) == 2


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        json.dumps(project_json()).encode()[:40],
        b"",
        b"null",
        b'{"id": "cm2xproj0001", "status": "exploded"}',
        b"\xff\xfe\x00garbage",
    ],
)
async def test_unreadable_bodies_are_retried(body: bytes) -> None:
    """A 200 whose body is not a project (HTML, truncated JSON...) is retried like a 5xx."""
    async with harness(httpx.Response(200, content=body), ok()) as h:
        snapshot = await h.client.get_project(REF)
    assert snapshot.id == REF.id
    assert len(h.api.requests) == 2
    assert [cause for cause, _, _ in h.retries] == ["bad_body"]
    async with harness(httpx.Response(200, content=body), max_attempts=3) as h:
        with pytest.raises(TransientApiError) as caught:
            await h.client.get_project(REF)
    assert len(h.api.requests) == 3
    assert caught.value.cause == "bad_body"


async def test_retry_waits_honour_retry_after_up_to_max_wait() -> None:
    """A 503's Retry-After sets the retry wait, capped at ``max_wait``."""
    replies = [
        httpx.Response(503, headers={"Retry-After": "7"}),
        httpx.Response(503, headers={"Retry-After": "86400"}),
        ok(),
    ]
    async with harness(*replies) as h:
        await h.client.get_project(REF)
    assert h.retry_sleeps[0] >= 7
    assert h.retry_sleeps[1] == 30.0


async def test_429_pauses_the_whole_client() -> None:
    """A 429 pauses the shared throttle for Retry-After; the retry waits in the throttle."""
    limited = httpx.Response(429, headers={"Retry-After": "12"}, text="slow down")
    async with harness(limited, ok()) as h:
        started = h.clock.now()
        snapshot = await h.client.get_project(REF)
    assert snapshot.id == REF.id
    assert h.throttle.pauses == 1
    assert h.retry_sleeps == [0.0]  # the retry does not wait on top of the throttle
    assert h.clock.now() - started >= 12.0
    assert h.api.requests[1].headers["authorization"] == f"Bearer {TOKEN}"
    assert h.metrics.registry.get_sample_value("watcher_rate_limit_pauses_total") == 1


async def test_429_without_retry_after_pauses_one_second() -> None:
    """Without a hint, a 429 still pauses the client briefly."""
    async with harness(httpx.Response(429), ok()) as h:
        started = h.clock.now()
        await h.client.get_project(REF)
    assert h.throttle.pauses == 1
    assert h.clock.now() - started >= 1.0


async def test_rate_limited_error_carries_retry_after() -> None:
    """The final RateLimited error tells the caller how long the server asked to wait."""
    async with harness(httpx.Response(429, headers={"Retry-After": "3"}), max_attempts=1) as h:
        with pytest.raises(RateLimited) as caught:
            await h.client.get_project(REF)
    assert caught.value.retry_after == 3.0
    assert caught.value.cause == "rate_limited"


async def test_declared_oversized_body_is_refused() -> None:
    """A Content-Length over the limit is refused before reading the body."""
    huge = httpx.Response(200, headers={"Content-Length": str(MAX_BODY_BYTES + 1)}, content=b"{}")
    async with harness(huge, max_attempts=1) as h:
        with pytest.raises(TransientApiError) as caught:
            await h.client.get_project(REF)
    assert caught.value.cause == "body_too_large"


async def test_streamed_oversized_body_is_refused() -> None:
    """A body without a length that keeps coming past the limit is cut off and refused."""
    chunks_sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        while chunks_sent < 100:
            chunks_sent += 1
            yield b" " * (256 * 1024)

    def stream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    async with harness(stream, max_attempts=1) as h:
        with pytest.raises(TransientApiError) as caught:
            await h.client.get_project(REF)
    assert caught.value.cause == "body_too_large"
    assert chunks_sent <= MAX_BODY_BYTES // (256 * 1024) + 2


# --- DELETE ------------------------------------------------------------------------------------


async def test_delete_204_is_true() -> None:
    """A 204 to DELETE means the project was deleted now."""
    async with harness(httpx.Response(204)) as h:
        assert await h.client.delete_project(REF) is True
    [request] = h.api.requests
    assert request.method == "DELETE"
    assert request.url.path == f"/v1/image-projects/{REF.id}"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


async def test_delete_404_is_false() -> None:
    """A 404 to DELETE means it was already gone: not an error."""
    async with harness(httpx.Response(404, json={"message": "Not found"})) as h:
        assert await h.client.delete_project(REF) is False
    assert len(h.api.requests) == 1


async def test_delete_of_a_template_video_is_rejected() -> None:
    """A 422 to DELETE is an ApiRejected, not retried."""
    reply = httpx.Response(422, json={"message": "video is a template and cannot be deleted"})
    async with harness(reply) as h:
        with pytest.raises(ApiRejected, match="template"):
            await h.client.delete_project(ProjectRef(Kind.VIDEO, "v1"))
    assert len(h.api.requests) == 1


async def test_delete_is_retried_after_a_5xx() -> None:
    """A transient fault on DELETE is retried like one on GET."""
    async with harness(httpx.Response(502), httpx.Response(204)) as h:
        assert await h.client.delete_project(REF) is True
    assert len(h.api.requests) == 2


# --- the token never leaks ---------------------------------------------------------------------


def _echo(code: int) -> Script:
    """A server (or proxy) that puts the request's headers in its error body."""

    def reply(request: httpx.Request) -> httpx.Response:
        auth = request.headers["authorization"]
        if code in {400, 401, 402, 404, 422}:
            return httpx.Response(code, json={"message": f"bad request; you sent {auth}"})
        return httpx.Response(code, text=f"<pre>{auth}</pre>")

    return reply


@pytest.mark.parametrize("code", [400, 401, 402, 404, 422, 429, 500, 503])
async def test_token_is_never_in_an_error_message(code: int) -> None:
    """Even when the server echoes the Authorization header, no error shows the token."""
    async with harness(_echo(code), max_attempts=2) as h:
        with pytest.raises(WatcherError) as caught:
            await h.client.get_project(REF)
    assert h.api.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    for text in _messages(caught.value):
        assert TOKEN not in text


async def test_token_is_never_in_a_bad_body_message() -> None:
    """A 200 whose unreadable body echoes the token does not put it in the error."""
    async with harness(_echo(200), max_attempts=1) as h:
        with pytest.raises(TransientApiError) as caught:
            await h.client.get_project(REF)
    assert TOKEN not in str(caught.value)
    assert "[redacted]" in str(caught.value)


@pytest.mark.parametrize(
    "fault",
    [httpx.ConnectError(f"could not send Authorization: Bearer {TOKEN}"), httpx.ReadTimeout("t")],
)
async def test_token_is_never_in_a_network_error(fault: Exception) -> None:
    """Network errors are described by type, without httpx's message or request."""
    async with harness(fault, max_attempts=1) as h:
        with pytest.raises(TransientApiError) as caught:
            await h.client.get_project(REF)
    for text in _messages(caught.value):
        assert TOKEN not in text


async def test_token_is_not_in_the_clients_repr() -> None:
    """The client's repr shows where it talks to, never the token."""
    async with harness(ok()) as h:
        text = repr(h.client)
    assert BASE_URL in text
    assert TOKEN not in text


# --- Retry-After parsing -----------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("120", 120.0),
        ("  5 ", 5.0),
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW + 3600), 3600.0),
        (formatdate(NOW - 90, usegmt=True), 0.0),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str, expected: float) -> None:
    """Delta-seconds are taken as is; an HTTP-date becomes the seconds until it, 0 if past."""
    assert parse_retry_after(value, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value", [None, "", "soon", "-5", "1.5", "5s", "Someday, 99 Foo 20x", "\u00b2", "\u0661\u0662"]
)
def test_parse_retry_after_ignores_garbage(value: str | None) -> None:
    """A missing or unreadable Retry-After is ignored rather than raising."""
    assert parse_retry_after(value, now=NOW) is None


async def test_garbage_retry_after_still_retries() -> None:
    """A 503 with an unreadable Retry-After is retried on the normal schedule."""
    reply = httpx.Response(503, headers=[(b"Retry-After", b"\xb2")])
    async with harness(reply, ok()) as h:
        assert (await h.client.get_project(REF)).id == REF.id
    assert len(h.api.requests) == 2


async def test_a_huge_retry_after_is_capped() -> None:
    """A Retry-After of a day (or of 400 digits) pauses the client for at most MAX_RETRY_AFTER."""
    for value in ("86400", "9" * 400):

        def handler(request: httpx.Request, value: str = value) -> httpx.Response:
            return httpx.Response(429, headers={"Retry-After": value})

        throttle = Throttle(rate=1000, concurrency=4)

        async def no_sleep(_: float) -> None:
            return None

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = MagicHourClient(
                http,
                base_url="https://api.test",
                token=SecretStr("mhk_live_x"),
                throttle=throttle,
                max_attempts=1,
                sleep=no_sleep,
            )
            with pytest.raises(RateLimited) as caught:
                await client.get_project(ProjectRef(Kind.IMAGE, "p1"))
        assert caught.value.retry_after == MAX_RETRY_AFTER
        assert throttle.paused_for <= MAX_RETRY_AFTER


# --- hostile bodies and requests that cannot be sent ---------------------------------------------

DEEP = b"[" * 50_000 + b"]" * 50_000


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (DEEP, "application/json", "JSON nested too deeply"),
        (b'{"id": "cm2xproj0001", "status": NaN}', "application/json", "status: Input should be"),
        (b'{"id": "cm2xproj0001", "x": ' + b"9" * 5000 + b"}", "application/json", "digits"),
        (b'{"id": "\xc3\x28"}', "application/json", "not UTF-8"),
        (b"<html>Sign in to the proxy</html>", "text/html; charset=utf-8", "(text/html: not JSON"),
        (b'{"id": "cm2xproj0001", "status": "exploded"}', "application/json", "status: "),
        (
            b'{"id": "cm2xproj0001", "status": "queued", "enabled": "false"}',
            "application/json",
            "enabled: ",
        ),
    ],
)
async def test_hostile_bodies_are_a_short_transient_fault_saying_why(
    body: bytes, content_type: str, reason: str
) -> None:
    """Deep nesting, NaN, a 5,000-digit number, bad UTF-8, HTML and wrong types or values are
    a transient ``bad_body`` naming the reason in a short message, never an uncaught error."""
    reply = httpx.Response(200, content=body, headers={"content-type": content_type})
    async with harness(reply, max_attempts=2) as h:
        with pytest.raises(TransientApiError) as caught:
            await h.client.get_project(REF)
    assert caught.value.cause == "bad_body"
    assert reason in str(caught.value)
    assert len(str(caught.value)) < 500
    assert len(h.api.requests) == 2


def complete_with(link: dict[str, object]) -> httpx.Response:
    body = project_json(status="complete") | {"downloads": [link]}
    return httpx.Response(200, content=json.dumps(body).encode())  # (json= refuses NaN)


@pytest.mark.parametrize(
    "link",
    [
        {"url": "https://cdn.example/a.png", "expires_at": "0001-01-01T00:00:00"},
        {"url": "https://cdn.example/a.png", "expires_at": "0001-01-01T00:00:00+05:00"},
        {"url": "https://cdn.example/a.png", "expires_at": "9999-12-31T23:59:59-05:00"},
        {"url": "https://cdn.example/a.png", "expires_at": 1e300},
        {"url": "https://cdn.example/a.png", "expires_at": float("nan")},
        {"url": "file:///etc/passwd?sig=s3cr3t", "expires_at": "2999-01-01T00:00:00Z"},
        {"url": "https://cdn.example/a\x00.png", "expires_at": "2999-01-01T00:00:00Z"},
    ],
)
async def test_absurd_download_links_are_a_bad_body(link: dict[str, object]) -> None:
    """Dates no timestamp can hold and URLs that are not http(s) are refused as a bad body
    (without the URL's query), not left to crash the daemon later."""
    async with harness(complete_with(link), max_attempts=1) as h:
        with pytest.raises(TransientApiError, match=r"downloads\.0\.") as caught:
            await h.client.get_project(REF)
    assert caught.value.cause == "bad_body"
    assert "s3cr3t" not in str(caught.value).split("): ", 1)[0]


async def test_a_deeply_nested_404_is_not_found_with_an_excerpt() -> None:
    """A 404 whose body is JSON nested 50,000 deep is still "no such project", briefly."""
    async with harness(httpx.Response(404, content=DEEP)) as h:
        with pytest.raises(ProjectNotFound) as caught:
            await h.client.get_project(REF)
    assert "[[[[" in str(caught.value)
    assert len(str(caught.value)) < 300


async def test_an_error_message_is_one_printable_line() -> None:
    """The API's ``message`` is shortened and loses its control characters."""
    reply = httpx.Response(400, json={"message": "bad\n\x1b[31mred\x07 " + "x" * 5000})
    async with harness(reply) as h:
        with pytest.raises(ApiRejected) as caught:
            await h.client.get_project(REF)
    text = str(caught.value)
    assert text.isprintable()
    assert "bad [31mred x" in text
    assert len(text) < 300


@pytest.mark.parametrize(
    ("token", "kind"),
    [(TOKEN + "\n", "control (0x0a)"), (TOKEN + "é", "non-ASCII"), (TOKEN + "\r\nX: y", "control")],
)
async def test_a_token_no_request_can_carry_is_not_transient(token: str, kind: str) -> None:
    """A token with a trailing newline or a non-ASCII character fails at once with an error
    naming the setting (not retried, nothing sent, the token not shown)."""
    async with harness(ok(), token=token) as h:
        with pytest.raises(InvalidRequest) as caught:
            await h.client.get_project(REF)
    assert not isinstance(caught.value, TransientApiError)
    assert "WATCHER_API_TOKEN" in str(caught.value)
    assert kind in str(caught.value)
    assert h.api.requests == []
    assert h.retry_sleeps == []
    for text in _messages(caught.value):
        assert TOKEN not in text


@pytest.mark.parametrize(
    "fault",
    [
        httpx.LocalProtocolError(f"Illegal header value b'Bearer {TOKEN}\\n'"),
        UnicodeEncodeError("ascii", TOKEN + "é", len(TOKEN), len(TOKEN) + 1, "no"),
    ],
)
async def test_a_local_protocol_error_is_not_transient(fault: Exception) -> None:
    """Whatever else makes httpx refuse to write a request is not retried, and h11's message
    (which shows the header's value) is not passed on."""
    async with harness(fault) as h:
        with pytest.raises(InvalidRequest) as caught:
            await h.client.get_project(REF)
    assert len(h.api.requests) == 1
    assert h.retry_sleeps == []
    for text in _messages(caught.value):
        assert TOKEN not in text


async def test_a_network_error_names_the_host() -> None:
    """A network fault's message says which host and port it was about, and nothing of the
    request's path or credentials."""
    async with harness(httpx.ConnectError("boom"), max_attempts=1) as h:
        with pytest.raises(TransientApiError) as caught:
            await h.client.get_project(REF)
    assert "api.example.test:443" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "fault", "message"),
    [
        (
            "http://api.example:8443/v1/x?sig=s3cr3t",
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            "api.example:8443 broke off or did not speak HTTP (is it https?)",
        ),
        (
            "https://api.example/v1/x?sig=s3cr3t",
            httpx.ReadTimeout("timed out"),
            "api.example:443 did not answer in time (ReadTimeout)",
        ),
        (
            "https://api.example/v1/x?sig=s3cr3t",
            httpx.ConnectTimeout("timed out"),
            "connecting to api.example:443 timed out",
        ),
    ],
)
def test_transport_errors_are_described_by_host_and_cause(
    url: str, fault: httpx.TransportError, message: str
) -> None:
    """The description names host and port and the likely cause, never the path or query."""
    assert describe_transport_error(fault, httpx.URL(url)) == message


async def test_nan_in_a_field_the_watcher_ignores_is_harmless() -> None:
    """``NaN`` is not JSON, but in a field nothing reads it does not block the project."""
    body = json.dumps(project_json() | {"credits_charged": float("nan")}).encode()
    async with harness(httpx.Response(200, content=body)) as h:
        snapshot = await h.client.get_project(REF)
    assert snapshot.id == REF.id


async def test_too_many_downloads_are_a_bad_body() -> None:
    """Thousands of download links (thousands of files) are refused, not recorded."""
    link = {"url": "https://cdn.example/a.png", "expires_at": "2999-01-01T00:00:00Z"}
    body = project_json(status="complete") | {"downloads": [link] * 1001}
    async with harness(httpx.Response(200, json=body), max_attempts=1) as h:
        with pytest.raises(TransientApiError, match="downloads: List should have at most 1000"):
            await h.client.get_project(REF)


async def test_a_huge_error_body_is_cut_not_refused() -> None:
    """A 404 with megabytes of body is still "no such project" (its first 64 KiB are read)."""
    body = b'{"message": "gone"}' + b" " * (4 * MAX_BODY_BYTES)
    async with harness(httpx.Response(404, content=body)) as h:
        with pytest.raises(ProjectNotFound, match="no such project"):
            await h.client.get_project(REF)


class Drip(httpx.AsyncByteStream):
    """A body that never ends: a byte now and then, each well within any read timeout."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.01)
            yield b" "


async def test_a_body_that_drips_forever_is_a_timeout() -> None:
    """A server sending a byte at a time never trips the per-read timeout; the call's deadline
    ends it as a transient timeout."""
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _: httpx.Response(200, stream=Drip()))
    ) as http:
        client = MagicHourClient(
            http,
            base_url=BASE_URL,
            token=SecretStr(TOKEN),
            throttle=Throttle(rate=1000, concurrency=1),
            max_attempts=1,
            deadline=0.2,
        )
        with pytest.raises(TransientApiError, match="no complete answer from") as caught:
            await client.get_project(REF)
    assert caught.value.cause == "timeout"


# --- a rotated token, a 404's path -------------------------------------------------------------

NEW_TOKEN = "mhk_live_R0tatedT0kenAlsoSecret4321"


def accepts(token: str) -> Callable[[httpx.Request], httpx.Response]:
    """A server that accepts only ``token``."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] == f"Bearer {token}":
            return ok()
        return httpx.Response(401, json={"message": "Unauthorized"})

    return answer


async def test_a_401_retries_once_with_the_token_read_again() -> None:
    """After a 401 the client asks ``reload_token`` for the token; a new one is sent at once and
    kept for the requests after it."""
    async with harness(accepts(NEW_TOKEN), reload_token=lambda: SecretStr(NEW_TOKEN)) as h:
        await h.client.get_project(REF)
        await h.client.get_project(REF)
    sent = [r.headers["authorization"] for r in h.api.requests]
    assert sent == [f"Bearer {TOKEN}", f"Bearer {NEW_TOKEN}", f"Bearer {NEW_TOKEN}"]


async def test_a_401_with_the_same_token_read_again_is_unauthorized() -> None:
    """An unchanged token after a 401 is not sent again: the refusal stands."""
    async with harness(accepts(NEW_TOKEN), reload_token=lambda: SecretStr(TOKEN)) as h:
        with pytest.raises(Unauthorized):
            await h.client.get_project(REF)
    assert len(h.api.requests) == 1


async def test_a_token_set_while_a_request_waited_is_tried_after_its_401() -> None:
    """A token swapped in (SIGHUP) while a request with the old one was on its way: that
    request's 401 is retried with the new token, without reading anything."""
    swapped: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if not swapped:
            swapped.append(request)
            h.client.set_token(SecretStr(NEW_TOKEN))
        return accepts(NEW_TOKEN)(request)

    async with harness(answer) as h:
        await h.client.get_project(REF)
    assert [r.headers["authorization"] for r in h.api.requests][-1] == f"Bearer {NEW_TOKEN}"


async def test_a_404_names_the_path_that_answered() -> None:
    """ProjectNotFound carries the URL path that answered 404, in its text and as ``path``."""
    async with harness(httpx.Response(404, json={"message": "Not found"})) as h:
        with pytest.raises(ProjectNotFound) as caught:
            await h.client.get_project(REF)
    assert caught.value.path == f"/v1/image-projects/{REF.id}"
    assert f"at /v1/image-projects/{REF.id}" in str(caught.value)
