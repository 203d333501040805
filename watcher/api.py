"""The Magic Hour API client: ``GET`` and ``DELETE`` of image, video and audio projects.

It owns the translation of HTTP outcomes into the project's exceptions (:mod:`watcher.errors`),
the retry of transient faults (tenacity: jittered exponential backoff, ``Retry-After`` honoured),
and the client-wide :class:`~watcher.throttle.Throttle`. It does not decide what a status means
for a project; the daemon does.

The ``httpx.AsyncClient`` is injected and shared with the downloader; the bearer token is added
to API requests only (never to download URLs, which are signed links on another host), and is
never part of a log line, an error message or a repr.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, TypeVar

import httpx
import pydantic
import structlog
import tenacity
from pydantic import SecretStr

from watcher import clock
from watcher.errors import (
    ApiRejected,
    PaymentRequired,
    ProjectNotFound,
    RateLimited,
    TransientApiError,
    Unauthorized,
)
from watcher.metrics import Metrics
from watcher.models import ProjectRef, ProjectSnapshot
from watcher.throttle import Throttle

log = structlog.get_logger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_BODY_BYTES = 1024 * 1024  # a project's JSON is a few KB; anything past 1 MiB is not the API
EXCERPT_CHARS = 120
# A Retry-After beyond this is not believed: a day-long (or infinite) pause of every call is a
# misconfigured proxy, not a rate limit; we come back after five minutes and ask again.
MAX_RETRY_AFTER = 300.0
USER_AGENT = "magic-hour-watcher"

RetryHook = Callable[[TransientApiError, int, float], None]
_T = TypeVar("_T")


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    A date in the past means "now" (0). An unreadable value is ignored (``None``).
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # isdigit() alone accepts "²", which float() refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def excerpt(body: bytes) -> str:
    """A short, single-line, printable excerpt of a body for a log line."""
    text = body[: EXCERPT_CHARS * 4].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:EXCERPT_CHARS] + ("…" if len(text) > EXCERPT_CHARS else "")


class MagicHourClient:
    """Calls the project endpoints of the Magic Hour API."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        token: SecretStr,
        throttle: Throttle,
        max_attempts: int = 3,
        max_wait: float = 30.0,
        on_retry: RetryHook | None = None,
        metrics: Metrics | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._token = token
        self.throttle = throttle
        self._max_attempts = max_attempts
        self._max_wait = max_wait
        self._on_retry = on_retry
        self._metrics = metrics
        self._sleep = sleep
        self._user_agent = user_agent

    def __repr__(self) -> str:
        return f"MagicHourClient(base_url={self._base_url!r})"

    async def get_project(self, ref: ProjectRef) -> ProjectSnapshot:
        """``GET /v1/{kind}-projects/{id}``; raises :class:`ApiError` subclasses."""
        return await self._call("GET", ref, lambda body: self._parse_project(ref, body))

    def _parse_project(self, ref: ProjectRef, body: bytes) -> ProjectSnapshot:
        """The project in a 2xx body; an unreadable body is transient (retried like a 5xx)."""
        try:
            snapshot = ProjectSnapshot.parse(json.loads(body))
        except (ValueError, pydantic.ValidationError) as exc:
            raise TransientApiError(
                f"GET {ref} returned a body that is not a project: {excerpt(self._scrub(body))!r}",
                status_code=200,
                cause="bad_body",
            ) from exc
        if snapshot.id != ref.id:
            raise TransientApiError(
                f"GET {ref} returned project {snapshot.id!r}", status_code=200, cause="bad_body"
            )
        return snapshot

    async def delete_project(self, ref: ProjectRef) -> bool:
        """``DELETE /v1/{kind}-projects/{id}``. True if deleted now, False if it was gone (404)."""
        try:
            await self._call("DELETE", ref, lambda _body: None)
        except ProjectNotFound:
            return False
        return True

    async def _call(self, method: str, ref: ProjectRef, parse: Callable[[bytes], _T]) -> _T:
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(TransientApiError),
            before_sleep=self._before_sleep,
            reraise=True,
            sleep=self._sleep or asyncio.sleep,
        )
        async for attempt in retrying:
            with attempt:
                return parse(await self._send(method, ref))
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True always raises

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        jittered = tenacity.wait_random_exponential(multiplier=0.5, max=self._max_wait)(state)
        if isinstance(exc, RateLimited):
            return 0.0  # the throttle holds every call until the server's hint has passed
        if isinstance(exc, TransientApiError) and exc.retry_after is not None:
            return max(jittered, min(exc.retry_after, self._max_wait))
        return float(jittered)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientApiError) and self._on_retry is not None:
            wait = state.next_action.sleep if state.next_action else 0.0
            self._on_retry(exc, state.attempt_number, wait)

    async def _send(self, method: str, ref: ProjectRef) -> bytes:
        url = f"{self._base_url}{ref.kind.api_path}/{ref.id}"
        headers = {
            "Authorization": f"Bearer {self._token.get_secret_value()}",
            "Accept": "application/json",
            "User-Agent": self._user_agent,
        }
        async with self.throttle.slot():
            try:
                async with self._http.stream(method, url, headers=headers) as response:
                    body = await _read_capped(response, f"{method} {ref}")
            except httpx.TimeoutException as exc:
                self._count(method, "timeout")
                raise TransientApiError(
                    f"{method} {ref}: timed out ({type(exc).__name__})", cause="timeout"
                ) from None
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                self._count(method, "network")
                raise TransientApiError(
                    f"{method} {ref}: connection failed ({type(exc).__name__})", cause="network"
                ) from None
            except httpx.HTTPError as exc:  # a proxy error, an undecodable body, ...
                self._count(method, "error")
                raise TransientApiError(
                    f"{method} {ref}: request failed ({type(exc).__name__})", cause="http_error"
                ) from None
        self._count(method, str(response.status_code))
        self._raise_for_status(method, ref, response, body)
        return body

    def _scrub(self, body: bytes) -> bytes:
        """``body`` without the API token, in case a server or proxy echoes the request back."""
        secret = self._token.get_secret_value().encode()
        return body.replace(secret, b"[redacted]") if secret else body

    def _count(self, method: str, code: str) -> None:
        if self._metrics is not None:
            self._metrics.api_responses.labels(method, code).inc()

    def _transient(
        self, what: str, code: int, response: httpx.Response, body: bytes
    ) -> TransientApiError:
        """The error of a retryable answer; a 429 also pauses the whole client."""
        retry_after = parse_retry_after(response.headers.get("retry-after"), now=clock.now())
        if retry_after is not None:
            retry_after = min(retry_after, MAX_RETRY_AFTER)
        if code != 429:
            return TransientApiError(
                f"{what}: {excerpt(body)!r}",
                status_code=code,
                cause=f"http_{code}",
                retry_after=retry_after,
            )
        if self.throttle.pause(retry_after if retry_after is not None else 1.0):
            log.warning(
                "api_rate_limited",
                pause_seconds=round(self.throttle.paused_for, 3),
                retry_after=retry_after,
            )
            if self._metrics is not None:
                self._metrics.rate_limit_pauses.inc()
        return RateLimited(
            f"{what} (rate limited)",
            status_code=code,
            cause="rate_limited",
            retry_after=retry_after,
        )

    def _raise_for_status(
        self, method: str, ref: ProjectRef, response: httpx.Response, body: bytes
    ) -> None:
        code = response.status_code
        if 200 <= code < 300:
            return
        body = self._scrub(body)
        what = f"{method} {ref}: HTTP {code}"
        message = _api_message(body)
        if code in RETRYABLE_STATUS:
            raise self._transient(what, code, response, body)
        if code == 401:
            raise Unauthorized(f"{what}: the API token was refused ({message})", status_code=code)
        if code == 402:
            raise PaymentRequired(f"{what}: payment required ({message})", status_code=code)
        if code == 404:
            raise ProjectNotFound(f"{what}: no such project ({message})", status_code=code)
        if 400 <= code < 500:
            raise ApiRejected(f"{what}: {message}", status_code=code)
        raise TransientApiError(f"{what}: {excerpt(body)!r}", status_code=code, cause="http_other")


async def _read_capped(response: httpx.Response, what: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TransientApiError(
            f"{what}: body of {declared} bytes refused (limit {MAX_BODY_BYTES})",
            status_code=response.status_code,
            cause="body_too_large",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TransientApiError(
                f"{what}: body over {MAX_BODY_BYTES} bytes refused",
                status_code=response.status_code,
                cause="body_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _api_message(body: bytes) -> str:
    try:
        data: Any = json.loads(body)
    except ValueError:
        return excerpt(body) or "no message"
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])[:200]
    return excerpt(body)
