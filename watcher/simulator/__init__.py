"""A local Magic Hour project API for demos and tests.

The simulator answers ``GET``/``DELETE /v1/{image,video,audio}-projects/{id}`` like the real API,
with deterministic timelines, signed download URLs, byte-exact outputs and injectable faults,
sends signed webhook events when given a ``webhook_url``, and logs every request so tests can
assert on what the watcher did.

Modules: ``config`` (settings), ``timeline`` (ids and per-project plans), ``content`` (output
bytes and ranges), ``faults`` (fault draws), ``payload`` (JSON bodies), ``state`` (the
thread-safe registry and event log), ``hooks`` (webhook delivery), ``app`` (the Starlette
app), ``server`` (uvicorn in a thread) and ``cli`` (``watcher simulate``).
"""

from __future__ import annotations

from watcher.simulator.app import create_app
from watcher.simulator.config import Faults, SimConfig
from watcher.simulator.content import ByteRange, OutputSpec, RangeNotSatisfiableError, parse_range
from watcher.simulator.faults import Fault
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import (
    DownloadGrant,
    Event,
    OutputTruth,
    ProjectTruth,
    Simulator,
    UnknownProjectError,
)
from watcher.simulator.timeline import ProjectError, ProjectOverrides, Timeline

__all__ = [
    "ByteRange",
    "DownloadGrant",
    "Event",
    "Fault",
    "Faults",
    "OutputSpec",
    "OutputTruth",
    "ProjectError",
    "ProjectOverrides",
    "ProjectTruth",
    "RangeNotSatisfiableError",
    "SimConfig",
    "Simulator",
    "SimulatorServer",
    "Timeline",
    "UnknownProjectError",
    "create_app",
    "parse_range",
]
