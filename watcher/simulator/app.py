"""The simulator over HTTP: a Starlette app serving the project API, the files and the admin API.

This module owns routing, bearer auth, the responses of injected faults (including connections
dropped with no response, and bodies cut short) and the streaming of outputs with ``Range``
support. Decisions (status, signatures, which fault) are the :class:`Simulator`'s.

Endpoints::

    GET|DELETE /v1/{image,video,audio}-projects/{id}   the API (bearer auth, faults)
    GET|HEAD   /sim/files/{id}/{index}/{name}           signed downloads (no auth; faults)
    POST       /sim/projects                            admin: create projects
    GET        /sim/projects/{id}                       admin: the truth about a project
    GET        /sim/events                              admin: the request log (not itself logged)
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from watcher.errors import ConfigError
from watcher.models import Kind
from watcher.simulator.content import ByteRange, RangeNotSatisfiableError, parse_range
from watcher.simulator.payload import NOT_FOUND, UNAUTHORIZED
from watcher.simulator.state import Event, EventWhat, Simulator, UnknownProjectError
from watcher.simulator.timeline import ProjectOverrides

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import Receive, Scope, Send

    from watcher.simulator.content import OutputSpec
    from watcher.simulator.faults import Fault

TRANSPORT_KEY = "watcher.simulator.transport"

_PROXY_PAGE = (
    "<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>"
    "<h1>Checking your browser before accessing api.magichour.ai</h1></body></html>"
)
_ACCESS_DENIED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>AccessDenied</Code><Message>{reason}</Message></Error>"
)


class _EventFields(TypedDict, total=False):
    project_id: str | None
    index: int | None
    range: str | None
    completed: bool | None
    authorization_sent: bool | None
    fault: str | None


# --- connections ---------------------------------------------------------------------------


class _SimulatorApp(Starlette):
    """Starlette that remembers each request's transport, so a fault can drop the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[TRANSPORT_KEY] = _transport_of(send)
        await super().__call__(scope, receive, send)


def _transport_of(send: Send) -> asyncio.Transport | None:
    """The transport behind uvicorn's ``send`` (its request cycle holds it); ``None`` elsewhere."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.Transport) else None


def _connection_closing(scope: Scope) -> bool:
    transport: asyncio.Transport | None = scope.get(TRANSPORT_KEY)
    return transport is not None and transport.is_closing()


async def _close_connection(scope: Scope, receive: Receive, *, reset: bool) -> None:
    """Close the connection: flush and FIN, or (``reset``) an immediate RST; then wait for it.

    Without a real transport (an in-process ASGI client), raise instead: the client sees an
    exception, which is the closest thing to a dropped connection.
    """
    transport: asyncio.Transport | None = scope.get(TRANSPORT_KEY)
    if transport is None:
        raise ConnectionResetError("simulated dropped connection")
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
    while (await receive())["type"] != "http.disconnect":
        pass


class _DroppedConnection(Response):
    """Not a response: the connection is reset before a single byte is sent."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, _send: Send) -> None:
        await _close_connection(scope, receive, reset=True)


class _OutputResponse(Response):
    """Streams an output (or a range of it) block by block, honouring slow and truncate faults."""

    def __init__(
        self,
        sim: Simulator,
        output: OutputSpec,
        byte_range: ByteRange | None,
        seq: int,
        fault: Fault | None,
    ) -> None:
        self._sim, self._output, self._seq, self._fault = sim, output, seq, fault
        self._sent, self._finished = 0, False
        self._range = byte_range or ByteRange(0, output.size)
        headers = {
            "content-length": str(self._range.length),
            "accept-ranges": "bytes",
            "content-type": output.content_type,
            "etag": f'"{output.key.hex()}"',
        }
        if byte_range is not None:
            headers["content-range"] = byte_range.content_range(output.size)
        super().__init__(status_code=206 if byte_range else 200, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        await send(start)
        try:
            await self._send_body(scope, receive, send)
        finally:
            if not self._finished:
                self._finish(completed=False)

    def _finish(self, *, completed: bool | None) -> None:
        """Log how the body ended; done *before* the last write, so that a client holding the
        whole body always finds ``completed`` already set in the event log."""
        self._finished = True
        self._sim.finish_download(self._seq, completed=completed, bytes_sent=self._sent)

    def _budget(self) -> int | None:
        """How many bytes to send before cutting the connection (``None``: all of them)."""
        if self._fault is None or self._fault.name != "truncate":
            return None
        return min(int(self._range.length * self._fault.fraction), self._range.length - 1)

    async def _send_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":
            self._finish(completed=None)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        budget = self._budget()
        stall = self._fault.seconds if self._fault and self._fault.name == "slow" else 0.0
        for chunk in self._sim.chunks(self._output, self._range.start, self._range.end):
            if _connection_closing(scope):
                return
            if budget is not None and self._sent + len(chunk) >= budget:
                await self._cut(scope, receive, send, chunk[: budget - self._sent])
                return
            last = self._sent + len(chunk) == self._range.length
            if stall and (
                self._sent or last
            ):  # stall after the first chunk, or before the only one
                await anyio.sleep(stall)
                stall = 0.0
            self._sent += len(chunk)
            if last:
                self._finish(completed=True)
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})

    async def _cut(self, scope: Scope, receive: Receive, send: Send, piece: bytes) -> None:
        """Send ``piece``, then close the connection although Content-Length promised more."""
        await send({"type": "http.response.body", "body": piece, "more_body": True})
        self._sent += len(piece)
        self._finish(completed=False)
        await _close_connection(scope, receive, reset=False)


# --- fault responses -----------------------------------------------------------------------


def _server_error(fault: Fault) -> Response:
    status = fault.status_code or 500
    phrase = HTTPStatus(status).phrase
    if fault.variant == "empty":
        return Response(b"", status_code=status)
    if fault.variant == "json":
        return JSONResponse({"message": phrase}, status_code=status)
    page = (
        f"<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    )
    return Response(page, status_code=status, media_type="text/html")


def _broken_json(fault: Fault, project_id: str, method: str) -> Response:
    if fault.variant == "html" or method == "DELETE":
        return Response(_PROXY_PAGE, status_code=200, media_type="text/html")
    text = json.dumps({"id": project_id, "name": None, "status": "rendering", "type": "AI_IMAGE"})
    return Response(text[: len(text) // 2], status_code=200, media_type="application/json")


def _fault_response(fault: Fault, project_id: str, method: str) -> Response:
    if fault.name == "429":
        headers = {"retry-after": fault.retry_after or "1"}
        return JSONResponse({"message": "Too Many Requests"}, status_code=429, headers=headers)
    if fault.name == "5xx":
        return _server_error(fault)
    if fault.name == "broken_json":
        return _broken_json(fault, project_id, method)
    return _DroppedConnection()


# --- handlers ------------------------------------------------------------------------------


def _message(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status)


class _Handlers:
    """The endpoints, bound to one simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def _log(
        self, request: Request, what: EventWhat, status: int | None, **fields: Unpack[_EventFields]
    ) -> int:
        event = Event(
            method=request.method,
            what=what,
            path=request.url.path,
            status_code=status,
            user_agent=request.headers.get("user-agent"),
            **fields,
        )
        return self.sim.record(event)

    async def project(self, request: Request) -> Response:
        """``GET`` or ``DELETE /v1/{kind}-projects/{id}``."""
        what: EventWhat = "delete" if request.method == "DELETE" else "get"
        project_id: str = request.path_params["project_id"]
        fault = self.sim.draw_fault("api")
        if fault is not None and fault.name != "slow":
            self._log(request, what, fault.status_code, project_id=project_id, fault=fault.name)
            return _fault_response(fault, project_id, request.method)
        if fault is not None:
            await anyio.sleep(fault.seconds)
        response = self._project_answer(request, what, project_id)
        fault_name = None if fault is None else fault.name
        self._log(request, what, response.status_code, project_id=project_id, fault=fault_name)
        return response

    def _project_answer(self, request: Request, what: EventWhat, project_id: str) -> Response:
        if not self.sim.authorized(request.headers.get("authorization")):
            return JSONResponse(UNAUTHORIZED, status_code=401)
        try:
            kind = Kind(request.path_params["kind"])
        except ValueError:
            return JSONResponse(NOT_FOUND, status_code=404)
        if what == "delete":
            deleted = self.sim.api_delete(kind, project_id)
            return Response(status_code=204) if deleted else JSONResponse(NOT_FOUND, 404)
        body = self.sim.api_get(kind, project_id, str(request.base_url))
        return JSONResponse(NOT_FOUND, 404) if body is None else JSONResponse(body)

    async def download(self, request: Request) -> Response:
        """``GET /sim/files/{id}/{index}/{name}?expires=…&sig=…``: a signed file, no auth."""
        project_id: str = request.path_params["project_id"]
        index: int = request.path_params["index"]
        fields: _EventFields = {
            "project_id": project_id,
            "index": index,
            "range": request.headers.get("range"),
            "authorization_sent": "authorization" in request.headers,
            "completed": False,
        }
        fault = self.sim.draw_fault("download")
        if fault is not None and fault.name == "reset":
            fields["fault"] = "reset"
            self._log(request, "download", None, **fields)
            return _DroppedConnection()
        query = request.query_params
        grant = self.sim.open_download(
            project_id, index, request.path_params["name"], query.get("expires"), query.get("sig")
        )
        if grant.output is None:
            self._log(request, "download", grant.status_code, **fields)
            return _denied(grant.status_code, grant.reason)
        try:
            byte_range = parse_range(request.headers.get("range"), grant.output.size)
        except RangeNotSatisfiableError:
            self._log(request, "download", 416, **fields)
            headers = {"content-range": f"bytes */{grant.output.size}"}
            return Response(b"", status_code=416, headers=headers)
        fields["fault"] = None if fault is None else fault.name
        seq = self._log(request, "download", 206 if byte_range else 200, **fields)
        return _OutputResponse(self.sim, grant.output, byte_range, seq, fault)

    async def create(self, request: Request) -> Response:
        """``POST /sim/projects`` with ``{"kind", "count", "overrides"}``: ``{"ids": [...]}``."""
        if not self.sim.authorized(request.headers.get("authorization")):
            self._log(request, "admin", 401)
            return JSONResponse(UNAUTHORIZED, status_code=401)
        try:
            kind, count, overrides = _parse_create(await request.body())
            ids = self.sim.create_projects(kind, count, overrides)
        except (ValueError, ConfigError) as exc:
            self._log(request, "admin", 400)
            return _message(400, str(exc))
        self._log(request, "admin", 201, project_id=ids[0] if count == 1 else None)
        return JSONResponse({"ids": ids}, status_code=201)

    async def truth(self, request: Request) -> Response:
        """``GET /sim/projects/{id}``: the truth about a project, output hashes included."""
        project_id: str = request.path_params["project_id"]
        if not self.sim.authorized(request.headers.get("authorization")):
            self._log(request, "admin", 401, project_id=project_id)
            return JSONResponse(UNAUTHORIZED, status_code=401)
        try:
            truth = await anyio.to_thread.run_sync(self.sim.truth, project_id)
        except UnknownProjectError:
            self._log(request, "admin", 404, project_id=project_id)
            return JSONResponse(NOT_FOUND, status_code=404)
        self._log(request, "admin", 200, project_id=project_id)
        return JSONResponse(truth.to_json())

    async def events(self, request: Request) -> Response:
        """``GET /sim/events``: the ordered request log (this request is not logged)."""
        if not self.sim.authorized(request.headers.get("authorization")):
            return JSONResponse(UNAUTHORIZED, status_code=401)
        return JSONResponse({"events": [event.to_json() for event in self.sim.events()]})


def _denied(status: int, reason: str) -> Response:
    if status == 403:
        body = _ACCESS_DENIED.format(reason=reason)
        return Response(body, status_code=403, media_type="application/xml")
    return Response(b"", status_code=status)


def _parse_create(raw: bytes) -> tuple[Kind, int, ProjectOverrides]:
    data: Any = json.loads(raw or b"{}")
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object")
    count = data.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int):
        raise ConfigError("count must be an integer")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("overrides must be an object")
    return Kind(data.get("kind", "image")), count, ProjectOverrides.from_json(overrides)


async def _http_error(_request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in the API's ``{"message": ...}`` shape."""
    if not isinstance(exc, HTTPException):  # pragma: no cover - only registered for HTTPException
        raise exc
    return JSONResponse({"message": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(sim: Simulator) -> Starlette:
    """The ASGI app serving ``sim``."""
    handlers = _Handlers(sim)
    routes = [
        Route("/v1/{kind}-projects/{project_id}", handlers.project, methods=["GET", "DELETE"]),
        Route("/sim/files/{project_id}/{index:int}/{name}", handlers.download, methods=["GET"]),
        Route("/sim/projects", handlers.create, methods=["POST"]),
        Route("/sim/projects/{project_id}", handlers.truth, methods=["GET"]),
        Route("/sim/events", handlers.events, methods=["GET"]),
    ]
    return _SimulatorApp(routes=routes, exception_handlers={HTTPException: _http_error})
