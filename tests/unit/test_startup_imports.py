"""What ``watcher run`` imports: only what its configuration uses.

Each case runs the real ``run`` path (``watcher.cli.main(["run", "--until-done"])`` on a fresh
SQLite file with nothing tracked, so it ends at once without a request) in a fresh interpreter,
then reads that interpreter's ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
from watcher.cli import main
code = main(["run", "--until-done"])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
PROBE_ARGV = [sys.executable, "-c", PROBE]

# Loaded only by the configurations that use them (the test names which).
POSTGRES = ("psycopg", "psycopg_pool", "watcher.store.postgres")
HTTP_SERVER = ("uvicorn", "starlette", "watcher.http.app", "watcher.http.server")
NOTIFIER = ("watcher.notify", "watcher.webhooks")
OBJECT_STORAGE = ("obstore",)
RETRIES = ("tenacity",)  # at an API call's first retry
NEVER_IN_RUN = ("watcher.simulator", "watcher.demo")


def probe_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a probe: a fresh SQLite file, nothing tracked, and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(
        {
            "WATCHER_API_TOKEN": "mhk_live_probe",
            "WATCHER_API_BASE_URL": "http://127.0.0.1:9",
            "WATCHER_DATABASE_URL": f"sqlite:///{tmp_path / 'watcher.db'}",
            "WATCHER_DOWNLOAD_DIR": str(tmp_path / "downloads"),
            "WATCHER_LOG_LEVEL": "warning",
            **settings,
        }
    )
    return env


def loaded_by_run(tmp_path: Path, **settings: str) -> set[str]:
    """The modules a ``watcher run --until-done`` of ``settings`` has loaded when it returns."""
    env = probe_env(tmp_path, **settings)
    done = subprocess.run(PROBE_ARGV, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["code"] == 0, done.stderr
    return set(report["modules"])


def under(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    """The modules in ``modules`` that are one of ``roots`` or lie inside one."""
    return sorted(m for m in modules if any(m == r or m.startswith(f"{r}.") for r in roots))


def test_a_sqlite_run_without_http_loads_no_driver_server_notifier_or_simulator(
    tmp_path: Path,
) -> None:
    """With SQLite, the HTTP server off, no notification URL and no storage URL, ``run`` imports
    neither the PostgreSQL driver, nor the HTTP server, nor the notifier and webhooks, nor the
    object storage client (obstore), nor tenacity (no call has been retried), nor the
    simulator."""
    modules = loaded_by_run(tmp_path, WATCHER_HTTP_ENABLED="false")
    lazy = POSTGRES + HTTP_SERVER + NOTIFIER + OBJECT_STORAGE + RETRIES + NEVER_IN_RUN
    assert under(modules, lazy) == []
    assert "watcher.daemon" in modules  # the probe did go through the run path


def test_an_enabled_http_server_loads_the_server_but_not_the_simulator(tmp_path: Path) -> None:
    """With the HTTP server on, ``run`` imports it (and still never the simulator)."""
    modules = loaded_by_run(
        tmp_path, WATCHER_HTTP_ENABLED="true", WATCHER_HTTP_HOST="127.0.0.1", WATCHER_HTTP_PORT="0"
    )
    assert "uvicorn" in modules
    assert "watcher.http.server" in modules
    assert under(modules, POSTGRES + NEVER_IN_RUN) == []


ENTRY_PROBE = """
import gc, json, sys
from watcher.__main__ import main
sys.argv = ["watcher", "run", "--until-done"]
code = main()
print(json.dumps({"code": code, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
"""


def test_the_entry_point_freezes_what_it_imported_and_runs_with_the_collector_on(
    tmp_path: Path,
) -> None:
    """The ``watcher`` entry point imports the command line with the garbage collector off,
    then freezes those objects and turns the collector back on: the daemon never runs without
    it."""
    env = probe_env(tmp_path, WATCHER_HTTP_ENABLED="false")
    argv = [sys.executable, "-c", ENTRY_PROBE]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["code"] == 0
    assert report["enabled"] is True
    assert report["frozen"] > 10_000  # the modules, classes and functions of the import
