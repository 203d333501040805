"""The simulator in a process of its own, so its CPU is never counted against a client.

Run by the bench as ``python bench/sim_server.py CONFIG_JSON``: it serves a fresh
:class:`~watcher.simulator.Simulator` on 127.0.0.1 (a free port), prints one line
``ready <base_url> <token>``, then answers JSON commands, one per line on stdin:

- ``{"cmd": "report", "path": P, "truth": [ids]}``: write what the simulator saw, and the truth
  about the listed projects, to ``P`` (see :func:`report`) and answer ``{"ok": true}``;
- ``{"cmd": "quit"}`` or end of input: stop serving and exit.

Projects are created by the bench through the admin API (``POST /sim/projects``). The only thing
added to the simulator is the moment each project was first *answered* with a terminal status,
which the request log cannot tell (it records status codes, not bodies): detection lag is that
moment minus the end of the render in the simulator's truth.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from watcher.models import Kind
from watcher.simulator import SimConfig, Simulator, SimulatorServer

TERMINAL = frozenset({"complete", "error", "canceled"})
_PAIRS = ("queued_seconds", "rendering_seconds", "image_outputs", "output_bytes")


class BenchSimulator(Simulator):
    """A simulator that also notes when each project was first answered as terminal."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self._terminal_lock = threading.Lock()
        self.first_terminal: dict[str, float] = {}

    def api_get(self, kind: Kind, project_id: str, base_url: str) -> dict[str, Any] | None:
        """The API's GET, noting the first terminal answer (microseconds after it was decided)."""
        body = super().api_get(kind, project_id, base_url)
        if body is not None and body.get("status") in TERMINAL:
            at = self.now()
            with self._terminal_lock:
                self.first_terminal.setdefault(project_id, at)
        return body


def config_from_json(text: str) -> SimConfig:
    """A :class:`SimConfig` from the bench's JSON (lists for the (min, max) pairs)."""
    data = json.loads(text)
    for name in _PAIRS:
        if name in data:
            data[name] = tuple(data[name])
    return SimConfig(**data)


def report(sim: BenchSimulator, truth_ids: list[str]) -> dict[str, Any]:
    """What the simulator saw: every API GET and download, and the truth about ``truth_ids``.

    ``gets`` lists ``[time, project_id, status_code, user_agent]`` per GET; ``downloads`` one object
    per download request; ``webhooks`` ``[time, project_id, status_code]`` per event delivery;
    ``first_terminal`` the first terminal answer per project; ``truth`` the
    render end and the output hashes of each project of ``truth_ids``.
    """
    gets: list[list[Any]] = []
    downloads: list[dict[str, Any]] = []
    agents: Counter[str] = Counter()
    other = 0
    webhooks: list[list[Any]] = []
    for event in sim.events():
        if event.what == "get":
            gets.append([event.at, event.project_id, event.status_code, event.user_agent])
            agents[event.user_agent or ""] += 1
        elif event.what == "download":
            downloads.append(event.to_json())
            agents[event.user_agent or ""] += 1
        elif event.what == "delete":
            other += 1
        elif event.what == "webhook":
            webhooks.append([event.at, event.project_id, event.status_code])
    with sim._terminal_lock:  # noqa: SLF001 - our own subclass's lock
        first_terminal = dict(sim.first_terminal)
    return {
        "now": sim.now(),
        "gets": gets,
        "downloads": downloads,
        "deletes": other,
        "webhooks": webhooks,
        "user_agents": dict(agents),
        "first_terminal": first_terminal,
        "truth": {pid: _truth(sim, pid) for pid in truth_ids},
    }


def _truth(sim: Simulator, project_id: str) -> dict[str, Any]:
    truth = sim.truth(project_id)
    return {
        "clock_started_at": truth.clock_started_at,
        "finishes_at": truth.finishes_at,
        "final_status": truth.timeline.final_status.value,
        "outputs": [asdict(o) for o in truth.outputs],
    }


def main() -> int:
    """Serve until told to quit (or stdin closes)."""
    sim = BenchSimulator(config_from_json(sys.argv[1]))
    with SimulatorServer(sim) as server:
        print(f"ready {server.base_url} {sim.config.token}", flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            if command["cmd"] == "report":
                data = report(sim, list(command.get("truth", [])))
                Path(command["path"]).write_text(json.dumps(data))
                print(json.dumps({"ok": True}), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command['cmd']!r}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
