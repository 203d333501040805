"""The HTTP stack: the one ``httpx.AsyncClient`` of the API and the CDN, on aiohttp.

The code talks httpx everywhere (:mod:`watcher.api`, :mod:`watcher.downloader`); underneath,
:func:`http_client` puts ``httpx_aiohttp.AiohttpTransport`` (the transport the OpenAI and
Anthropic SDKs ship) instead of httpcore: aiohttp parses HTTP in C and costs a fraction of the
CPU per request (``bench/floor.py``). What stays httpx's, so nothing of it changes:

- redirects are followed by httpx, which drops ``Authorization`` when a redirect leaves the
  origin (the token never reaches another host); the transport itself never follows one, and
  sends the redirected GET as httpx built it, without a body;
- the body reaches httpx as sent (aiohttp's decompression is off): ``aiter_bytes`` decodes gzip
  and deflate for the API's JSON, ``aiter_raw`` gives the downloader the raw bytes it decodes
  and checks itself;
- proxies from the environment (``HTTPS_PROXY``, ``NO_PROXY``, ...) and TLS trust
  (``SSL_CERT_FILE``, else ``SSL_CERT_DIR``, else certifi's bundle) are read as httpx reads them,
  when the client is built; verification is always on;
- timeouts: connect, read (per socket read) and pool from the client's ``httpx.Timeout``;
  aiohttp has no write timeout (the watcher's requests have no body);
- pooling: ``max_connections`` of the client's ``httpx.Limits``, idle connections closed after
  ``keepalive_expiry``; a response closed before its end closes its connection.

One thing differs from a plain ``httpx.AsyncClient``: :class:`Client` keeps no cookies
(:class:`NoCookies`). The API is authenticated by its bearer token and a download by its signed
URL; a ``Set-Cookie`` from either is dropped, not sent back, and httpx's per-response cookie
extraction is not paid for.

The body streams in aiohttp's chunks through a bounded buffer (aiohttp stops reading the socket
while 2 MiB are unread, :data:`BODY_BUFFER_BYTES`), so memory does not grow with the file; it
is read in what is buffered at each read (usually one read of the socket's, as it is), not in
``httpx_aiohttp``'s copies of 16 KiB.

What the transport raises is mapped here to the httpx exceptions that httpcore raised for the
same fault, which the callers already handle (``httpx_aiohttp``'s own table calls a reset
connection a ``ConnectTimeout``, and lets a malformed answer through as an aiohttp error):

============================================  =============================================
aiohttp (or the socket)                       httpx
============================================  =============================================
``ConnectionTimeoutError``                    ``ConnectTimeout`` (also a full pool)
``SocketTimeoutError``, ``ServerTimeoutError``  ``ReadTimeout``
``ClientProxyConnectionError``, proxy refusal  ``ProxyError``
``ClientConnectorError`` (refused, DNS, TLS)  ``ConnectError``
``ServerDisconnectedError``                   ``RemoteProtocolError``
``ClientPayloadError`` (body cut short)       ``RemoteProtocolError``, ``ReadError`` if reset
``ClientResponseError`` (not HTTP)            ``RemoteProtocolError``
other ``ClientConnectionError``, ``OSError``  ``ReadError``
``NonHttpUrlClientError``                     ``UnsupportedProtocol``
a header or URL that cannot be written        ``LocalProtocolError``
============================================  =============================================

TLS: one context per trust store for the whole process (:func:`trust_of`), handed to aiohttp's
connector, so httpx builds none of its own. It is made empty (nothing trusted: a handshake
against it fails closed) and its CA certificates are loaded just before the first https request,
in the event loop (about 25 ms of CPU, once): a plain-http run, such as one against the
simulator, never loads them. aiohttp itself still builds its two default contexts when it is
imported (``aiohttp.connector``, about 50 ms of CPU with OpenSSL 3.0); the watcher never uses
them, and no import of a part of aiohttp avoids them (``aiohttp/__init__`` imports the connector).

No message of a mapped exception holds the request's URL (a signed link's query is a secret);
the original is kept as ``__cause__``, so :func:`watcher.api.describe_transport_error` still
finds the refused port, the reset connection or the TLS error inside.
"""

from __future__ import annotations

import errno
import functools
import os
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

from watcher.settings import Settings

_T = TypeVar("_T")

# Most specific first: the first class that matches decides.
_MAPPING: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientProxyConnectionError, httpx.ProxyError),
    (aiohttp.ClientHttpProxyError, httpx.ProxyError),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.InvalidURL, httpx.LocalProtocolError),
    (aiohttp.ClientConnectionError, httpx.ReadError),
    (OSError, httpx.ReadError),
    (aiohttp.ClientError, httpx.TransportError),
)


def _origin(exc: BaseException) -> BaseException:
    """The aiohttp (or socket) exception behind ``exc``: ``httpx_aiohttp`` raises its own
    mapping from it."""
    cause = exc.__cause__
    if isinstance(exc, httpx.TransportError) and isinstance(cause, aiohttp.ClientError | OSError):
        return cause
    return exc


def _root(origin: BaseException) -> BaseException:
    """What ``origin`` stands for underneath aiohttp: the socket's or TLS's own error (kept as
    the cause, where :func:`watcher.api.describe_transport_error` looks for it)."""
    if isinstance(origin, aiohttp.ClientPayloadError) and "ConnectionResetError(" in str(origin):
        # aiohttp names the reset that cut a body only in the text of its error.
        return ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    seen: BaseException | None = origin
    while isinstance(seen, aiohttp.ClientError):
        seen = seen.__cause__
    return seen if isinstance(seen, OSError) else origin


def _message(origin: BaseException) -> str:
    """A short account of ``origin`` without the URL (aiohttp's response errors show it)."""
    if isinstance(origin, aiohttp.ClientResponseError):
        return f"{type(origin).__name__}: {origin.message}"
    if isinstance(origin, aiohttp.ClientConnectorError):
        return f"cannot connect to {origin.host}:{origin.port} ({origin.os_error})"
    if isinstance(origin, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return f"{type(origin).__name__}: the URL cannot be requested"
    return f"{type(origin).__name__}: {origin}" if str(origin) else type(origin).__name__


def mapped(exc: BaseException) -> httpx.TransportError | None:
    """The httpx exception that stands for ``exc`` (raised by aiohttp or by
    ``httpx_aiohttp``), or ``None`` if it is none of the transport's."""
    origin = _origin(exc)
    if isinstance(origin, aiohttp.ClientPayloadError):
        reset = isinstance(_root(origin), ConnectionResetError)
        kind: type[httpx.TransportError] = httpx.ReadError if reset else httpx.RemoteProtocolError
    else:
        kind = next((k for base, k in _MAPPING if isinstance(origin, base)), httpx.TransportError)
        if origin is exc and not isinstance(exc, aiohttp.ClientError | OSError):
            return None
    return kind(_message(origin))


def _translation(exc: Exception, *, sending: bool) -> httpx.TransportError | None:
    """What to raise instead of ``exc``, or ``None`` to let it through: an exception of httpx
    that ``httpx_aiohttp`` raised on its own (an unsupported scheme), or none of the transport's.

    The caller raises it outside its ``except`` clause, so that it carries the socket's error
    as its cause and nothing of aiohttp's as its context."""
    if isinstance(exc, aiohttp.ClientError | OSError | httpx.TransportError):
        if isinstance(exc, httpx.TransportError) and not isinstance(
            exc.__cause__, aiohttp.ClientError | OSError
        ):
            return None
        new = mapped(exc)
        if new is not None:
            new.__cause__ = _root(_origin(exc))
        return new
    if sending and isinstance(exc, ValueError | UnicodeError):
        # aiohttp refuses to write a header with a newline or a character it cannot encode;
        # its message would show the header's value (the token).
        return httpx.LocalProtocolError(f"the request cannot be written ({type(exc).__name__})")
    return None


# httpx_aiohttp reads a body 16 KiB at a time (its CHUNK_SIZE); each piece then passes through
# several async generators. The body of an aiohttp response is read instead in what is
# buffered (usually what one read of the socket brought, up to 256 KiB: asyncio's read size),
# as it is, so a 1 GiB download makes a fraction of the passes
# (issue 11, bench/big.py, bench/receive.py). aiohttp pauses reading the socket once twice its
# read buffer (64 KiB) is unread and resumes below it, so each 256 KiB read paused it and the
# next read of ours resumed it (two epoll_ctl calls per read); a body is given a buffer of
# BODY_BUFFER_BYTES instead (at most twice that unread), which it rarely fills.
BODY_BUFFER_BYTES = 1024 * 1024


async def _translated(call: Awaitable[_T], *, sending: bool) -> _T:
    """The result of ``call``, or what :func:`_translation` makes of its error."""
    try:
        return await call
    except Exception as exc:
        new = _translation(exc, sending=sending)
        if new is None:
            raise
    raise new  # outside the except clause: see _translation


class _Body(httpx.AsyncByteStream):
    """The response body of ``httpx_aiohttp``, its errors mapped, read in what is buffered
    (:func:`_pieces`)."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        inner = self._inner
        body = inner if not isinstance(inner, AiohttpResponseStream) else _pieces(inner)
        try:
            async for chunk in body:
                yield chunk
        except Exception as exc:
            new = _translation(exc, sending=False)
            if new is None:
                raise
        else:
            return
        raise new

    async def aclose(self) -> None:
        await _translated(self._inner.aclose(), sending=False)


async def _pieces(stream: AiohttpResponseStream) -> AsyncIterator[bytes]:
    """The body of an aiohttp response in what it has buffered at each read (aiohttp's
    ``readany``: one piece as it is when, as usual, the reader keeps up; the pieces joined when
    more than one waits). Not ``readchunk``: on a chunked body of many small chunks it can wait
    for data with the socket paused, for ever (it skips the check that resumes it)."""
    content = stream._aiohttp_response.content  # noqa: SLF001 - the response it streams
    # aiohttp takes its buffer's size per session or per request (read_bufsize), neither of
    # which httpx_aiohttp passes on; its StreamReader keeps it as these two marks.
    if hasattr(content, "_high_water"):
        content._low_water = BODY_BUFFER_BYTES  # noqa: SLF001
        content._high_water = 2 * BODY_BUFFER_BYTES  # noqa: SLF001
    while piece := await content.readany():
        yield piece


class Trust:
    """A TLS context that verifies servers against one trust store, loaded on first use.

    ``cafile`` and ``capath`` name the store (both ``None``: certifi's bundle). Until
    :meth:`load` the context trusts nothing, so a handshake made too early fails; it does not
    go unverified."""

    def __init__(self, cafile: str | None, capath: str | None) -> None:
        self.cafile, self.capath = cafile, capath
        # What ssl.create_default_context() makes, which httpx uses: a client context that
        # requires a certificate and checks the host name; SSLKEYLOGFILE is honoured too.
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog and not sys.flags.ignore_environment:
            self.context.keylog_filename = keylog
        self.loaded = False

    def load(self) -> None:
        """Load the store's CA certificates into the context (the first call only)."""
        if self.loaded:
            return
        if self.cafile is None and self.capath is None:
            import certifi  # noqa: PLC0415 - only where certifi's bundle is the trust store

            self.context.load_verify_locations(cafile=certifi.where())
        else:
            self.context.load_verify_locations(cafile=self.cafile, capath=self.capath)
        self.loaded = True


@functools.cache
def _trust(cafile: str | None, capath: str | None) -> Trust:
    return Trust(cafile, capath)


def trust_of(*, trust_env: bool = True) -> Trust:
    """The process's one :class:`Trust` of the store httpx would choose now: ``SSL_CERT_FILE``,
    else ``SSL_CERT_DIR`` (with ``trust_env``), else certifi's bundle."""
    env = os.environ if trust_env else {}
    if env.get("SSL_CERT_FILE"):
        return _trust(env["SSL_CERT_FILE"], None)
    if env.get("SSL_CERT_DIR"):
        return _trust(None, env["SSL_CERT_DIR"])
    return _trust(None, None)


_NO_BODY = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class Transport(AiohttpTransport):
    """``httpx_aiohttp.AiohttpTransport`` whose faults are httpcore's and whose TLS context is
    the process's shared one, loaded at the first https request (module docstring)."""

    def __init__(
        self,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,  # noqa: ANN401 - httpx's CertTypes, passed on as they are
        trust_env: bool = True,
        **options: Any,  # noqa: ANN401 - httpx's transport options, passed on as they are
    ) -> None:
        # httpx's defaults (verify=True, no client certificate) verify against the trust store
        # of the environment: that store's shared context. Anything else is httpx's to build.
        self.trust = trust_of(trust_env=trust_env) if verify is True and cert is None else None
        verify = self.trust.context if self.trust is not None else verify
        super().__init__(verify=verify, cert=cert, trust_env=trust_env, **options)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; the response's body is read as the caller iterates it."""
        if self.trust is not None and "https" in {request.url.scheme, self._proxy_scheme}:
            self.trust.load()
        if request.method in _NO_BODY:
            # A request httpx rebuilt to follow a redirect holds its (empty) body as a stream,
            # which httpx_aiohttp would send as a chunked body with a content type: a GET with
            # a body, which a CDN may refuse. Read, it is the bytes it is: none. (A body of
            # another method is left a stream, so an upload would not be held in memory.)
            await request.aread()
        response = await _translated(super().handle_async_request(request), sending=True)
        assert isinstance(response.stream, httpx.AsyncByteStream)  # noqa: S101 - its contract
        response.stream = _Body(response.stream)
        return response

    @property
    def _proxy_scheme(self) -> str | None:
        return self.proxy.url.scheme if self.proxy is not None else None


_NO_COOKIES = "the watcher's HTTP client keeps no cookies"


class NoCookies(httpx.Cookies):
    """A cookie jar that stays empty: a ``Set-Cookie`` of the API, the CDN or a redirect is
    not kept, so no request carries a ``Cookie`` the watcher never set. httpx's own
    extraction of every response (a urllib request built to ask the jar) is the largest single
    cost of a request in httpx (issue 11); it is skipped."""

    def extract_cookies(self, response: httpx.Response) -> None:
        """Keep nothing of ``response``."""

    def set(self, *args: object, **kwargs: object) -> None:
        """Refuse: the jar is shared by every :class:`Client` and stays empty."""
        del args, kwargs
        raise TypeError(_NO_COOKIES)


class Client(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` whose transports, direct and through a proxy from the
    environment, are :class:`Transport` unless a test passes its own ``transport``, and whose
    cookie jar keeps nothing (:class:`NoCookies`).

    httpx builds the transports with these two methods, passing its options (``verify``,
    ``cert``, ``trust_env``, ``http1``, ``http2``, ``limits``) by keyword; they go to
    :class:`Transport` as they would go to httpx's own."""

    _jar = NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        """The empty jar: the watcher sends no cookies and keeps none."""
        return self._jar

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        del cookies
        raise TypeError(_NO_COOKIES)

    def _init_transport(  # type: ignore[override]  # httpx passes every option by keyword
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,  # noqa: ANN401 - httpx's transport options, passed on as they are
    ) -> httpx.AsyncBaseTransport:
        return transport if transport is not None else Transport(**options)

    def _init_proxy_transport(  # type: ignore[override]  # httpx passes options by keyword
        self,
        proxy: httpx.Proxy,
        **options: Any,  # noqa: ANN401 - httpx's transport options, passed on as they are
    ) -> httpx.AsyncBaseTransport:
        return Transport(proxy=proxy, **options)


def http_client(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The one client of the API and the CDN: explicit timeouts (``WATCHER_REQUEST_TIMEOUT``
    for a read or a free connection, at most 10 s to connect), a pool for every slot,
    redirects followed (by httpx, which drops ``Authorization`` when one leaves the origin).
    ``transport`` replaces the aiohttp one (a test's ``httpx.MockTransport``)."""
    s = settings
    pool = s.max_concurrent_requests + s.max_concurrent_downloads + 4
    return Client(
        timeout=httpx.Timeout(s.request_timeout, connect=min(10.0, s.request_timeout)),
        limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        follow_redirects=True,
        transport=transport,
    )
