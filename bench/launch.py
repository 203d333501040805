"""Start one command and report its rusage: run by :mod:`bench.proc`, never by hand.

    python -S bench/launch.py RESULT -- COMMAND [ARG...]

Why a launcher: Linux keeps a process's peak RSS (``ru_maxrss``) across ``execve`` as the max of
the old and the new image, so a command started straight from the bench would report at least the
bench's own peak (hundreds of MB after it has read a large report). Started from this small
process (standard library only, ``-S``), the command's peak is its own, above a floor of about
10 MB.

It spawns COMMAND, writes its pid to ``RESULT.pid``, forwards SIGTERM and SIGINT to it, reaps it
with ``wait4`` and writes ``{"exit_code", "started_at", "wall_seconds", "cpu_user",
"cpu_system", "max_rss_bytes"}`` to RESULT as JSON; it exits with the command's exit code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    """Spawn, wait, report."""
    result, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        sys.stderr.write("usage: launch.py RESULT -- COMMAND [ARG...]\n")
        return 2
    started_at, started = time.time(), time.monotonic()
    pid = os.posix_spawnp(command[0], command, os.environ)
    Path(f"{result}.pid").write_text(str(pid))

    def forward(signum: int, _frame: object) -> None:
        os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    _, status, usage = os.wait4(pid, 0)  # retried after a forwarded signal (PEP 475)
    wall = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    report = {
        "exit_code": code,
        "started_at": started_at,
        "wall_seconds": wall,
        "cpu_user": usage.ru_utime,
        "cpu_system": usage.ru_stime,
        "max_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
    }
    Path(result).write_text(json.dumps(report))
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
