"""The ``watcher`` command's entry point (the console script and ``python -m watcher``).

:func:`main` imports the command line with the cyclic garbage collector off, then freezes what
the import made and turns the collector back on. An import makes modules, classes and functions
that live as long as the process and almost no cyclic garbage, yet the collector ran about 130
times during it, walking every object made so far: some 30 ms of CPU of a ``watcher run``'s
start-up (issue 11, ``bench/startup.py``). Frozen (:func:`gc.freeze`), those objects are left out
of every later collection too, so the running daemon's full collections walk only what it made.
"""

from __future__ import annotations

import gc
import sys


def main() -> int:
    """Import :mod:`watcher.cli` with the collector held off, then run it."""
    gc.disable()
    try:
        from watcher.cli import main as command  # noqa: PLC0415 - imported with the collector off
    finally:
        gc.freeze()
        gc.enable()
    return command()


if __name__ == "__main__":
    sys.exit(main())
