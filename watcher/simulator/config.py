"""The simulator's settings: timings, outcome rates, output sizes and injected faults.

This module owns the two frozen dataclasses :class:`SimConfig` and :class:`Faults` and their
validation. It knows nothing about HTTP or the project registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from watcher.errors import ConfigError
from watcher.models import Kind

TimelineStart = Literal["created", "first_get"]
AfterDelete = Literal["404", "disabled"]
RetryAfterForm = Literal["alternate", "seconds", "http-date"]

FloatRange = tuple[float, float]
IntRange = tuple[int, int]

MAX_OUTPUT_BYTES = 1 << 40


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be between 0 and 1, got {value}")


def _check_range(name: str, bounds: tuple[float, float], *, minimum: float) -> None:
    low, high = bounds
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{name} must be finite, got {bounds}")
    if low < minimum or high < low:
        raise ConfigError(f"{name} must satisfy {minimum} <= min <= max, got {bounds}")


@dataclass(frozen=True, slots=True)
class Faults:
    """How often each transport-level fault is injected; every rate is a probability per request.

    API calls (GET/DELETE) can draw ``429``, ``5xx``, ``reset``, ``slow`` and ``broken_json``;
    downloads can draw ``reset``, ``slow`` and ``truncate``. Admin endpoints are never faulted.
    """

    rate_429: float = 0.0
    retry_after: float = 1.0
    retry_after_form: RetryAfterForm = "alternate"
    rate_5xx: float = 0.0
    rate_reset: float = 0.0
    rate_slow: float = 0.0
    slow_seconds: float = 2.0
    rate_broken_json: float = 0.0
    rate_truncate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rate_429", "rate_5xx", "rate_reset", "rate_slow", "rate_broken_json"):
            _check_rate(name, getattr(self, name))
        _check_rate("rate_truncate", self.rate_truncate)
        api_total = self.rate_429 + self.rate_5xx + self.rate_reset + self.rate_slow
        if api_total + self.rate_broken_json > 1.0:
            raise ConfigError("the API fault rates add up to more than 1")
        if self.rate_reset + self.rate_slow + self.rate_truncate > 1.0:
            raise ConfigError("the download fault rates add up to more than 1")
        if self.retry_after < 0 or self.slow_seconds < 0:
            raise ConfigError("retry_after and slow_seconds must not be negative")
        if self.retry_after_form not in ("alternate", "seconds", "http-date"):
            raise ConfigError(f"unknown retry_after_form {self.retry_after_form!r}")

    @property
    def any(self) -> bool:
        """Whether any fault can be injected at all."""
        rates = (self.rate_429, self.rate_5xx, self.rate_reset, self.rate_slow)
        return any(rates) or bool(self.rate_broken_json or self.rate_truncate)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything that shapes the simulated API; the same config and seed give the same run."""

    token: str = "mhk_live_simulator"  # noqa: S105 - the simulator's public demo token
    seed: int = 0
    queued_seconds: FloatRange = (0.5, 2.0)
    rendering_seconds: FloatRange = (1.0, 4.0)
    error_rate: float = 0.1
    cancel_rate: float = 0.05
    image_outputs: IntRange = (1, 2)
    video_outputs: IntRange = (1, 1)
    audio_outputs: IntRange = (1, 1)
    output_bytes: IntRange = (2_000, 200_000)
    url_lifetime: float = 86_400.0
    timeline_start: TimelineStart = "created"
    after_delete: AfterDelete = "404"
    faults: Faults = field(default_factory=Faults)
    # Signed webhook events (``*.started``, ``*.completed``, ``*.errored``) POSTed to
    # ``webhook_url`` ``webhook_delay`` seconds after each transition; off without a URL.
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_delay: float = 0.2

    def __post_init__(self) -> None:
        if not self.token:
            raise ConfigError("token must not be empty")
        _check_range("queued_seconds", self.queued_seconds, minimum=0.0)
        _check_range("rendering_seconds", self.rendering_seconds, minimum=0.0)
        _check_rate("error_rate", self.error_rate)
        _check_rate("cancel_rate", self.cancel_rate)
        if self.error_rate + self.cancel_rate > 1.0:
            raise ConfigError("error_rate + cancel_rate must not exceed 1")
        for kind in Kind:
            _check_range(f"{kind.value}_outputs", self.outputs_range(kind), minimum=1)
        _check_range("output_bytes", self.output_bytes, minimum=1)
        if self.output_bytes[1] > MAX_OUTPUT_BYTES:
            raise ConfigError(f"output_bytes must not exceed {MAX_OUTPUT_BYTES}")
        if not (math.isfinite(self.url_lifetime) and self.url_lifetime > 0):
            raise ConfigError("url_lifetime must be a positive number of seconds")
        if self.timeline_start not in ("created", "first_get"):
            raise ConfigError(f"unknown timeline_start {self.timeline_start!r}")
        if self.after_delete not in ("404", "disabled"):
            raise ConfigError(f"unknown after_delete {self.after_delete!r}")
        if self.webhook_url is not None and not self.webhook_secret:
            raise ConfigError("webhook_url needs a webhook_secret to sign the events with")
        if not (math.isfinite(self.webhook_delay) and self.webhook_delay >= 0):
            raise ConfigError("webhook_delay must be a number of seconds, 0 or more")

    def outputs_range(self, kind: Kind) -> IntRange:
        """The (min, max) number of outputs a project of ``kind`` renders."""
        return {
            Kind.IMAGE: self.image_outputs,
            Kind.VIDEO: self.video_outputs,
            Kind.AUDIO: self.audio_outputs,
        }[kind]
