"""The ``watcher`` command as an operator meets it: a wrong base URL, reviving and untracking,
honest exit codes, ``status`` edges, ports in use, and SIGHUP re-reading rotated secrets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import spawn, watcher_env
from watcher.models import Kind, RemoteStatus
from watcher.simulator.config import SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator
from watcher.simulator.timeline import ProjectOverrides

Serve = Callable[..., SimulatorServer]
WATCHER = [sys.executable, "-m", "watcher"]
QUICK = SimConfig(
    seed=5,
    queued_seconds=(0.05, 0.2),
    rendering_seconds=(0.05, 0.2),
    error_rate=0,
    cancel_rate=0,
    output_bytes=(1_000, 4_000),
)
TOKEN_A = "mhk_live_rotation_first_0001"
TOKEN_B = "mhk_live_rotation_second_0002"
SLOW = ProjectOverrides(queued_seconds=600.0)  # polled for as long as the test runs


def clean_env(**variables: str) -> dict[str, str]:
    """The process environment without any WATCHER_* variable, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(variables)
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WATCHER, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def wait_for(what: str, condition: Callable[[], bool], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- a wrong base URL, reviving, untracking ------------------------------------------------------


def test_a_wrong_base_url_is_said_loudly_and_track_revives_the_projects(
    serve: Serve, tmp_path: Path
) -> None:
    """Every first GET answering 404 is logged as a suspect base URL, each project's 404 at
    warning with the path that answered; ``watcher track`` then revives the ``not_found``
    projects and a run with the right URL saves them all."""
    server = serve(QUICK)
    ids = server.simulator.create_projects(
        Kind.IMAGE, 3, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    env = clean_env(**watcher_env(server, tmp_path, projects=" ".join(ids), log_format="json"))
    wrong = dict(env, WATCHER_API_BASE_URL=f"{server.base_url}/api")

    first = run(["run", "--until-done"], wrong)
    assert first.returncode == 1, first.stderr
    lines = json_lines(first.stdout)
    suspect = [e for e in lines if e["event"] == "api_base_url_suspect"]
    assert len(suspect) == 1
    assert suspect[0]["level"] == "error"
    assert suspect[0]["path"].startswith("/api/v1/image-projects/")
    not_found = [e for e in lines if e["event"] == "project_not_found"]
    assert {e["project_id"] for e in not_found} == set(ids)
    assert {e["level"] for e in not_found} == {"warning"}
    assert {e["path"] for e in not_found} == {f"/api/v1/image-projects/{pid}" for pid in ids}
    assert lines[-1]["event"] == "daemon_stopped"
    assert lines[-1]["exit_code"] == first.returncode

    revived = run(["track", *ids], env)
    assert revived.returncode == 0, revived.stderr
    assert sorted(revived.stdout.splitlines()) == sorted(
        f"tracked {p} again (it was not_found)" for p in ids
    )
    again = run(["track", ids[0]], env)
    assert again.stdout.strip() == f"already tracked {ids[0]}"  # polling now: left as it is

    second = run(["run", "--until-done"], env)
    assert second.returncode == 0, second.stderr
    status = json.loads(run(["status", "--json"], env).stdout)
    assert status["counts"] == {"saved": 3}


def test_a_base_url_ending_in_v1_is_refused(tmp_path: Path) -> None:
    """``WATCHER_API_BASE_URL`` with ``/v1`` appended stops ``run`` at once with one line
    saying what to use instead (exit 2), instead of making every project ``not_found``."""
    env = clean_env(
        WATCHER_API_TOKEN=TOKEN_A,
        WATCHER_API_BASE_URL="https://api.magichour.ai/v1/",
        WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}",
    )
    result = run(["run"], env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "WATCHER_API_BASE_URL" in line
    assert "(use https://api.magichour.ai)" in line


def test_untrack_forgets_ids_and_says_which_were_not_tracked(tmp_path: Path) -> None:
    """``watcher untrack`` removes tracked ids from the store; an id that is not tracked is
    named on stderr and the exit status is 1."""
    env = clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}")
    assert run(["track", "abc123", "video:def456"], env).returncode == 0
    gone = run(["untrack", "abc123", "video:def456"], env)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.splitlines() == ["untracked abc123", "untracked def456"]
    again = run(["untrack", "abc123"], env)
    assert again.returncode == 1
    assert "abc123 is not tracked" in again.stderr
    assert json.loads(run(["status", "--json"], env).stdout)["projects"] == []


# --- honest exit codes ---------------------------------------------------------------------------


def test_sigterm_on_a_plain_run_logs_the_code_it_exits_with(serve: Serve, tmp_path: Path) -> None:
    """A plain ``run`` stopped by SIGTERM while a project is still polling exits 0, and its
    last line, ``daemon_stopped``, says 0 too."""
    server = serve(QUICK)
    (pid,) = server.simulator.create_projects(Kind.IMAGE, 1, SLOW)
    env = clean_env(**watcher_env(server, tmp_path, projects=pid, log_format="json"))
    daemon = subprocess.Popen(
        [*WATCHER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for("a poll", lambda: any(e.what == "get" for e in server.simulator.events()))
    daemon.send_signal(signal.SIGTERM)
    out, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    last = json_lines(out)[-1]
    assert last["event"] == "daemon_stopped"
    assert last["exit_code"] == 0


def test_until_done_decides_over_the_projects_of_this_run(serve: Serve, tmp_path: Path) -> None:
    """A project that ended ``not_found`` in an earlier run does not fail a later
    ``run --until-done`` whose own projects were all saved; ``--judge all`` counts it."""
    server = serve(QUICK)
    env = clean_env(**watcher_env(server, tmp_path, log_format="json"))
    old = run(["run", "--until-done"], dict(env, WATCHER_PROJECTS="image:doesnotexist1"))
    assert old.returncode == 1  # this run's project was not found

    (pid,) = server.simulator.create_projects(
        Kind.AUDIO, 1, ProjectOverrides(status=RemoteStatus.COMPLETE)
    )
    assert run(["track", f"audio:{pid}"], env).returncode == 0
    later = run(["run", "--until-done"], env)
    assert later.returncode == 0, later.stdout[-2000:]
    last = json_lines(later.stdout)[-1]
    assert last["event"] == "daemon_stopped"
    assert last["exit_code"] == 0
    assert last["projects_saved"] == 1
    assert "projects_not_found" not in last

    everything = run(["run", "--until-done", "--judge", "all"], env)  # a fleet's finisher
    assert everything.returncode == 1
    assert json_lines(everything.stdout)[-1]["projects_not_found"] == 1


# --- status edges --------------------------------------------------------------------------------


def test_status_limit_below_one_is_a_usage_error(tmp_path: Path) -> None:
    """``status --limit 0`` exits 2 with one line and no traceback."""
    env = clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}")
    assert run(["track", "abc123"], env).returncode == 0
    for bad in ("0", "-3"):
        result = run(["status", "--limit", bad], env)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert "--limit" in result.stderr


def test_status_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    """``watcher status | head -1``: a reader that goes away early ends the command with
    status 141 and nothing on stderr."""
    env = clean_env(WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}")
    assert run(["track", *(f"proj{i:04d}" for i in range(50))], env).returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before a byte is written
    try:
        result = subprocess.run(
            [*WATCHER, "status"],
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr.decode() == ""
    assert result.returncode == 141


def test_simulate_into_a_closed_pipe_ends_quietly() -> None:
    """``watcher simulate | head -1`` once the reader is gone: status 141, not a port error."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*WATCHER, "simulate", "--port", "0", "--image", "1"],
            env=clean_env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr.decode() == ""
    assert result.returncode == 141


# --- ports in use --------------------------------------------------------------------------------


def test_simulate_on_a_port_in_use_says_so_in_one_line(taken_port: int) -> None:
    """``watcher simulate --port`` on a port someone else holds: one line, exit 2."""
    result = run(["simulate", "--port", str(taken_port)], clean_env())
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"127.0.0.1:{taken_port}" in line


def test_run_on_a_port_in_use_says_so_in_one_line(taken_port: int, tmp_path: Path) -> None:
    """``watcher run`` whose HTTP port is taken: one line naming the variable, exit 2."""
    env = clean_env(
        WATCHER_API_TOKEN=TOKEN_A,
        WATCHER_HTTP_PORT=str(taken_port),
        WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}",
    )
    result = run(["run"], env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "WATCHER_HTTP_PORT" in line


# --- secrets from files: SIGHUP and 401 -----------------------------------------------------------


def rotating_daemon(
    serve: Serve, tmp_path: Path
) -> tuple[Simulator, Path, subprocess.Popen[bytes], Path]:
    """A daemon polling one slow project, its API token read from a file the test rotates."""
    server = serve(SimConfig(seed=2, token=TOKEN_A, error_rate=0, cancel_rate=0))
    sim = server.simulator
    (pid,) = sim.create_projects(Kind.IMAGE, 1, SLOW)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_A + "\n")
    env = clean_env(**watcher_env(server, tmp_path, projects=pid, log_format="json"))
    del env["WATCHER_API_TOKEN"]
    env["WATCHER_API_TOKEN_FILE"] = str(token_file)
    log = tmp_path / "daemon.log"
    daemon = spawn([*WATCHER, "run"], env, log)
    wait_for("a good poll", lambda: any(e.status_code == 200 for e in sim.events()))
    return sim, token_file, daemon, log


def logged(log: Path) -> list[dict[str, Any]]:
    return json_lines(log.read_text())


def test_sighup_rereads_the_token_file_and_keeps_running(serve: Serve, tmp_path: Path) -> None:
    """SIGHUP makes the daemon read ``WATCHER_API_TOKEN_FILE`` again: it logs which secret
    changed, keeps running, and polls with the new token (the API never refuses it)."""
    sim, token_file, daemon, log = rotating_daemon(serve, tmp_path)
    try:
        token_file.write_text(TOKEN_B + "\n")
        daemon.send_signal(signal.SIGHUP)
        wait_for(
            "secrets_reloaded", lambda: any(e["event"] == "secrets_reloaded" for e in logged(log))
        )
        sim.set_token(TOKEN_B)
        switched = max(e.seq for e in sim.events())
        wait_for(
            "a poll with the new token",
            lambda: any(e.seq > switched and e.status_code == 200 for e in sim.events()),
        )
        assert daemon.poll() is None
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    (reloaded,) = [e for e in logged(log) if e["event"] == "secrets_reloaded"]
    assert reloaded["trigger"] == "SIGHUP"
    assert reloaded["changed"] == ["WATCHER_API_TOKEN_FILE"]
    assert not [e for e in sim.events() if e.status_code == 401]
    text = log.read_text()
    assert TOKEN_A not in text
    assert TOKEN_B not in text


def test_a_401_rereads_the_token_file_and_retries_at_once(serve: Serve, tmp_path: Path) -> None:
    """A token rotated in its file without a signal: the first 401 makes the daemon read the
    file again and retry with the new token, instead of pausing polling for minutes."""
    sim, token_file, daemon, log = rotating_daemon(serve, tmp_path)
    try:
        token_file.write_text(TOKEN_B + "\n")
        sim.set_token(TOKEN_B)
        wait_for("a 401", lambda: any(e.status_code == 401 for e in sim.events()))
        refused = min(e.seq for e in sim.events() if e.status_code == 401)
        wait_for(
            "a poll with the new token",
            lambda: any(e.seq > refused and e.status_code == 200 for e in sim.events()),
        )
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    events = logged(log)
    assert [e["trigger"] for e in events if e["event"] == "secrets_reloaded"] == ["unauthorized"]
    assert not [e for e in events if e["event"] == "api_unauthorized"]
    text = log.read_text()
    assert TOKEN_A not in text
    assert TOKEN_B not in text


def test_sighup_with_a_fixed_token_ends_the_refusal_at_once(serve: Serve, tmp_path: Path) -> None:
    """A token refused from the start stops polling; writing the right one to the file and
    sending SIGHUP makes the daemon poll every project again at once, not at the next recheck
    five minutes later."""
    server = serve(SimConfig(seed=3, token=TOKEN_B, error_rate=0, cancel_rate=0))
    sim = server.simulator
    ids = sim.create_projects(Kind.IMAGE, 2, SLOW)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_A + "\n")
    env = clean_env(**watcher_env(server, tmp_path, projects=" ".join(ids), log_format="json"))
    del env["WATCHER_API_TOKEN"]
    env["WATCHER_API_TOKEN_FILE"] = str(token_file)
    log = tmp_path / "daemon.log"
    daemon = spawn([*WATCHER, "run"], env, log)
    try:
        wait_for(
            "api_unauthorized", lambda: any(e["event"] == "api_unauthorized" for e in logged(log))
        )
        token_file.write_text(TOKEN_B + "\n")
        daemon.send_signal(signal.SIGHUP)
        wait_for(
            "a good poll of every project",
            lambda: {e.project_id for e in sim.events() if e.status_code == 200} == set(ids),
        )
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    events = [e["event"] for e in logged(log)]
    assert "api_recovered" in events
    assert events[-1] == "daemon_stopped"
