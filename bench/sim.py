"""The bench's handle on a simulator process (``bench/sim_server.py``): start it, create
projects through the admin API, fetch a signed URL, collect its report, stop it."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

import httpx

from bench.proc import process_cpu_seconds

SERVER = Path(__file__).with_name("sim_server.py")
MAX_CREATE = 10_000  # the simulator's limit per POST /sim/projects
START_TIMEOUT = 30.0
REPORT_TIMEOUT = 300.0
BENCH_TOKEN = "mhk_live_bench"  # noqa: S105 - the simulator's token, not a secret


class SimProcess:
    """A running ``bench/sim_server.py``; a context manager that stops it on exit."""

    def __init__(self, config: dict[str, Any]) -> None:
        config = {"token": BENCH_TOKEN, **config}
        self._proc = subprocess.Popen(
            [sys.executable, str(SERVER), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._read_line(START_TIMEOUT)
        parts = line.split()
        if len(parts) != 3 or parts[0] != "ready":
            self.close()
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.base_url, self.token = parts[1], parts[2]
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {self.token}"},
            timeout=120.0,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """The simulator's process id."""
        return self._proc.pid

    def cpu_seconds(self) -> float:
        """CPU the simulator has used so far."""
        return process_cpu_seconds(self._proc.pid)

    def _read_line(self, timeout: float) -> str:
        assert self._proc.stdout is not None  # noqa: S101 - opened with PIPE
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the simulator did not answer within {timeout:g} s")
        return self._proc.stdout.readline().strip()

    def _command(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self._proc.stdin is not None  # noqa: S101 - opened with PIPE
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self._read_line(timeout))
        if "error" in answer:
            raise RuntimeError(f"the simulator refused {command['cmd']}: {answer['error']}")
        return answer

    def create(self, count: int, overrides: dict[str, Any] | None = None) -> list[str]:
        """Create ``count`` image projects (in batches the simulator accepts); return their ids."""
        ids: list[str] = []
        while len(ids) < count:
            batch = min(MAX_CREATE, count - len(ids))
            body = {"kind": "image", "count": batch, "overrides": overrides or {}}
            response = self._http.post("/sim/projects", json=body)
            response.raise_for_status()
            ids.extend(response.json()["ids"])
        return ids

    def download_url(self, project_id: str) -> str:
        """A fresh signed URL of output 0 of a complete project (one API GET, logged)."""
        response = self._http.get(f"/v1/image-projects/{project_id}")
        response.raise_for_status()
        url: str = response.json()["downloads"][0]["url"]
        return url

    def report(self, path: Path, *, truth: list[str] | None = None) -> dict[str, Any]:
        """What the simulator saw, with the truth about the ``truth`` ids (see
        ``sim_server.report``), written to ``path`` and loaded."""
        self._command({"cmd": "report", "path": str(path), "truth": truth or []}, REPORT_TIMEOUT)
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def close(self) -> None:
        """Stop the simulator (safe to call twice)."""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None  # noqa: S101 - opened with PIPE
            try:
                self._proc.stdin.close()
                self._proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        if hasattr(self, "_http"):
            self._http.close()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
