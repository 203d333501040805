"""What the control plane refuses before routing: foreign hosts, cross-site requests, and
request bodies that are not JSON.

The control API may run without a token on a loopback address, where any web page the operator
opens can reach it. :class:`RequestGuard` closes the two ways such a page gets in:

- **DNS rebinding**: a page on ``evil.example`` re-points its own name at 127.0.0.1 and then
  reads the API as "same origin". Its requests carry ``Host: evil.example``. A Host is accepted
  when its name is an IP address (a browser only sends one when the page itself was loaded from
  that address, so the page is not cross-origin), ``localhost``, the name the server is bound
  to, or a name in ``WATCHER_HTTP_ALLOWED_HOSTS`` (``*`` accepts any name, for proxies that
  forward the public Host). Anything else gets 400 ``host_not_allowed``.
- **Cross-site requests**: a form or ``fetch`` may POST ``text/plain`` without a CORS preflight.
  A request whose ``Sec-Fetch-Site`` is not ``same-origin`` or ``none``, or whose ``Origin`` is
  not the Host it was sent to, gets 403 ``cross_site_request``; a body that is not declared
  ``application/json`` gets 415 ``unsupported_media_type`` (a JSON body forces the preflight
  this server never grants).

The Magic Hour webhook route is exempt from all three: its deliveries come through a public
proxy under a public Host, and the HMAC signature of their body is what authenticates them.
This module does not authenticate bearer tokens (see :mod:`watcher.http.app`).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_address
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from watcher.logs import BurstLog

LOCAL_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
EXEMPT_PATHS = frozenset({"/webhooks/magic-hour"})
ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})
ANY_HOST = "*"


def host_name(host: str) -> str:
    """The name part of a ``Host`` header value (no port, no IPv6 brackets), lowercase."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def is_ip_literal(name: str) -> bool:
    """Whether ``name`` is an IPv4 or IPv6 address rather than a DNS name."""
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which ``Host`` names this server answers to."""

    def __init__(self, bound_host: str, allowed: Iterable[str] = ()) -> None:
        self.names = frozenset(LOCAL_NAMES | {host_name(bound_host)} | {a.lower() for a in allowed})
        self.any = ANY_HOST in self.names

    def accepts(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header (``None``: none sent) is for us."""
        if host is None or self.any:
            return True  # HTTP/1.0 without Host: no browser sends that
        name = host_name(host)
        return is_ip_literal(name) or name in self.names


def cross_site(headers: Headers) -> str | None:
    """Why the request comes from another site's page, or ``None`` when it does not."""
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in ALLOWED_FETCH_SITES:
        return f"Sec-Fetch-Site is {site.strip()[:40]!r}"
    origin = headers.get("origin")
    if origin is None:
        return None
    try:
        origin_host = urlsplit(origin.strip()).netloc.lower()
    except ValueError:
        origin_host = ""
    if not origin_host or origin_host != headers.get("host", "").strip().lower():
        return f"Origin {origin.strip()[:80]!r} is not this server"
    return None


def is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` header declares JSON (``application/json``, any parameters)."""
    if content_type is None:
        return False
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json"


def has_body(headers: Headers) -> bool:
    """Whether the request carries a body (a method without one is left to the router)."""
    if "transfer-encoding" in headers:
        return True
    return headers.get("content-length", "0").strip() not in ("", "0")


class Refusal(JSONResponse):
    """The JSON error answer of a refused request, which remembers its code."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__({"error": error, "message": message}, status)
        self.error = error


class RequestGuard:
    """ASGI middleware: answers 400/403/415 to what the module docstring describes, and logs
    the refusals as one ``http_request_refused`` warning per burst (a misconfigured proxy shows
    up in the log, a hostile page cannot flood it)."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy
        self.refused = BurstLog("http_request_refused")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        self.refused.note(
            error=refusal.error,
            path=scope["path"][:200],
            host=headers.get("host", "")[:200],
            origin=headers.get("origin", "")[:200] or None,
        )
        await refusal(scope, receive, send)

    def refusal(self, headers: Headers) -> Refusal | None:
        """The answer refusing this request, or ``None`` to let it through."""
        if not self.policy.accepts(headers.get("host")):
            return Refusal(
                400,
                "host_not_allowed",
                "this server does not answer to that Host; add the name to "
                "WATCHER_HTTP_ALLOWED_HOSTS if a proxy forwards it",
            )
        reason = cross_site(headers)
        if reason is not None:
            return Refusal(
                403, "cross_site_request", f"requests from web pages are refused ({reason})"
            )
        if has_body(headers) and not is_json(headers.get("content-type")):
            return Refusal(
                415, "unsupported_media_type", "request bodies must be sent as application/json"
            )
        return None
