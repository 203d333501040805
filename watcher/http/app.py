"""The control plane's HTTP app: the tracking API, health, metrics and the webhook receiver.

:func:`create_app` builds a Starlette app around a running daemon, seen through the narrow
:class:`~watcher.control.Control` interface, and its store:

- ``/v1/projects`` (bearer auth with ``WATCHER_CONTROL_TOKEN`` when one is set): track, list,
  show and stop tracking projects. Stopping tracking never deletes anything remotely.
- ``/healthz`` (the loop answers), ``/readyz`` (store reachable, not shutting down; a token
  the API refuses is a warning, not a failure), ``/metrics`` (Prometheus text) and
  ``/openapi.json``: no auth.
- ``/webhooks/magic-hour``: Magic Hour's signed events; a verified event's payload (the project
  object) is handed to the daemon to act on as on a GET's answer (:mod:`watcher.announcements`),
  or, when it lacks what a GET gives, its project is made due at once (or tracked, with
  ``WATCHER_WEBHOOK_AUTO_TRACK``). The work itself is left to the daemon's dispatch loop, so the
  answer is immediate. Without ``WATCHER_WEBHOOK_SECRET`` the
  route answers 404 ``webhooks_disabled``.

Every error is JSON ``{"error": <code>, "message": <text>}``. Request bodies are capped
(:data:`MAX_BODY_BYTES`, :data:`MAX_WEBHOOK_BYTES`). Each request is logged at debug as
``http_request`` and counted in ``watcher_http_requests``. This module does not listen on a
socket (see :mod:`watcher.http.server`) and does not sign anything itself (see
:mod:`watcher.webhooks`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from watcher import clock
from watcher.errors import InvalidProjectId, StoreError, StoreUnavailable, WatcherError
from watcher.http.guard import HostPolicy, RequestGuard
from watcher.http.openapi import openapi_document
from watcher.metrics import FLEET, Metrics
from watcher.models import ProjectRef, State, parse_kind, validate_project_id
from watcher.settings import configured
from watcher.views import project_json
from watcher.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    InvalidEvent,
    SignatureRejected,
    WebhookEvent,
    parse_event,
    verify,
)

if TYPE_CHECKING:
    from watcher.control import Control
    from watcher.store import ProjectRecord, Store

log = structlog.get_logger("watcher")

MAX_BODY_BYTES = 64 * 1024
MAX_WEBHOOK_BYTES = 256 * 1024
DEFAULT_PAGE = 100
MAX_PAGE = 1000
STORE_PING_SECONDS = 2.0
TRACK_FIELDS = frozenset({"id", "kind", "delete_after_download"})
LIST_PARAMETERS = frozenset({"status", "limit", "cursor"})

Endpoint = Callable[[Request], Awaitable[Response]]


class ApiProblem(WatcherError):
    """A request the control API refuses: its HTTP status, a stable code and a clear message."""

    def __init__(
        self, status: int, error: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.headers = headers


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a lone surrogate taken from a request
    (``"\\ud800"`` is valid JSON) cannot make the answer unencodable."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def problem(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error response every failure of this API uses."""
    return AsciiJSONResponse({"error": error, "message": message}, status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 beyond ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit():  # anything else is the server's to refuse
        size = whole_number(declared)
        if size is None or size > limit:
            shown = f"{size} bytes" if size is not None else f"{len(declared)} digits long"
            raise ApiProblem(
                413, "body_too_large", f"the body is {shown}; at most {limit} bytes are accepted"
            )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiProblem(
                    413, "body_too_large", f"the body exceeds {limit} bytes; it was not read"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiProblem(400, "client_disconnected", "the client went away mid-body") from None
    return b"".join(chunks)


def whole_number(text: str, max_digits: int = 18) -> int | None:
    """``text`` as a whole number if it is ASCII digits only, and not absurdly long; else
    ``None``. (``str.isdigit`` admits ``²``, ``int`` admits Arabic-Indic digits and refuses
    5000 digits with ValueError: none of that may reach a handler as a number, or as a 500.)"""
    if not (text.isascii() and text.isdigit()) or len(text) > max_digits:
        return None
    return int(text)


def json_body(raw: bytes) -> object:
    """The request body parsed as JSON, or 400 ``invalid_json`` for anything JSON cannot
    read: bad syntax or UTF-8, nesting too deep for the parser, numbers too long to convert."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiProblem(400, "invalid_json", "the body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise ApiProblem(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


def _project_id(raw: str) -> str:
    try:
        return validate_project_id(raw)
    except InvalidProjectId as exc:
        raise ApiProblem(400, "invalid_id", str(exc)) from None


class _Handlers:
    """The endpoints, bound to one daemon's control interface and store."""

    def __init__(self, control: Control, store: Store, metrics: Metrics) -> None:
        self.control = control
        self.store = store
        self.settings = control.settings
        self.download_dir = control.settings.download_dir
        self.storage = control.settings.storage  # outputs named s3://... in object storage
        self.metrics = metrics
        self.openapi = openapi_document()

    # Read at each use, not kept: SIGHUP re-reads the daemon's *_FILE secrets.
    @property
    def control_token(self) -> str | None:
        """The control API's bearer token, if one is set."""
        return configured(self.control.settings.control_token)

    @property
    def webhook_secret(self) -> str | None:
        """The webhook signing secret, if one is set."""
        return configured(self.control.settings.webhook_secret)

    # --- auth ----------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.control_token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip().encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given, self.control_token.encode("utf-8")
        ):
            raise ApiProblem(
                401,
                "unauthorized",
                "a valid bearer token is required (the value of WATCHER_CONTROL_TOKEN)",
                headers={"WWW-Authenticate": 'Bearer realm="watcher"'},
            )

    # --- health, metrics, the document -----------------------------------------------------------

    async def healthz(self, _request: Request) -> Response:
        """The event loop answers: the process is alive."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        """Ready to serve: store reachable, not shutting down. A refusal by the Magic Hour API
        (401, 402) is reported as a warning but keeps the answer 200: webhooks and the control
        API still work, and every replica shares the token, so failing readiness would only take
        the whole Service down with it."""
        problems: list[str] = []
        warnings: list[str] = []
        try:
            async with asyncio.timeout(STORE_PING_SECONDS):  # not wait_for: see watcher.clock
                await self.store.ping()
            store = "ok"
        except (StoreError, TimeoutError) as exc:
            store = "unreachable"
            problems.append(f"the store does not answer: {str(exc) or 'timed out'}")
        now = self.control.readiness()
        outage = now.store_problem  # e.g. SQLite readable but locked for writes
        if outage is not None and store == "ok":
            store = "unavailable"
            problems.append(outage)
        if now.unauthorized:
            warnings.append("the Magic Hour API refused the token (check WATCHER_API_TOKEN)")
        if now.payment_required:
            warnings.append("the Magic Hour API answered 402 payment required")
        if self.control.stopping:
            problems.append("the watcher is shutting down")
        body = {
            "ready": not problems,
            "checks": {
                "store": store,
                "api_credentials": "refused" if now.unauthorized else "ok",
                "api_payment": "required" if now.payment_required else "ok",
                "shutting_down": self.control.stopping,
            },
            "problems": problems,
            "warnings": warnings,
        }
        return JSONResponse(body, 200 if not problems else 503)

    async def metrics_text(self, _request: Request) -> Response:
        """Every metric in the Prometheus text format, gauges refreshed from the store."""
        await refresh_gauges(self.control, self.store, self.metrics)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(self, _request: Request) -> Response:
        """The OpenAPI document of this API."""
        return JSONResponse(self.openapi)

    # --- the tracking API ------------------------------------------------------------------------

    async def track(self, request: Request) -> Response:
        """``POST /v1/projects``: track one project (201), or say it already is (200)."""
        self._authorize(request)
        ref, delete = self._track_request(await read_body(request, MAX_BODY_BYTES))
        existing = await self.store.get(ref.id)
        if existing is not None and existing.kind != ref.kind:
            raise ApiProblem(
                409,
                "kind_conflict",
                f"project {ref.id} is already tracked as {existing.kind.value}, "
                f"not {ref.kind.value}",
            )
        created = False
        if existing is None or existing.state == State.NOT_FOUND:  # a 404 is revived
            added = await self.control.track([ref], delete_after_download=delete, revive=True)
            created = ref.id in added
        record = await self.store.get(ref.id)
        if record is None:  # stopped being tracked in between: a race with DELETE
            raise ApiProblem(409, "conflict", f"project {ref.id} was untracked meanwhile")
        body = project_json(
            record, await self.store.outputs(ref.id), self.download_dir, self.storage
        )
        headers = {"Location": f"/v1/projects/{ref.id}"}
        return JSONResponse(body, 201 if created else 200, headers=headers)

    def _track_request(self, raw: bytes) -> tuple[ProjectRef, bool]:
        data = json_body(raw)
        if not isinstance(data, dict):
            raise ApiProblem(400, "invalid_request", 'expected a JSON object {"id", "kind"}')
        unknown = sorted(set(data) - TRACK_FIELDS)
        if unknown:
            raise ApiProblem(
                400,
                "invalid_request",
                f"unknown fields: {', '.join(unknown)} (expected id, kind, delete_after_download)",
            )
        raw_id, raw_kind = data.get("id"), data.get("kind")
        if not isinstance(raw_id, str):
            raise ApiProblem(400, "invalid_id", '"id" is required and must be a string')
        if not isinstance(raw_kind, str):
            raise ApiProblem(400, "invalid_kind", '"kind" is required: image, video or audio')
        try:
            kind = parse_kind(raw_kind)
        except InvalidProjectId as exc:
            raise ApiProblem(400, "invalid_kind", str(exc)) from None
        delete = data.get("delete_after_download", self.settings.delete_after_download)
        if not isinstance(delete, bool):
            raise ApiProblem(
                400, "invalid_request", '"delete_after_download" must be true or false'
            )
        return ProjectRef(kind, _project_id(raw_id)), delete

    async def show(self, request: Request) -> Response:
        """``GET /v1/projects/{id}``."""
        self._authorize(request)
        pid = _project_id(request.path_params["id"])
        record = await self.store.get(pid)
        if record is None:
            raise ApiProblem(404, "not_tracked", f"project {pid} is not tracked")
        outputs = await self.store.outputs(pid)
        return JSONResponse(project_json(record, outputs, self.download_dir, self.storage))

    async def list_projects(self, request: Request) -> Response:
        """``GET /v1/projects?status=&limit=&cursor=``: a page in id order, and counts."""
        self._authorize(request)
        state, limit, cursor = _page_parameters(request)
        page = await self.store.list_projects(state=state, limit=limit, cursor=cursor)
        counts = await self.store.count_by_state()
        outputs = await self.store.outputs_of([p.id for p in page.projects])
        projects = [
            project_json(p, outputs[p.id], self.download_dir, self.storage) for p in page.projects
        ]
        return JSONResponse(
            {
                "projects": projects,
                "next_cursor": page.next_cursor,
                "counts": {s.value: n for s, n in sorted(counts.items())},
            }
        )

    async def untrack(self, request: Request) -> Response:
        """``DELETE /v1/projects/{id}``: forget the project here; nothing is deleted remotely."""
        self._authorize(request)
        pid = _project_id(request.path_params["id"])
        if not await self.control.untrack(pid):
            raise ApiProblem(404, "not_tracked", f"project {pid} is not tracked")
        return Response(status_code=204)

    # --- webhooks in ------------------------------------------------------------------------------

    async def webhook(self, request: Request) -> Response:
        """``POST /webhooks/magic-hour``: verify, then hand the payload over (or make the
        project due now)."""
        if self.webhook_secret is None:
            raise ApiProblem(
                404, "webhooks_disabled", "webhooks are off: set WATCHER_WEBHOOK_SECRET to use them"
            )
        body = await read_body(request, MAX_WEBHOOK_BYTES)
        try:
            verify(
                self.webhook_secret,
                body,
                signature=request.headers.get(SIGNATURE_HEADER),
                timestamp=request.headers.get(TIMESTAMP_HEADER),
                now=clock.now(),
            )
        except SignatureRejected as exc:
            self.metrics.webhooks.labels("rejected").inc()
            log.warning("webhook_rejected", reason=exc.reason, detail=str(exc))
            raise ApiProblem(401, "invalid_signature", str(exc)) from None
        try:
            event = parse_event(body)
        except InvalidEvent as exc:
            self.metrics.webhooks.labels("invalid").inc()
            log.warning("webhook_rejected", reason="invalid_event", detail=str(exc))
            raise ApiProblem(400, "invalid_event", str(exc)) from None
        action, note = await self._act_on(event)
        self.metrics.webhooks.labels(action).inc()
        log.info(
            "webhook_received",
            type=event.type,
            project_id=event.project_id,
            action=action,
            note=note,
        )
        return JSONResponse({"action": action, "note": note})

    async def _act_on(self, event: WebhookEvent) -> tuple[str, str | None]:
        """What the event changes: (action, note)."""
        if event.kind is None or event.project_id is None:
            return "ignored", "not a project event the watcher knows"
        self.control.heard(event.kind)
        record = await self.store.get(event.project_id)
        if record is None:
            if not self.settings.webhook_auto_track:
                return "ignored", "not tracked (WATCHER_WEBHOOK_AUTO_TRACK is off)"
            ref = ProjectRef(event.kind, event.project_id)
            delete = self.settings.delete_after_download
            await self.control.track([ref], delete_after_download=delete)
            return "tracked", None
        if record.state.is_final:
            return "ignored", f"already final ({record.state.value})"
        return await self._act_on_active(record, event)

    async def _act_on_active(
        self, record: ProjectRecord, event: WebhookEvent
    ) -> tuple[str, str | None]:
        """An event about an active project: its payload is acted on as a GET's answer would
        be while the project is polling, else the project is polled now."""
        payload = event.payload
        if payload is not None and record.state == State.POLLING and record.kind == event.kind:
            return await self.control.announce(record, payload)
        if await self.control.expedite(record):
            return "expedited", "a poll is in flight; another follows it"
        return "expedited", None


def _page_parameters(request: Request) -> tuple[State | None, int, str | None]:
    params = request.query_params
    unknown = sorted(set(params.keys()) - LIST_PARAMETERS)
    if unknown:
        raise ApiProblem(
            400,
            "invalid_parameter",
            f"unknown query parameters: {', '.join(unknown)} (expected status, limit, cursor)",
        )
    state = None
    if params.get("status"):
        try:
            state = State(params["status"])
        except ValueError:
            names = ", ".join(s.value for s in State)
            raise ApiProblem(
                400, "invalid_parameter", f"unknown status {params['status']!r}: one of {names}"
            ) from None
    raw_limit = params.get("limit", str(DEFAULT_PAGE))
    limit = whole_number(raw_limit)
    if limit is None or not 1 <= limit <= MAX_PAGE:
        raise ApiProblem(
            400, "invalid_parameter", f"limit must be a whole number from 1 to {MAX_PAGE}"
        )
    cursor = params.get("cursor") or None
    if cursor is not None:
        try:
            validate_project_id(cursor)
        except InvalidProjectId:
            raise ApiProblem(
                400, "invalid_parameter", "cursor is not one this API handed out"
            ) from None
    return state, limit, cursor


async def refresh_gauges(control: Control, store: Store, metrics: Metrics) -> None:
    """Set the gauges read at scrape time: projects by state (the fleet's, from one replica
    only: see :mod:`watcher.metrics`), the API's refusals and the rate-limit pause left."""
    try:
        if await store.reports_fleet_gauges():
            counts = await store.count_by_state()
            for state in State:
                metrics.projects.labels(state.value, FLEET).set(counts.get(state, 0))
        else:
            metrics.projects.clear()
    except StoreUnavailable:
        pass  # an outage: the last counts stand, and every other metric is still served
    now = control.readiness()
    metrics.api_refused.labels("unauthorized").set(int(now.unauthorized))
    metrics.api_refused.labels("payment_required").set(int(now.payment_required))
    metrics.rate_limit_paused.set(now.rate_limit_paused)


async def _http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    codes = {404: "not_found", 405: "method_not_allowed"}
    headers = dict(exc.headers) if exc.headers else None
    return problem(exc.status_code, codes.get(exc.status_code, "http_error"), exc.detail, headers)


async def _api_problem(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblem)  # noqa: S101 - registered for ApiProblem only
    return problem(exc.status, exc.error, str(exc), exc.headers)


async def _store_unavailable(_request: Request, exc: Exception) -> Response:
    """The database does not answer: 503, so a client (or Magic Hour's webhooks) tries again."""
    return problem(503, "store_unavailable", str(exc), {"Retry-After": "5"})


class _Observe:
    """ASGI middleware: logs ``http_request``, counts it, and turns a crash into a JSON 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: dict[object, str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = clock.monotonic()
        status = 500
        responded = False

        async def observed_send(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            log.exception("http_error", method=scope["method"], path=scope["path"])
            if not responded:
                status = 500
                response = problem(500, "internal_error", "internal error; see the watcher's log")
                await response(scope, receive, send)
        finally:
            route = self.routes.get(scope.get("endpoint"), "unmatched")
            self.metrics.http_requests.labels(route, str(status)).inc()
            log.debug(
                "http_request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                elapsed_ms=round((clock.monotonic() - started) * 1000, 1),
            )


def _methods(path: str, **handlers: Endpoint) -> Route:
    """One route serving ``path`` with a handler per method, so that a 405 on it lists every
    method in ``Allow`` (two routes of one path would each list only their own)."""

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return Route(path, endpoint, methods=list(handlers))


def create_app(control: Control, store: Store, metrics: Metrics) -> Starlette:
    """The control plane's app, serving the daemon behind ``control``."""
    h = _Handlers(control, store, metrics)
    routes = [
        Route("/healthz", h.healthz, methods=["GET"]),
        Route("/readyz", h.readyz, methods=["GET"]),
        Route("/metrics", h.metrics_text, methods=["GET"]),
        Route("/openapi.json", h.openapi_json, methods=["GET"]),
        _methods("/v1/projects", GET=h.list_projects, POST=h.track),
        _methods("/v1/projects/{id}", GET=h.show, DELETE=h.untrack),
        Route("/webhooks/magic-hour", h.webhook, methods=["POST"]),
    ]
    labels: dict[object, str] = {route.endpoint: route.path for route in routes}
    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: _http_exception,
            ApiProblem: _api_problem,
            StoreUnavailable: _store_unavailable,
        },
    )
    policy = HostPolicy(control.settings.http_host, control.settings.allowed_hosts)
    app.add_middleware(RequestGuard, policy=policy)
    app.add_middleware(_Observe, metrics=metrics, routes=labels)  # outermost: sees all
    return app


def route_table(app: Starlette) -> set[tuple[str, str]]:
    """Every (path, method) the app serves, HEAD aside: what the OpenAPI document must cover."""
    table: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            table.update((route.path, m) for m in route.methods or () if m != "HEAD")
    return table
