"""The watcher's benchmark against the official SDK; run ``python bench/run.py`` (see RESULTS.md).

Not part of the package or the test suite: scripts that start the simulator, the clients and
``curl`` as subprocesses, measure them, and print Markdown tables.
"""
