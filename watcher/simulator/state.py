"""The simulator's state: the project registry, signed URLs, fault draws and the event log.

This module owns :class:`Simulator`, the in-process model of Magic Hour that the HTTP app
(``app``) serves and that tests query directly (``create_projects``, ``truth``,
``expected_bytes``, ``events``). Every method is thread-safe: the server runs in a thread of
its own. Time comes only from the injected ``clock``, so tests can move it without sleeping.
It does not speak HTTP; plans come from ``timeline``, bytes from ``content``, bodies from
``payload``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import secrets
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import SimConfig
from watcher.simulator.content import ByteSource, OutputSpec
from watcher.simulator.faults import FaultDrawer
from watcher.simulator.payload import SignedUrl, project_body
from watcher.simulator.timeline import make_project_id, plan_project

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from watcher.simulator.config import Faults
    from watcher.simulator.faults import Fault, FaultTarget
    from watcher.simulator.timeline import ProjectOverrides, ProjectPlan, Timeline

EventWhat = Literal["get", "delete", "download", "admin", "webhook"]
HookName = Literal["started", "completed", "errored"]
MAX_WEBHOOK_ATTEMPTS = 5

MAX_EXPECTED_BYTES = 64 * 1024 * 1024
MAX_CREATE = 10_000


class UnknownProjectError(LookupError):
    """The simulator never created a project with this id."""


@dataclass(frozen=True, slots=True)
class Event:
    """One request the simulator saw; ``seq`` and ``at`` are stamped by :meth:`Simulator.record`.

    ``status_code`` is ``None`` when the connection was dropped without a response.
    ``completed``, ``bytes_sent``, ``ended_at`` and ``authorization_sent`` are set for downloads
    only; the first three once the body has ended (``None`` while it streams; ``completed`` is
    ``None`` for HEAD).
    """

    method: str
    what: EventWhat
    path: str
    status_code: int | None
    project_id: str | None = None
    index: int | None = None
    range: str | None = None
    completed: bool | None = None
    bytes_sent: int | None = None
    ended_at: float | None = None
    authorization_sent: bool | None = None
    fault: str | None = None
    user_agent: str | None = None
    seq: int = 0
    at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The event as ``GET /sim/events`` lists it: every field."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class OutputTruth:
    """What an output really is: the reference a download is checked against."""

    index: int
    name: str
    content_type: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ProjectTruth:
    """The whole truth about a project at one moment, for tests and ``GET /sim/projects/{id}``."""

    id: str
    kind: Kind
    status: RemoteStatus
    created_at: float
    clock_started_at: float | None
    deleted_at: float | None
    timeline: Timeline
    outputs: tuple[OutputTruth, ...]

    @property
    def deleted(self) -> bool:
        """Whether the project was deleted through the API."""
        return self.deleted_at is not None

    @property
    def finishes_at(self) -> float | None:
        """When the project reaches its terminal status (``None``: its clock has not started)."""
        if self.clock_started_at is None:
            return None
        return self.clock_started_at + self.timeline.total_seconds

    def to_json(self) -> dict[str, Any]:
        """The truth as ``GET /sim/projects/{id}`` returns it (times in Unix seconds)."""
        timeline = self.timeline
        started = self.clock_started_at
        return {
            "id": self.id,
            "kind": self.kind.value,
            "status": self.status.value,
            "created_at": self.created_at,
            "deleted": self.deleted,
            "deleted_at": self.deleted_at,
            "timeline": {
                "clock_started_at": started,
                "queued_seconds": timeline.queued_seconds,
                "rendering_seconds": timeline.rendering_seconds,
                "rendering_at": None if started is None else started + timeline.queued_seconds,
                "finishes_at": self.finishes_at,
                "final_status": timeline.final_status.value,
                "error": None
                if timeline.error is None
                else {"code": timeline.error.code, "message": timeline.error.message},
            },
            "outputs": [asdict(output) for output in self.outputs],  # every field
        }


@dataclass(frozen=True, slots=True)
class DownloadGrant:
    """The verdict on a download URL: 200 with the output, or 403/404 with a reason."""

    status_code: int
    reason: str
    output: OutputSpec | None = None


@dataclass(frozen=True, slots=True)
class PendingWebhook:
    """A webhook event due for delivery: its body (``type`` and the project object as it was
    at the transition, with fresh URLs once complete) and how many deliveries failed so far."""

    project_id: str
    event: HookName
    body: dict[str, Any]
    attempt: int = 0


@dataclass(slots=True)
class _Project:
    plan: ProjectPlan
    created_at: float
    clock_started_at: float | None
    deleted_at: float | None = None


class Simulator:
    """The simulated Magic Hour projects, with their timelines, outputs and request log."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        secret: bytes | None = None,
    ) -> None:
        self._config = config or SimConfig()
        self._clock = clock
        self._secret = secret or secrets.token_bytes(32)
        self._bytes = ByteSource(self._config.seed)
        self._faults = FaultDrawer(self._config.seed, self._config.faults)
        self._lock = threading.Lock()
        self._projects: dict[str, _Project] = {}
        self._counter = 0
        self._events: list[Event] = []
        self._sha256: dict[tuple[str, int], str] = {}
        # Webhook events not yet delivered: (due at, tie-breaker, project id, event, attempt).
        self._hooks: list[tuple[float, int, str, HookName, int]] = []
        self._hook_counter = 0

    @property
    def config(self) -> SimConfig:
        """The current configuration."""
        return self._config

    def now(self) -> float:
        """The simulator's clock."""
        return self._clock()

    def set_faults(self, faults: Faults) -> None:
        """Change the fault rates from now on (the random sequence carries on)."""
        with self._lock:
            self._config = replace(self._config, faults=faults)
            self._faults.faults = faults

    def set_token(self, token: str) -> None:
        """Change the accepted API token, e.g. to simulate a revoked key."""
        with self._lock:
            self._config = replace(self._config, token=token)

    # --- projects ---------------------------------------------------------------------------

    def create_projects(
        self, kind: Kind, count: int = 1, overrides: ProjectOverrides | None = None
    ) -> list[str]:
        """Create ``count`` projects of ``kind`` and return their ids, in creation order."""
        if not 1 <= count <= MAX_CREATE:
            raise ValueError(f"count must be between 1 and {MAX_CREATE}")
        with self._lock:
            return [self._create(kind, overrides) for _ in range(count)]

    def _create(self, kind: Kind, overrides: ProjectOverrides | None) -> str:
        self._counter += 1
        project_id = make_project_id(self._config.seed, self._counter)
        now = self._clock()
        started = now if self._config.timeline_start == "created" else None
        plan = plan_project(self._config, kind, project_id, overrides)
        self._projects[project_id] = _Project(plan, now, started)
        if started is not None:
            self._schedule_hooks(project_id, plan.timeline, started)
        return project_id

    def truth(self, project_id: str) -> ProjectTruth:
        """The truth about a project; hashes every output (slow the first time for huge ones)."""
        with self._lock:
            project = self._get(project_id)
            status = self._status(project, self._clock())
            plan, created, started, deleted = (
                project.plan,
                project.created_at,
                project.clock_started_at,
                project.deleted_at,
            )
        outputs = tuple(
            OutputTruth(o.index, o.name, o.content_type, o.size, self._hash(project_id, o))
            for o in plan.outputs
        )
        return ProjectTruth(
            project_id, plan.kind, status, created, started, deleted, plan.timeline, outputs
        )

    def output(self, project_id: str, index: int) -> OutputSpec:
        """The spec of output ``index`` of a project; raises ``LookupError`` when absent."""
        with self._lock:
            return self._get(project_id).plan.outputs[index]

    def expected_bytes(self, project_id: str, index: int) -> bytes:
        """The exact bytes of an output of at most 64 MiB."""
        output = self.output(project_id, index)
        if output.size > MAX_EXPECTED_BYTES:
            raise ValueError("output too large to build in memory: use expected_sha256")
        return self._bytes.read(output)

    def expected_sha256(self, project_id: str, index: int) -> str:
        """The hex SHA-256 of an output, computed by streaming and cached."""
        return self._hash(project_id, self.output(project_id, index))

    def chunks(self, output: OutputSpec, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of ``output`` in chunks of at most 64 KiB."""
        return self._bytes.chunks(output, start, end)

    def _hash(self, project_id: str, output: OutputSpec) -> str:
        key = (project_id, output.index)
        with self._lock:
            cached = self._sha256.get(key)
        if cached is None:
            cached = self._bytes.sha256(output)
            with self._lock:
                self._sha256[key] = cached
        return cached

    def _get(self, project_id: str) -> _Project:
        project = self._projects.get(project_id)
        if project is None:
            raise UnknownProjectError(project_id)
        return project

    @staticmethod
    def _status(project: _Project, now: float) -> RemoteStatus:
        started = project.clock_started_at
        elapsed = None if started is None else now - started
        return project.plan.timeline.status_at(elapsed)

    # --- the API ------------------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the accepted bearer token."""
        scheme, _, token = (header or "").partition(" ")
        valid = hmac.compare_digest(token.strip().encode(), self._config.token.encode())
        return scheme.lower() == "bearer" and valid

    def api_get(self, kind: Kind, project_id: str, base_url: str) -> dict[str, Any] | None:
        """The body of ``GET /v1/{kind}-projects/{id}``, or ``None`` for a 404.

        The first GET starts the render clock when ``timeline_start`` is ``first_get``. Once
        complete, every GET signs fresh URLs valid for ``url_lifetime`` seconds.
        """
        with self._lock:
            now = self._clock()
            project = self._projects.get(project_id)
            if project is None or project.plan.kind is not kind:
                return None
            deleted = project.deleted_at is not None
            if deleted and self._config.after_delete == "404":
                return None
            if project.clock_started_at is None:
                project.clock_started_at = now
                self._schedule_hooks(project_id, project.plan.timeline, now)
            status = self._status(project, now)
            links = []
            if status is RemoteStatus.COMPLETE and not deleted:
                links = [
                    self._signed_url(base_url, project_id, o, now) for o in project.plan.outputs
                ]
            return project_body(
                project.plan,
                status=status,
                created_at=project.created_at,
                enabled=not deleted,
                downloads=links,
            )

    def api_delete(self, kind: Kind, project_id: str) -> bool:
        """Apply ``DELETE /v1/{kind}-projects/{id}``; ``False`` means 404 (unknown or deleted)."""
        with self._lock:
            project = self._projects.get(project_id)
            if project is None or project.plan.kind is not kind or project.deleted_at is not None:
                return False
            project.deleted_at = self._clock()
            return True

    # --- webhook events -----------------------------------------------------------------------

    def _schedule_hooks(self, project_id: str, timeline: Timeline, started: float) -> None:
        """Plan the project's events as Magic Hour sends them: ``started`` when rendering
        begins (not for a render of no time, as fast images skip it), ``completed`` or
        ``errored`` at the end, nothing for ``canceled``; each ``webhook_delay`` late."""
        if self._config.webhook_url is None:
            return
        delay = self._config.webhook_delay
        if timeline.rendering_seconds > 0:
            self._push_hook(started + timeline.queued_seconds + delay, project_id, "started", 0)
        end = started + timeline.total_seconds + delay
        if timeline.final_status is RemoteStatus.COMPLETE:
            self._push_hook(end, project_id, "completed", 0)
        elif timeline.final_status is RemoteStatus.ERROR:
            self._push_hook(end, project_id, "errored", 0)

    def _push_hook(self, at: float, project_id: str, event: HookName, attempt: int) -> None:
        self._hook_counter += 1
        heapq.heappush(self._hooks, (at, self._hook_counter, project_id, event, attempt))

    def next_webhook_at(self) -> float | None:
        """When the next webhook event is due (``None``: none is planned)."""
        with self._lock:
            return self._hooks[0][0] if self._hooks else None

    def due_webhooks(self, base_url: str) -> list[PendingWebhook]:
        """Take the webhook events due by now, oldest first, with their bodies (a deleted
        project's events are dropped)."""
        due: list[PendingWebhook] = []
        with self._lock:
            now = self._clock()
            while self._hooks and self._hooks[0][0] <= now:
                _, _, project_id, event, attempt = heapq.heappop(self._hooks)
                project = self._projects[project_id]
                if project.deleted_at is not None or project.clock_started_at is None:
                    continue
                timeline = project.plan.timeline
                at = timeline.queued_seconds if event == "started" else timeline.total_seconds
                status = timeline.status_at(at)
                links = []
                if status is RemoteStatus.COMPLETE:
                    links = [
                        self._signed_url(base_url, project_id, o, now) for o in project.plan.outputs
                    ]
                payload = project_body(
                    project.plan,
                    status=status,
                    created_at=project.created_at,
                    enabled=True,
                    downloads=links,
                )
                body = {"type": f"{project.plan.kind.value}.{event}", "payload": payload}
                due.append(PendingWebhook(project_id, event, body, attempt))
        return due

    def webhook_failed(self, hook: PendingWebhook) -> bool:
        """A delivery of ``hook`` failed: plan it again with exponential backoff (1, 2, 4, …
        seconds) as Magic Hour does, up to ``MAX_WEBHOOK_ATTEMPTS``; whether it will be."""
        attempt = hook.attempt + 1
        if attempt >= MAX_WEBHOOK_ATTEMPTS:
            return False
        with self._lock:
            at = self._clock() + 2.0 ** (attempt - 1)
            self._push_hook(at, hook.project_id, hook.event, attempt)
        return True

    # --- signed download URLs -----------------------------------------------------------------

    def _signature(self, project_id: str, index: int, name: str, expires: int) -> str:
        message = f"{project_id}/{index}/{name}/{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _signed_url(
        self, base_url: str, project_id: str, output: OutputSpec, now: float
    ) -> SignedUrl:
        expires = math.ceil(now + self._config.url_lifetime)
        sig = self._signature(project_id, output.index, output.name, expires)
        path = f"/sim/files/{project_id}/{output.index}/{output.name}"
        return SignedUrl(f"{base_url.rstrip('/')}{path}?expires={expires}&sig={sig}", expires)

    def open_download(
        self, project_id: str, index: int, name: str, expires: str | None, sig: str | None
    ) -> DownloadGrant:
        """Check a download URL: 403 if unsigned, tampered or expired; 404 if deleted."""
        if not expires or not sig or not expires.isdigit():
            return DownloadGrant(403, "missing signature")
        expected = self._signature(project_id, index, name, int(expires))
        if not hmac.compare_digest(expected, sig):
            return DownloadGrant(403, "bad signature")
        with self._lock:
            if self._clock() > int(expires):
                return DownloadGrant(403, "expired")
            project = self._projects.get(project_id)
            if project is None or project.deleted_at is not None:
                return DownloadGrant(404, "deleted")
            outputs = project.plan.outputs
        if not 0 <= index < len(outputs) or outputs[index].name != name:
            return DownloadGrant(404, "no such output")
        return DownloadGrant(200, "ok", outputs[index])

    # --- faults and the event log -------------------------------------------------------------

    def draw_fault(self, target: FaultTarget) -> Fault | None:
        """Decide which fault, if any, the next request to ``target`` suffers."""
        with self._lock:
            return self._faults.draw(target, self._clock())

    def record(self, event: Event) -> int:
        """Append ``event`` to the log, stamping its sequence number and time; return the seq."""
        with self._lock:
            seq = len(self._events) + 1
            self._events.append(replace(event, seq=seq, at=self._clock()))
            return seq

    def finish_download(self, seq: int, *, completed: bool | None, bytes_sent: int) -> None:
        """Record how the body of the download logged as ``seq`` ended."""
        with self._lock:
            event = replace(
                self._events[seq - 1],
                completed=completed,
                bytes_sent=bytes_sent,
                ended_at=self._clock(),
            )
            self._events[seq - 1] = event

    def events(self) -> list[Event]:
        """A copy of the event log, oldest first."""
        with self._lock:
            return list(self._events)
