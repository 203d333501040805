"""The ``watcher`` command as a subprocess: settings errors, signals, track/status, the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import pg
from tests.support import watcher_env
from watcher import __version__
from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.timeline import ProjectOverrides

Serve = Callable[..., SimulatorServer]
WATCHER = [sys.executable, "-m", "watcher"]


def clean_env(**variables: str) -> dict[str, str]:
    """The process environment without any WATCHER_* variable, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(variables)
    return env


def run(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WATCHER, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def json_lines(text: str) -> list[dict[str, object]]:
    """Every stdout line must be one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_bad_settings_exit_2_with_one_line_each(tmp_path: Path) -> None:
    """Each bad setting is named on its own line, with exit status 2 and no traceback."""
    env = clean_env(
        WATCHER_API_TOKEN="mhk_live_secret_value",
        WATCHER_POLL_MAX="soon",
        WATCHER_MAX_CONCURRENT_REQUESTS="0",
        WATCHER_PROJECTS="good1 ../../etc/passwd",
        WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}",
    )
    result = run(["run"], env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert any("WATCHER_POLL_MAX" in line for line in lines)
    assert any("WATCHER_MAX_CONCURRENT_REQUESTS" in line for line in lines)
    assert any("WATCHER_PROJECTS" in line and "../../etc/passwd" in line for line in lines)
    assert "Traceback" not in result.stderr
    assert "mhk_live_secret_value" not in result.stderr + result.stdout


def test_a_store_timeout_over_half_the_lease_exits_2(tmp_path: Path) -> None:
    """``watcher run`` with a store timeout longer than half the lease refuses to start, in one
    line naming both settings and their values, and touches no database."""
    db = tmp_path / "w.db"
    lease = {"WATCHER_LEASE_SECONDS": "10", "WATCHER_STORE_TIMEOUT": "10"}
    result = run(["run"], clean_env(WATCHER_DATABASE_URL=f"sqlite:///{db}", **lease))
    assert (result.returncode, result.stderr) == (
        2,
        "watcher: WATCHER_STORE_TIMEOUT (10) must be at most half of WATCHER_LEASE_SECONDS (10)\n",
    )
    assert not db.exists()


def test_missing_token_exits_2(tmp_path: Path) -> None:
    """``watcher run`` without a token refuses to start and says which variable to set."""
    result = run(["run"], clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}"))
    assert result.returncode == 2
    assert "WATCHER_API_TOKEN" in result.stderr


def test_track_refuses_malformed_ids_naming_each(tmp_path: Path) -> None:
    """``watcher track`` names every bad id, one per line, and tracks nothing."""
    env = clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}")
    result = run(["track", "goodid", "bad/id", "video:../up"], env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "bad/id" in lines[0]
    assert "../up" in lines[1]
    assert not (tmp_path / "w.db").exists()


def test_track_refuses_to_change_a_projects_kind(tmp_path: Path) -> None:
    """An id tracked as one kind and given again as another is a conflict, not "already
    tracked": exit 1, with the kind it has."""
    env = clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}")
    assert run(["track", "image:abc123"], env).returncode == 0
    again = run(["track", "video:abc123", "image:new456"], env)
    assert again.returncode == 1
    assert again.stdout.splitlines() == ["tracked new456"]
    assert "abc123 is already tracked as image, not video" in again.stderr


def test_status_without_a_database_says_so_and_creates_nothing(tmp_path: Path) -> None:
    """``watcher status`` on a path where no database exists fails clearly; no file, no folder."""
    missing = tmp_path / "nowhere" / "w.db"
    result = run(["status"], clean_env(WATCHER_DATABASE_URL=f"sqlite:///{missing}"))
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_sigterm_stops_cleanly_and_a_restart_finishes(serve: Serve, tmp_path: Path) -> None:
    """SIGTERM ends ``watcher run`` with status 0; ``run --until-done`` then finishes the work,
    a project added with ``watcher track`` included, and no log line carries the token."""
    server = serve(
        SimConfig(
            seed=3,
            queued_seconds=(1.0, 2.0),
            rendering_seconds=(0.5, 1.0),
            error_rate=0,
            cancel_rate=0,
        )
    )
    sim = server.simulator
    ids = sim.create_projects(Kind.IMAGE, 5)
    env = clean_env(**watcher_env(server, tmp_path, projects=" ".join(ids), log_format="json"))

    daemon = subprocess.Popen(
        [*WATCHER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    while not any(e.what == "get" for e in sim.events()):
        assert time.monotonic() < deadline, "the daemon never polled"
        time.sleep(0.05)
    (extra,) = sim.create_projects(Kind.AUDIO, 1, ProjectOverrides(status=RemoteStatus.COMPLETE))
    tracked = run(["track", "--kind", "audio", extra], env)
    assert tracked.returncode == 0, tracked.stderr
    assert f"tracked {extra}" in tracked.stdout
    daemon.send_signal(signal.SIGTERM)
    out, err = daemon.communicate(timeout=20)
    assert daemon.returncode == 0, err
    events = [e["event"] for e in json_lines(out)]
    assert "shutdown_requested" in events
    assert events[-1] == "daemon_stopped"

    finish = run(["run", "--until-done"], env)
    assert finish.returncode == 0, finish.stderr
    status = json.loads(run(["status", "--json"], env).stdout)
    assert status["counts"] == {"saved": 6}
    assert {p["id"] for p in status["projects"]} == {*ids, extra}
    for project in status["projects"]:
        for output in project["outputs"]:
            assert output["state"] == "saved"
            assert (tmp_path / "downloads" / output["path"]).is_file()
    token = sim.config.token
    assert token not in out + err + finish.stdout + finish.stderr


def test_status_table_is_readable(serve: Serve, tmp_path: Path) -> None:
    """``watcher status`` prints a summary line and one row per project."""
    env = clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}")
    assert run(["track", "video:abc123", "image:def456"], env).returncode == 0
    table = run(["status"], env).stdout.splitlines()
    assert table[0] == "projects: polling 2"
    header = ["ID", "KIND", "STATE", "REMOTE", "POLLS", "SAVED", "AGE", "NEXT", "NOTE"]
    assert table[1].split() == header
    assert sorted(line.split()[0] for line in table[2:]) == ["abc123", "def456"]
    assert {line.split()[-1] for line in table[2:]} == {"now"}  # due at once: NEXT, no note
    first = run(["status", "--limit", "1"], env).stdout.splitlines()
    assert first[-1] == "(showing 1 of 2: --limit for more, --state to filter)"
    assert run(["status", "--state", "polling"], env).stdout.splitlines()[-1].startswith("def456")


@pytest.mark.slow
def test_demo_runs_from_nothing(tmp_path: Path) -> None:
    """``watcher demo`` serves the simulator, saves every output, verifies them and exits 0."""
    result = run(["demo", "--dir", str(tmp_path / "demo")], clean_env(), timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "every output saved and verified" in result.stdout
    saved = [p for p in (tmp_path / "demo" / "downloads").rglob("*") if p.is_file()]
    assert saved
    assert not [p for p in saved if p.name.endswith(".part")]


def test_daemon_started_logs_the_version_and_redacted_settings(
    serve: Serve, tmp_path: Path, pg_empty_url: str
) -> None:
    """The ``daemon_started`` line of ``watcher run`` names the version and the effective
    settings (API base URL, store, download directory, limits), and no line of the run holds
    the API token, the control, webhook or notification secret, or the database's password."""
    server = serve(SimConfig(seed=3, error_rate=0, cancel_rate=0))
    password = "db-password-never-logged"
    database = urlsplit(pg_empty_url).path.lstrip("/")
    secrets = {
        "control_token": "control-token-never-logged",
        "webhook_secret": "webhook-secret-never-logged",
        "notify_secret": "notify-secret-never-logged",
    }
    env = clean_env(
        **watcher_env(
            server,
            tmp_path,
            database_url=pg.database_url(database, password=password),
            max_concurrent_downloads="3",
            log_level="info",
            **secrets,
        )
    )
    result = run(["run", "--until-done"], env)
    assert result.returncode == 0, result.stderr
    (started,) = [e for e in json_lines(result.stdout) if e["event"] == "daemon_started"]
    assert started["version"] == __version__
    config = started["config"]
    assert isinstance(config, dict)
    assert config["api_base_url"] == server.base_url.rstrip("/") + "/"
    assert config["store"] == {
        "kind": "postgresql",
        "host": "127.0.0.1",
        "port": 5432,
        "database": database,
        "user": "postgres",
    }
    assert config["download_dir"] == str(tmp_path / "downloads")
    assert config["max_concurrent_downloads"] == 3
    assert config["max_requests_per_second"] == 2000
    assert config["http"] == "off"
    assert (config["control_token"], config["webhooks"]) == (True, True)
    output = result.stdout + result.stderr
    for secret in [server.simulator.config.token, password, *secrets.values()]:
        assert secret not in output


def test_until_done_on_postgresql_with_notifications_exits(
    serve: Serve, tmp_path: Path, pg_empty_url: str
) -> None:
    """``watcher run --until-done`` on PostgreSQL with notifications on exits by itself once
    nothing is left: the notifier's cancellation is not lost in the connection pool."""
    server = serve(SimConfig(seed=3, error_rate=0, cancel_rate=0))
    env = clean_env(
        **watcher_env(
            server,
            tmp_path,
            database_url=pg_empty_url,
            notify_url="http://127.0.0.1:9/hook",
            notify_secret="notify-secret",
            http_enabled="false",
        )
    )
    result = run(["run", "--until-done"], env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "daemon_stopped" in result.stdout
