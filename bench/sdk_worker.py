"""The official SDK's way of waiting for many projects, as the baseline of the bench.

Run by the bench as ``python bench/sdk_worker.py BASE_URL TOKEN IDS_FILE DOWNLOAD_DIR``: one
``AsyncClient`` and, for every id in ``IDS_FILE`` (one per line), one task running
``client.v1.image_projects.check_result(id, wait_for_completion=True, download_outputs=True,
download_directory=DOWNLOAD_DIR/<id>)``, all under one ``asyncio.gather``. The poll interval is
the SDK's default (``MAGIC_HOUR_POLL_INTERVAL`` unset: 0.5 s).

Each project gets its own folder: the SDK names a file after its URL's last path segment, so in
one shared folder every project's ``output.png`` would overwrite the previous one.

Prints one JSON line: ``{"ok": n, "failed": n, "errors": [...]}``; exits 1 if any task failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from magic_hour import AsyncClient


async def wait_for_all(base_url: str, token: str, ids: list[str], root: Path) -> list[str]:
    """Run ``check_result`` for every id at once; return the errors (empty if all succeeded)."""
    client = AsyncClient(token=token, base_url=base_url)

    async def one(project_id: str) -> None:
        folder = root / project_id
        folder.mkdir(parents=True, exist_ok=True)
        await client.v1.image_projects.check_result(
            project_id,
            wait_for_completion=True,
            download_outputs=True,
            download_directory=str(folder),
        )

    results = await asyncio.gather(*(one(pid) for pid in ids), return_exceptions=True)
    return [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]


def main() -> int:
    """Entry point."""
    base_url, token, ids_file, download_dir = sys.argv[1:5]
    ids = Path(ids_file).read_text().split()
    errors = asyncio.run(wait_for_all(base_url, token, ids, Path(download_dir)))
    print(json.dumps({"ok": len(ids) - len(errors), "failed": len(errors), "errors": errors[:5]}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
