"""The Magic Hour API client: ``GET`` and ``DELETE`` of image, video and audio projects.

It owns the translation of HTTP outcomes into the project's exceptions (:mod:`watcher.errors`),
the retry of transient faults (jittered exponential backoff, "full jitter", ``Retry-After``
honoured), and the client-wide :class:`~watcher.throttle.Throttle`. It does not decide what a
status means for a project; the daemon does.

The ``httpx.AsyncClient`` is injected and shared with the downloader; the bearer token is added
to API requests only (never to download URLs, which are signed links on another host), and is
never part of a log line, an error message or a repr.

A request is cheap to build, since the watcher makes thousands (issue 11): each project's
absolute ``httpx.URL`` is parsed once (:func:`project_url`, a bounded cache), the headers once
per token (the client's own, then the API's), and the ``httpx.Request`` is handed to
``AsyncClient.send`` as it is, not merged with the client's settings again by ``build_request``
(the client has no base URL, params or cookies to merge; its timeout is set on the request
here). Retries go through tenacity only once a call has failed: nothing is built, nor imported,
for a call that succeeds at once.
The answer is as cheap to read: an unencoded body straight from the response's stream
(:func:`_pieces`), and a project's JSON validated by pydantic's own parser first.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import socket
import ssl
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator
from datetime import UTC
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import httpx
import pydantic
import structlog
from pydantic import SecretStr

from watcher import clock
from watcher.errors import (
    ApiRejected,
    InvalidRequest,
    PaymentRequired,
    ProjectNotFound,
    RateLimited,
    TransientApiError,
    Unauthorized,
)
from watcher.metrics import Metrics
from watcher.models import Kind, ProjectRef, ProjectSnapshot
from watcher.throttle import Throttle

if TYPE_CHECKING:
    import tenacity

log = structlog.get_logger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_BODY_BYTES = 1024 * 1024  # a project's JSON is a few KB; anything past 1 MiB is not the API
MAX_ERROR_BODY_BYTES = 64 * 1024  # an error's body is read for its message only: the rest is cut
# An answer still not complete after this many read timeouts (a server dripping a byte at a time
# never trips the per-read timeout) is a timeout.
DEADLINE_READ_TIMEOUTS = 2
EXCERPT_CHARS = 120
# A Retry-After beyond this is not believed: a day-long (or infinite) pause of every call is a
# misconfigured proxy, not a rate limit; we come back after five minutes and ask again.
MAX_RETRY_AFTER = 300.0
USER_AGENT = "magic-hour-watcher"
# The first retry waits up to this long (uniformly drawn); each later one's window doubles, up
# to the client's ``max_wait``.
FIRST_RETRY_WINDOW = 0.5
# Projects whose URL is kept parsed (about 650 bytes each, 2.7 MB in all): every project of a
# fleet of thousands polled together is parsed once; the memory stays bounded with 100,000.
URL_CACHE_SIZE = 4096

RetryHook = Callable[[TransientApiError, int, float], None]
# Asked for the token again after a 401: the current one, perhaps re-read from its file.
TokenSource = Callable[[], SecretStr | None]
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
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text[:EXCERPT_CHARS] + ("…" if len(text) > EXCERPT_CHARS else "")


def decode_json(body: bytes) -> Any:  # noqa: ANN401 - JSON of unknown shape
    """``body`` as JSON, or ``ValueError`` saying briefly why not.

    Whatever a server sends ends here as a ``ValueError``: bytes that are not UTF-8, text that
    is not JSON, a number of thousands of digits, and nesting deep enough to exhaust the
    interpreter's stack (which ``json`` reports as ``RecursionError``). ``NaN`` is let through:
    no field the watcher reads takes a float, so it fails validation there, or is ignored.
    """
    try:
        text = body.decode("utf-8")  # the API's encoding; json would guess UTF-16 from a BOM
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at character {exc.pos})") from None
    except ValueError as exc:  # more digits than int() converts
        raise ValueError(str(exc)[:100]) from None


def _invalid_reason(exc: pydantic.ValidationError) -> str:
    """The first problem of a validation error, without the input (it may be huge)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errors:
        return "not a project"
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "the body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {str(first['msg']).removeprefix('Value error, ')[:150]}{more}"


class _Reply(NamedTuple):
    body: bytes
    content_type: str


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from, exception groups included."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


@functools.lru_cache(maxsize=URL_CACHE_SIZE)
def project_url(base_url: str, kind: Kind, project_id: str) -> httpx.URL:
    """The absolute URL of a project, ``{base_url}/v1/{kind}-projects/{id}``, parsed once."""
    return httpx.URL(f"{base_url}{kind.api_path}/{project_id}")


def _where(url: httpx.URL) -> str:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return f"{url.host}:{port}" if port else url.host


# What an OpenSSL client reports when the server answered its hello in plain text.
_PLAIN_HTTP_REPLIES = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}


def _tls_problem(tls: ssl.SSLError, where: str) -> str:
    if isinstance(tls, ssl.SSLCertVerificationError):
        return f"the TLS certificate of {where} is not trusted ({tls.verify_message})"
    reason = str(tls.reason or type(tls).__name__)
    hint = "is it plain http?" if reason in _PLAIN_HTTP_REPLIES else reason
    return f"TLS handshake failed with {where} ({hint})"


def _socket_problem(causes: list[BaseException], url: httpx.URL, where: str) -> str | None:
    problems: list[tuple[type[BaseException], str]] = [
        (socket.gaierror, f"cannot resolve the host {url.host!r}"),
        (ConnectionRefusedError, f"connection refused by {where}"),
        (ConnectionResetError, f"connection reset by {where}"),
    ]
    for kind, problem in problems:
        if any(isinstance(c, kind) for c in causes):
            return problem
    return None


def describe_transport_error(exc: httpx.TransportError, url: httpx.URL) -> str:
    """Why a request to ``url`` failed, naming its host and port and nothing else of it (no
    path or query: a signed link's query is a secret), e.g. ``connection refused by
    api.example:443`` or ``TLS handshake failed with 127.0.0.1:8080 (is it plain http?)``."""
    where = _where(url)
    causes = list(_causes(exc))
    tls = next((c for c in causes if isinstance(c, ssl.SSLError)), None)
    errno_text = next((c.strerror for c in causes if isinstance(c, OSError) and c.strerror), None)
    if isinstance(exc, httpx.ConnectTimeout):
        problem: str | None = f"connecting to {where} timed out"
    elif isinstance(exc, httpx.TimeoutException):
        problem = f"{where} did not answer in time ({type(exc).__name__})"
    elif tls is not None:
        problem = _tls_problem(tls, where)
    else:
        problem = _socket_problem(causes, url, where)
    if problem is None and isinstance(exc, httpx.RemoteProtocolError):
        hint = " (is it https?)" if url.scheme == "http" else ""
        problem = f"{where} broke off or did not speak HTTP{hint}"
    return problem or f"connection to {where} failed ({errno_text or type(exc).__name__})"


def _unsendable(headers: dict[str, str]) -> str | None:
    """The header that no request can carry (a newline, a control or non-ASCII character), if
    any, named by the setting it comes from; its value is never shown."""
    sources = {
        "Authorization": "the API token (WATCHER_API_TOKEN)",
        "User-Agent": "the replica id (WATCHER_REPLICA_ID)",
    }
    for name, value in headers.items():
        if not value.isascii() or not value.isprintable():
            bad = next(c for c in value if not (c.isascii() and c.isprintable()))
            kind = "non-ASCII" if not bad.isascii() else f"control ({ord(bad):#04x})"
            return f"{sources.get(name, name)} holds a {kind} character"
    return None


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
        deadline: float | None = None,
        reload_token: TokenSource | None = None,
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
        read_timeout = http.timeout.read or 30.0
        self._deadline = deadline or DEADLINE_READ_TIMEOUTS * read_timeout
        self._reload_token = reload_token
        # What build_request would set from the client: its timeout, for every request.
        self._extensions = {"timeout": http.timeout.as_dict()}
        # The headers of the last token a request was built with, or what makes them unsendable.
        self._prepared: tuple[SecretStr, httpx.Headers | str] | None = None

    def __repr__(self) -> str:
        return f"MagicHourClient(base_url={self._base_url!r})"

    def set_token(self, token: SecretStr) -> None:
        """Send ``token`` from the next request on (a rotated secret); requests already on
        their way keep the one they were built with."""
        self._token = token

    def _token_renewed(self, used: SecretStr) -> bool:
        """After a 401 to a request sent with ``used``: whether another token is there to try
        (swapped meanwhile, or re-read by ``reload_token``)."""
        if self._token.get_secret_value() != used.get_secret_value():
            return True
        fresh = self._reload_token() if self._reload_token is not None else None
        if fresh is None or fresh.get_secret_value() == used.get_secret_value():
            return False
        self._token = fresh
        return True

    async def get_project(self, ref: ProjectRef) -> ProjectSnapshot:
        """``GET /v1/{kind}-projects/{id}``; raises :class:`ApiError` subclasses."""
        return await self._call("GET", ref, lambda reply: self._parse_project(ref, reply))

    def _parse_project(self, ref: ProjectRef, reply: _Reply) -> ProjectSnapshot:
        """The project in a 2xx body; an unreadable body is transient (retried like a 5xx).

        Its error names why (``JSON nested too deeply``, ``downloads.0.expires_at: a date out of
        range``), the content type when it is not JSON, and a short excerpt of the body.
        """
        try:
            snapshot = ProjectSnapshot.parse_json(reply.body)
        except pydantic.ValidationError:
            snapshot = self._parse_slowly(ref, reply)
        if snapshot.id != ref.id:
            raise TransientApiError(
                f"GET {ref} returned project {snapshot.id!r}", status_code=200, cause="bad_body"
            )
        return snapshot

    def _parse_slowly(self, ref: ProjectRef, reply: _Reply) -> ProjectSnapshot:
        """A body pydantic's own JSON parser refused, parsed again by :func:`decode_json` and
        validated as Python data: what it accepts (a lone surrogate escaped in a string) is
        let through as before, and the error of what it refuses names why."""
        try:
            return ProjectSnapshot.parse(decode_json(reply.body))
        except pydantic.ValidationError as exc:
            raise self._not_a_project(ref, reply, _invalid_reason(exc)) from None
        except ValueError as exc:
            raise self._not_a_project(ref, reply, str(exc)) from None

    def _not_a_project(self, ref: ProjectRef, reply: _Reply, reason: str) -> TransientApiError:
        kind = reply.content_type.split(";", 1)[0].strip().lower()
        typed = "" if kind.endswith("json") else f"{excerpt(kind.encode())[:60] or 'untyped'}: "
        return TransientApiError(
            f"GET {ref}: not a project ({typed}{reason}): {excerpt(self._scrub(reply.body))!r}",
            status_code=200,
            cause="bad_body",
        )

    async def delete_project(self, ref: ProjectRef) -> bool:
        """``DELETE /v1/{kind}-projects/{id}``. True if deleted now, False if it was gone (404)."""
        try:
            await self._call("DELETE", ref, lambda _reply: None)
        except ProjectNotFound:
            return False
        return True

    async def _call(self, method: str, ref: ProjectRef, parse: Callable[[_Reply], _T]) -> _T:
        """``parse`` of the answer; a transient fault is tried again up to ``max_attempts`` in
        all (:meth:`_retried`), the last one raised. The first attempt runs alone: nothing is
        built for a call that succeeds at once, as nearly every one does."""
        try:
            return parse(await self._send(method, ref))
        except TransientApiError as exc:
            if self._max_attempts <= 1:
                raise
            first = exc
        return await self._retried(method, ref, parse, first)

    async def _retried(
        self,
        method: str,
        ref: ProjectRef,
        parse: Callable[[_Reply], _T],
        first: TransientApiError,
    ) -> _T:
        """The attempts after a first transient fault ``first``, under tenacity (imported on
        the first retry: a daemon whose calls succeed never loads it): jittered exponential
        backoff (:meth:`_wait`), ``on_retry`` told before each sleep. Tenacity's own first
        attempt is the one already made: it raises ``first`` again, without a request."""
        import tenacity  # noqa: PLC0415 - only a call that failed once needs it

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(TransientApiError),
            before_sleep=self._before_sleep,
            reraise=True,
            sleep=self._sleep or asyncio.sleep,
        )
        made: TransientApiError | None = first
        async for attempt in retrying:
            with attempt:
                if made is not None:
                    fault, made = made, None
                    raise fault
                return parse(await self._send(method, ref))
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True always raises

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """Seconds before the next attempt: full jitter in a window of ``FIRST_RETRY_WINDOW``
        doubling per attempt up to ``max_wait``, at least the server's ``Retry-After`` (itself at
        most ``max_wait``); none after a 429, whose pause the throttle holds every call to."""
        import tenacity  # noqa: PLC0415 - loaded by the caller already

        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited):
            return 0.0
        jittered = tenacity.wait_random_exponential(
            multiplier=FIRST_RETRY_WINDOW, max=self._max_wait
        )(state)
        if isinstance(exc, TransientApiError) and exc.retry_after is not None:
            return max(jittered, min(exc.retry_after, self._max_wait))
        return float(jittered)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientApiError) and self._on_retry is not None:
            wait = state.next_action.sleep if state.next_action else 0.0
            self._on_retry(exc, state.attempt_number, wait)

    async def _send(self, method: str, ref: ProjectRef) -> _Reply:
        token = self._token
        response, body = await self._exchange(method, ref, token)
        if response.status_code == 401 and self._token_renewed(token):
            # The token was rotated (its file re-read): once more with the new one.
            response, body = await self._exchange(method, ref, self._token)
        self._raise_for_status(method, ref, response, body)
        return _Reply(body, response.headers.get("content-type", ""))

    def _headers(self, token: SecretStr) -> httpx.Headers | str:
        """The headers of an API request sent with ``token``: the client's own, then the
        API's (the token, JSON, the user agent); or which of them no request can carry. Built
        once per token, since ``httpx.Request`` copies them."""
        if self._prepared is None or self._prepared[0] is not token:
            own = {
                "Authorization": f"Bearer {token.get_secret_value()}",
                "Accept": "application/json",
                "User-Agent": self._user_agent,
            }
            unsendable = _unsendable(own)
            if unsendable is None:
                headers = httpx.Headers(self._http.headers)
                headers.update(own)
            self._prepared = (token, unsendable if unsendable is not None else headers)
        return self._prepared[1]

    async def _exchange(
        self, method: str, ref: ProjectRef, token: SecretStr
    ) -> tuple[httpx.Response, bytes]:
        url = project_url(self._base_url, ref.kind, ref.id)
        headers = self._headers(token)
        if isinstance(headers, str):
            raise InvalidRequest(f"{method} {ref}: the request cannot be sent: {headers}")
        async with self.throttle.slot():
            try:
                async with asyncio.timeout(self._deadline):
                    request = httpx.Request(
                        method, url, headers=headers, extensions=self._extensions
                    )
                    response = await self._http.send(request, stream=True)
                    try:
                        body = await _read_capped(response, method, ref)
                    finally:
                        await response.aclose()
            except TimeoutError:
                self._count(method, "timeout")
                raise TransientApiError(
                    f"{method} {ref}: no complete answer from {_where(url)} "
                    f"within {self._deadline:g} s",
                    cause="timeout",
                ) from None
            except httpx.TimeoutException as exc:
                self._count(method, "timeout")
                raise TransientApiError(
                    f"{method} {ref}: {describe_transport_error(exc, url)}",
                    cause="timeout",
                ) from None
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                self._count(method, "network")
                raise TransientApiError(
                    f"{method} {ref}: {describe_transport_error(exc, url)}",
                    cause="network",
                ) from None
            except (httpx.LocalProtocolError, UnicodeEncodeError) as exc:
                # We could not even write the request (h11's message would show the header's
                # value: the token): the same happens on every request, so it is not transient.
                self._count(method, "error")
                raise InvalidRequest(
                    f"{method} {ref}: the request cannot be sent ({type(exc).__name__}): a "
                    "header or the URL is malformed (check WATCHER_API_TOKEN and "
                    "WATCHER_API_BASE_URL)"
                ) from None
            except httpx.HTTPError as exc:  # a proxy error, an undecodable body, ...
                self._count(method, "error")
                raise TransientApiError(
                    f"{method} {ref}: request failed ({type(exc).__name__})", cause="http_error"
                ) from None
        self._count(method, str(response.status_code))
        return response, body

    def _scrub(self, body: bytes) -> bytes:
        """``body`` without the API token, in case a server or proxy echoes the request back."""
        secret = self._token.get_secret_value().encode()
        return body.replace(secret, b"[redacted]") if secret else body

    def _count(self, method: str, code: str) -> None:
        if self._metrics is None:
            return
        self._metrics.child(self._metrics.api_responses, method, code).inc()

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
            path = response.request.url.path
            raise ProjectNotFound(
                f"{what}: no such project at {path} ({message})", status_code=code, path=path
            )
        if 400 <= code < 500:
            raise ApiRejected(f"{what}: {message}", status_code=code)
        raise TransientApiError(f"{what}: {excerpt(body)!r}", status_code=code, cause="http_other")


def _pieces(response: httpx.Response) -> AsyncIterable[bytes]:
    """The body of ``response`` piece by piece, decoded: an unencoded body (the API's JSON, as a
    rule) straight from its stream, without the generators of ``aiter_bytes`` and ``aiter_raw``
    around it (about a tenth of a poll's CPU, issue 11); the caller closes the response."""
    if "content-encoding" in response.headers:
        return response.aiter_bytes()
    return response.stream  # type: ignore[return-value]  # asynchronous: the client's is


async def _read_capped(response: httpx.Response, method: str, ref: ProjectRef) -> bytes:
    """A success's body, refused past ``MAX_BODY_BYTES``; an error's first 64 KiB (enough for
    its message: a huge 404 is still "no such project")."""
    if not response.is_success:
        chunks: list[bytes] = []
        size = 0
        async for chunk in _pieces(response):
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_ERROR_BODY_BYTES:
                break
        return b"".join(chunks)[:MAX_ERROR_BODY_BYTES]
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TransientApiError(
            f"{method} {ref}: body of {declared} bytes refused (limit {MAX_BODY_BYTES})",
            status_code=response.status_code,
            cause="body_too_large",
        )
    chunks = []
    size = 0
    async for chunk in _pieces(response):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TransientApiError(
                f"{method} {ref}: body over {MAX_BODY_BYTES} bytes refused",
                status_code=response.status_code,
                cause="body_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _api_message(body: bytes) -> str:
    """The API's ``message`` from an error body, else a short excerpt of the body."""
    try:
        data: Any = decode_json(body)
    except ValueError:
        return excerpt(body) or "no message"
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return excerpt(data["message"].encode("utf-8", "replace")) or "no message"
    return excerpt(body) or "no message"
