"""What a simulated project will do, drawn deterministically from (seed, project id).

This module owns project ids, the per-project plan (how long it stays queued and rendering, how
it ends, its outputs and descriptive fields) and the overrides a test may impose. It is pure: no
clock, no lock, no I/O. The registry in ``state`` turns a plan and a time into a status.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from watcher.errors import ConfigError
from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import MAX_OUTPUT_BYTES
from watcher.simulator.content import CONTENT_TYPE, MAGIC, OutputSpec, output_key, output_name

if TYPE_CHECKING:
    from collections.abc import Mapping

    from watcher.simulator.config import SimConfig

_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_ID_BODY_LENGTH = 24
MAX_OUTPUTS = 64

TERMINAL_STATUSES = (RemoteStatus.COMPLETE, RemoteStatus.ERROR, RemoteStatus.CANCELED)

# Realistic failure reasons; the first is the example of the API's documentation.
ERRORS: tuple[tuple[str, str], ...] = (
    ("no_source_face", "Please use an image with a detectable face"),
    ("invalid_input", "The input file could not be decoded"),
    ("content_moderation", "The input was flagged by our content moderation system"),
    ("render_failed", "Rendering failed unexpectedly. Please try again"),
)
_TYPES: dict[Kind, tuple[str, ...]] = {
    Kind.IMAGE: ("AI_IMAGE", "FACE_SWAP", "AI_HEADSHOT", "IMAGE_UPSCALER", "BACKGROUND_REMOVER"),
    Kind.VIDEO: ("FACE_SWAP", "TEXT_TO_VIDEO", "IMAGE_TO_VIDEO", "LIP_SYNC", "ANIMATION"),
    Kind.AUDIO: ("VOICE_GENERATOR", "VOICE_CHANGER", "MUSIC_GENERATOR"),
}
_VIDEO_SIZES = ((512, 960), (1080, 1920), (1920, 1080), (1024, 1024))
_OVERRIDE_KEYS = frozenset(
    {"status", "queued_seconds", "rendering_seconds", "outputs", "output_size"}
)


def make_project_id(seed: int, counter: int) -> str:
    """A cuid-like id: ``c`` and 24 lowercase letters or digits, fixed by (seed, counter)."""
    number = int.from_bytes(hashlib.sha256(f"id:{seed}:{counter}".encode()).digest(), "big")
    chars = []
    for _ in range(_ID_BODY_LENGTH):
        number, digit = divmod(number, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return "c" + "".join(chars)


@dataclass(frozen=True, slots=True)
class ProjectError:
    """The ``error`` object of a project that ended with status ``error``."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Timeline:
    """How long a project stays queued and rendering, and how it ends."""

    queued_seconds: float
    rendering_seconds: float
    final_status: RemoteStatus
    error: ProjectError | None = None

    @property
    def total_seconds(self) -> float:
        """Seconds from the start of the render clock to the terminal status."""
        return self.queued_seconds + self.rendering_seconds

    def status_at(self, elapsed: float | None) -> RemoteStatus:
        """The status ``elapsed`` seconds after the render clock started (``None``: not started)."""
        if elapsed is None or elapsed < self.queued_seconds:
            return RemoteStatus.QUEUED
        if elapsed < self.total_seconds:
            return RemoteStatus.RENDERING
        return self.final_status


@dataclass(frozen=True, slots=True)
class VideoDetails:
    """The video-only fields of the API's project object."""

    width: int
    height: int
    fps: float
    start_seconds: float
    end_seconds: float


@dataclass(frozen=True, slots=True)
class ProjectPlan:
    """Everything about a project that does not depend on time."""

    id: str
    kind: Kind
    name: str | None
    type: str
    credits: int
    timeline: Timeline
    outputs: tuple[OutputSpec, ...]
    video: VideoDetails | None = None


@dataclass(frozen=True, slots=True)
class ProjectOverrides:
    """What a test imposes on a new project instead of the seeded draw; ``None`` keeps the draw."""

    status: RemoteStatus | None = None
    queued_seconds: float | None = None
    rendering_seconds: float | None = None
    outputs: int | None = None
    output_size: int | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in TERMINAL_STATUSES:
            raise ConfigError("status override must be complete, error or canceled")
        for name in ("queued_seconds", "rendering_seconds"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} override must be a non-negative number")
        if self.outputs is not None and not 1 <= self.outputs <= MAX_OUTPUTS:
            raise ConfigError(f"outputs override must be between 1 and {MAX_OUTPUTS}")
        if self.output_size is not None and not 1 <= self.output_size <= MAX_OUTPUT_BYTES:
            raise ConfigError(f"output_size override must be between 1 and {MAX_OUTPUT_BYTES}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProjectOverrides:
        """Build overrides from the admin API's JSON; raises :class:`ConfigError` when invalid."""
        unknown = set(data) - _OVERRIDE_KEYS
        if unknown:
            raise ConfigError(f"unknown overrides: {', '.join(sorted(unknown))}")
        try:
            status = data.get("status")
            return cls(
                status=None if status is None else RemoteStatus(status),
                queued_seconds=_optional_number(data, "queued_seconds"),
                rendering_seconds=_optional_number(data, "rendering_seconds"),
                outputs=_optional_int(data, "outputs"),
                output_size=_optional_int(data, "output_size"),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid overrides: {exc}") from None


def _optional_number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number")
    return float(value)


def _optional_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer")
    return value


def plan_project(
    config: SimConfig, kind: Kind, project_id: str, overrides: ProjectOverrides | None = None
) -> ProjectPlan:
    """Draw the plan of ``project_id`` from the seed, then apply ``overrides``.

    Every value is drawn in a fixed order whatever the overrides, so an override changes only
    the value it names.
    """
    rng = random.Random(f"plan:{config.seed}:{project_id}")
    timeline = _draw_timeline(rng, config)
    outputs = _draw_outputs(rng, config, kind, project_id)
    name = None if rng.random() < 0.2 else f"Simulated {kind.value} {project_id[-6:]}"
    project_type = rng.choice(_TYPES[kind])
    video = _draw_video(rng) if kind is Kind.VIDEO else None
    if overrides is not None:
        timeline = _override_timeline(timeline, overrides, rng)
        outputs = _override_outputs(outputs, overrides, config, kind, project_id)
    return ProjectPlan(
        id=project_id,
        kind=kind,
        name=name,
        type=project_type,
        credits=_credits(kind, len(outputs), video),
        timeline=timeline,
        outputs=outputs,
        video=video,
    )


def _draw_timeline(rng: random.Random, config: SimConfig) -> Timeline:
    queued = rng.uniform(*config.queued_seconds)
    rendering = rng.uniform(*config.rendering_seconds)
    outcome = rng.random()
    error = ProjectError(*rng.choice(ERRORS))
    if outcome < config.error_rate:
        return Timeline(queued, rendering, RemoteStatus.ERROR, error)
    if outcome < config.error_rate + config.cancel_rate:
        return Timeline(queued, rendering, RemoteStatus.CANCELED)
    return Timeline(queued, rendering, RemoteStatus.COMPLETE)


def _draw_outputs(
    rng: random.Random, config: SimConfig, kind: Kind, project_id: str
) -> tuple[OutputSpec, ...]:
    count = rng.randint(*config.outputs_range(kind))
    sizes = [rng.randint(*config.output_bytes) for _ in range(count)]
    return tuple(_output(config, kind, project_id, i, size) for i, size in enumerate(sizes))


def _output(config: SimConfig, kind: Kind, project_id: str, index: int, size: int) -> OutputSpec:
    return OutputSpec(
        index=index,
        name=output_name(kind, index),
        content_type=CONTENT_TYPE[kind],
        size=size,
        key=output_key(config.seed, project_id, index),
        magic=MAGIC[kind],
    )


def _draw_video(rng: random.Random) -> VideoDetails:
    width, height = rng.choice(_VIDEO_SIZES)
    fps = rng.choice((24.0, 30.0))
    return VideoDetails(width, height, fps, 0.0, float(rng.choice((5, 10, 15))))


def _credits(kind: Kind, outputs: int, video: VideoDetails | None) -> int:
    if video is not None:
        return round(video.fps * (video.end_seconds - video.start_seconds))
    return 5 * outputs if kind is Kind.IMAGE else 2


def _override_timeline(
    timeline: Timeline, overrides: ProjectOverrides, rng: random.Random
) -> Timeline:
    if overrides.queued_seconds is not None:
        timeline = replace(timeline, queued_seconds=overrides.queued_seconds)
    if overrides.rendering_seconds is not None:
        timeline = replace(timeline, rendering_seconds=overrides.rendering_seconds)
    if overrides.status is None or overrides.status is timeline.final_status:
        return timeline
    error = ProjectError(*rng.choice(ERRORS)) if overrides.status is RemoteStatus.ERROR else None
    return replace(timeline, final_status=overrides.status, error=error)


def _override_outputs(
    outputs: tuple[OutputSpec, ...],
    overrides: ProjectOverrides,
    config: SimConfig,
    kind: Kind,
    project_id: str,
) -> tuple[OutputSpec, ...]:
    count = len(outputs) if overrides.outputs is None else overrides.outputs
    sizes = [outputs[i % len(outputs)].size for i in range(count)]
    if overrides.output_size is not None:
        sizes = [overrides.output_size] * count
    return tuple(_output(config, kind, project_id, i, size) for i, size in enumerate(sizes))
