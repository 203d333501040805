"""``watcher run`` with a malformed token stops at once with status 2 and one line naming the
variable, instead of retrying every API call forever or crashing every project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOKEN = "mhk_live_e2eSECRETe2eSECRET"


def run_watcher(tmp_path: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(
        WATCHER_API_BASE_URL="http://127.0.0.1:9",
        WATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'watcher.db'}",
        WATCHER_DOWNLOAD_DIR=str(tmp_path / "downloads"),
        WATCHER_HTTP_ENABLED="false",
        **variables,
    )
    return subprocess.run(
        [sys.executable, "-m", "watcher", "run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(f"{TOKEN}\n", "ends with a line break"), (f"{TOKEN}é", "printable ASCII")],
)
def test_a_malformed_token_is_a_settings_error(tmp_path: Path, value: str, fragment: str) -> None:
    """Exit 2, one line on stderr starting with the variable, the token not shown."""
    result = run_watcher(tmp_path, WATCHER_API_TOKEN=value)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("watcher: WATCHER_API_TOKEN: ")
    assert fragment in lines[0]
    assert "SECRET" not in result.stderr + result.stdout


def test_a_secret_file_keeps_its_token_without_the_newline(tmp_path: Path) -> None:
    """The Kubernetes Secret file form: the trailing newline is stripped and the daemon runs;
    a malformed token in the file is refused naming the ``_FILE`` variable."""
    secret = tmp_path / "token"
    secret.write_text(f"{TOKEN}\n", "utf-8")
    ran = run_watcher(tmp_path, "--until-done", WATCHER_API_TOKEN_FILE=str(secret))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    secret.write_text(f"{TOKEN}é\n", "utf-8")
    refused = run_watcher(tmp_path, WATCHER_API_TOKEN_FILE=str(secret))
    assert refused.returncode == 2
    assert refused.stderr.startswith("watcher: WATCHER_API_TOKEN_FILE: ")
    assert "SECRET" not in refused.stderr
