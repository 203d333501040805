"""What the scenarios share: the clients' command lines and environments, the watcher's setting
profiles, and hashing files on disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.sim import SimProcess

WATCHER_PREFIX = "WATCHER_"
SDK_PREFIX = "MAGIC_HOUR_"
HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Profile:
    """A set of ``WATCHER_*`` settings the bench runs the watcher with (beyond the fixed ones)."""

    name: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``watcher (name)``."""
        return f"watcher ({self.name})"

    def describe(self) -> str:
        """The settings as ``KEY=value`` pairs, or ``defaults``."""
        if not self.env:
            return "defaults"
        return ", ".join(f"{k.removeprefix(WATCHER_PREFIX)}={v}" for k, v in self.env.items())


# "defaults": the watcher as shipped. "tuned": what the fleet targets need from settings alone;
# see RESULTS.md for why each value.
PROFILES: dict[str, Profile] = {
    "defaults": Profile("defaults"),
    "tuned": Profile(
        "tuned",
        {
            # Inside the window polls back off from POLL_INITIAL to 1.4 x it, the lag bound:
            # p99 lag < 1.5 s needs POLL_INITIAL <= 1.5 / 1.4 (1.4 before the backoff).
            "WATCHER_POLL_INITIAL": "1",
            "WATCHER_MAX_REQUESTS_PER_SECOND": "1000",
        },
    ),
}

# Settings every watcher run of the bench gets: no control API (no port to collide with), only
# warnings logged (the bench reads the simulator, not the logs), JSON lines.
FIXED_WATCHER_ENV = {
    "WATCHER_HTTP_ENABLED": "false",
    "WATCHER_LOG_LEVEL": "warning",
    "WATCHER_LOG_FORMAT": "json",
}


def base_env() -> dict[str, str]:
    """This process's environment without any ``WATCHER_*`` or ``MAGIC_HOUR_*`` variable."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith((WATCHER_PREFIX, SDK_PREFIX))
    }


def watcher_env(
    sim: SimProcess,
    folder: Path,
    *,
    profile: Profile,
    projects: list[str] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a watcher run in ``folder`` (fresh SQLite file, downloads below it)."""
    env = base_env()
    env.update(FIXED_WATCHER_ENV)
    env.update(
        {
            "WATCHER_API_TOKEN": sim.token,
            "WATCHER_API_BASE_URL": sim.base_url,
            "WATCHER_DATABASE_URL": f"sqlite:///{database_path(folder)}",
            "WATCHER_DOWNLOAD_DIR": str(folder / "downloads"),
        }
    )
    if projects:
        env["WATCHER_PROJECTS"] = " ".join(f"image:{pid}" for pid in projects)
    env.update(profile.env)
    env.update(extra or {})
    return env


def database_path(folder: Path) -> Path:
    """The watcher's SQLite file in a run's folder (absolute)."""
    return (folder / "watcher.db").resolve()


def watcher_argv(*, until_done: bool) -> list[str]:
    """``python -m watcher run [--until-done]`` with this interpreter."""
    return [sys.executable, "-m", "watcher", "run", *(["--until-done"] if until_done else [])]


def fresh_folder(path: Path) -> Path:
    """An empty directory at ``path`` (removing what a previous run left)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digests(folder: Path) -> list[str]:
    """The SHA-256 of every finished file in ``folder`` (``.part`` files do not count)."""
    if not folder.is_dir():
        return []
    return [sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".part"]


def warning_lines(log: Path) -> int:
    """How many lines a watcher wrote at warning level or above (its log level is warning)."""
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text(errors="replace").splitlines() if line.strip())
