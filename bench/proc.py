"""Child processes under measurement: wall time, CPU seconds and peak RSS of exactly one process.

A command is started through ``bench/launch.py`` (see its docstring for why: a peak RSS that is
the command's own, not the bench's), which reaps it with ``os.wait4`` and reports its ``rusage``:
CPU (user + system, all threads) and peak resident set of that process alone, and its wall time.
The bench waits on a pidfd (no polling). While the command runs, :meth:`Child.cpu_seconds` reads
``/proc/<pid>/stat`` for the CPU used so far. Linux only.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LAUNCHER = Path(__file__).with_name("launch.py")
PID_TIMEOUT = 10.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """CPU (user + system, every thread) that a running process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class Measured:
    """How one command ran."""

    command: str
    exit_code: int | None  # None: killed by the bench after its deadline
    started_at: float  # time.time() when the command was spawned
    wall_seconds: float  # spawn to exit (monotonic clock)
    cpu_user: float
    cpu_system: float
    max_rss_bytes: int

    @property
    def cpu_seconds(self) -> float:
        """User plus system CPU seconds."""
        return self.cpu_user + self.cpu_system

    @property
    def timed_out(self) -> bool:
        """Whether the bench had to kill the command."""
        return self.exit_code is None


class Child:
    """One measured command (use :meth:`wait` exactly once)."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    ) -> None:
        self.argv = argv
        self._dir = Path(tempfile.mkdtemp(prefix="bench-launch-"))
        self._result = self._dir / "result.json"
        self._launcher = subprocess.Popen(
            [sys.executable, "-S", str(LAUNCHER), str(self._result), "--", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
        self._pidfd = os.pidfd_open(self._launcher.pid)
        self.pid = self._command_pid()

    def _command_pid(self) -> int:
        pid_file = self._dir / "result.json.pid"
        deadline = time.monotonic() + PID_TIMEOUT
        while time.monotonic() < deadline:
            if pid_file.is_file() and (text := pid_file.read_text()):
                return int(text)
            if self._launcher.poll() is not None:
                break
            time.sleep(0.001)
        raise RuntimeError(f"could not start {self.argv[0]}")

    def cpu_seconds(self) -> float:
        """CPU (user + system, every thread) used so far; the command must still be running."""
        return process_cpu_seconds(self.pid)

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the command."""
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> Measured:
        """Wait for the command to exit, killing it after ``timeout`` seconds; measure it."""
        ready, _, _ = select.select([self._pidfd], [], [], max(timeout, 0.0))
        killed = not ready
        if killed:
            os.kill(self.pid, signal.SIGKILL)
        self._launcher.wait()
        os.close(self._pidfd)
        report = json.loads(self._result.read_text())
        for leftover in self._dir.iterdir():
            leftover.unlink()
        self._dir.rmdir()
        return Measured(
            command=" ".join(self.argv[:4]),
            exit_code=None if killed else int(report["exit_code"]),
            started_at=float(report["started_at"]),
            wall_seconds=float(report["wall_seconds"]),
            cpu_user=float(report["cpu_user"]),
            cpu_system=float(report["cpu_system"]),
            max_rss_bytes=int(report["max_rss_bytes"]),
        )
