"""``watcher demo``: the whole product in one command, with no account and no setup.

It serves the simulator on 127.0.0.1, creates a handful of image, video and audio projects
(some of which the simulator will fail or cancel, as the real API does), runs the daemon on a
fresh SQLite file until every project is final, then prints where each output was saved and
checks every byte against what the simulator served.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from pathlib import Path

from watcher import logs
from watcher.models import Kind, RemoteStatus, State
from watcher.settings import load_settings
from watcher.simulator import SimConfig, Simulator, SimulatorServer
from watcher.simulator.timeline import ProjectOverrides
from watcher.store import create_store
from watcher.table import render_table
from watcher.wiring import build, run_daemon

# What the demo asks the simulator for: (kind, forced final status or None for a seeded draw).
DEMO_PROJECTS = [
    *[(Kind.IMAGE, RemoteStatus.COMPLETE)] * 3,
    (Kind.IMAGE, RemoteStatus.ERROR),
    (Kind.VIDEO, RemoteStatus.COMPLETE),
    (Kind.VIDEO, RemoteStatus.CANCELED),
    *[(Kind.AUDIO, RemoteStatus.COMPLETE)] * 2,
]
EXPECTED = {
    RemoteStatus.COMPLETE: State.DELETED,
    RemoteStatus.ERROR: State.ERROR,
    RemoteStatus.CANCELED: State.CANCELED,
}


def run_demo(directory: str | None = None, seed: int = 7) -> int:
    """Run the demo; 0 if every project ended as the simulator decided and every file matches."""
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="watcher-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    config = SimConfig(
        seed=seed,
        queued_seconds=(0.3, 1.5),
        rendering_seconds=(0.5, 3.0),
        output_bytes=(20_000, 400_000),
    )
    simulator = Simulator(config)
    with SimulatorServer(simulator) as server:
        ids = {
            pid: kind
            for kind, status in DEMO_PROJECTS
            for pid in simulator.create_projects(kind, 1, ProjectOverrides(status=status))
        }
        settings = load_settings(
            {
                "WATCHER_API_TOKEN": config.token,
                "WATCHER_API_BASE_URL": server.base_url,
                "WATCHER_PROJECTS": " ".join(f"{k.value}:{pid}" for pid, k in ids.items()),
                "WATCHER_DATABASE_URL": f"sqlite:///{root / 'watcher.db'}",
                "WATCHER_DOWNLOAD_DIR": str(root / "downloads"),
                "WATCHER_DELETE_AFTER_DOWNLOAD": "true",
                "WATCHER_POLL_INITIAL": "0.3",
                "WATCHER_POLL_MAX": "2",
                "WATCHER_LOG_FORMAT": "console",
                "WATCHER_HTTP_ENABLED": "false",
                "WATCHER_SHUTDOWN_GRACE": "5",
            }
        )
        logs.register_secret(config.token)
        logs.configure(settings.log_level, settings.log_format)
        print(f"simulator at {server.base_url}; watching {len(ids)} projects in {root}\n")
        store = create_store(settings.database_url, exclusive=True)
        asyncio.run(run_daemon(build(settings, store, until_done=True)))
        return asyncio.run(_report(settings.database_url, root / "downloads", simulator))


async def _report(database_url: str, download_dir: Path, simulator: Simulator) -> int:
    problems: list[str] = []
    async with create_store(database_url) as store:
        counts = await store.count_by_state()
        page = await store.list_projects(limit=1000)
        rows = [(p, await store.outputs(p.id)) for p in page.projects]
    print("\n" + render_table(counts, rows) + "\n")
    print(f"saved files (under {download_dir}):")
    for project, outputs in rows:
        truth = simulator.truth(project.id)
        if EXPECTED.get(truth.timeline.final_status) != project.state:
            problems.append(
                f"{project.id} ended {project.state}, expected {truth.timeline.final_status}"
            )
        for output in outputs:
            path = download_dir / output.path
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            ok = digest == simulator.expected_sha256(project.id, output.index)
            if not ok:
                problems.append(f"{path} does not match what the simulator served")
            print(f"  {'ok ' if ok else 'BAD'} {path}  {output.bytes} bytes  sha256 {digest}")
    for line in problems:
        print(f"problem: {line}")
    print("\ndemo finished: " + ("every output saved and verified" if not problems else "FAILED"))
    return 0 if not problems else 1
