"""The daemon in-process with outputs to object storage: the real simulator over HTTP, real
SQLite, a real S3 endpoint (moto on 127.0.0.1), the bucket judged with boto3."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.s3 import S3Server, sha256
from tests.support import FAST, watcher_settings
from watcher.metrics import Metrics
from watcher.models import Kind, RemoteStatus, State
from watcher.settings import Settings
from watcher.simulator.config import Faults
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator
from watcher.store import OutputState, SQLiteStore
from watcher.wiring import build

pytestmark = pytest.mark.anyio

Serve = Callable[..., SimulatorServer]
_names = itertools.count()

CONFIG = dataclasses.replace(FAST, seed=3, cancel_rate=0.0, output_bytes=(1_000, 80_000))


def fresh_bucket(s3: S3Server) -> str:
    name = f"daemon-{next(_names)}"
    s3.create_bucket(name)
    return name


def bucket_settings(server: SimulatorServer, root: Path, url: str, **extra: str) -> Settings:
    """Settings of an in-process daemon watching ``server`` that saves outputs to ``url``."""
    return watcher_settings(server, root, storage_url=url, storage_allow_http="true", **extra)


def assert_bucket_holds_exactly(
    s3: S3Server, bucket: str, prefix: str, sim: Simulator, saved: list[tuple[str, str]]
) -> None:
    """The bucket holds every output of the saved projects once, whole, with its sha256 as
    metadata, and nothing else: no temporary object, no open multipart upload."""
    objects = s3.objects(bucket)
    expected: dict[str, str] = {}
    for kind, pid in saved:
        for out in sim.truth(pid).outputs:
            (key,) = [k for k in objects if k.startswith(f"{prefix}/{kind}/{pid}/{out.index}-")]
            expected[key] = out.sha256
    assert {k: sha256(v) for k, v in objects.items()} == expected
    for key, digest in expected.items():
        assert s3.metadata(bucket, key)["sha256"] == digest
    assert s3.unfinished_uploads(bucket) == []


async def test_projects_end_with_every_output_in_the_bucket(
    serve: Serve, tmp_path: Path, s3_env: S3Server
) -> None:
    """Thirty projects with faulty downloads end as the simulator decided; every output of the
    deleted ones is in the bucket, verified, and nothing is written to the download folder."""
    server = serve(dataclasses.replace(CONFIG, faults=Faults(rate_reset=0.1, rate_truncate=0.1)))
    sim = server.simulator
    specs = [f"video:{p}" for p in sim.create_projects(Kind.VIDEO, 10)]
    specs += [f"image:{p}" for p in sim.create_projects(Kind.IMAGE, 20)]
    bucket = fresh_bucket(s3_env)
    settings = bucket_settings(
        server,
        tmp_path,
        f"s3://{bucket}/media",
        projects=" ".join(specs),
        delete_after_download="true",
    )
    store = SQLiteStore(str(tmp_path / "watcher.db"), exclusive=True)
    with capture_logs() as logs:
        outcome = await asyncio.wait_for(build(settings, store, until_done=True).run(), 90)
    saved: list[tuple[str, str]] = []
    async with SQLiteStore(str(tmp_path / "watcher.db")) as reader:
        page = await reader.list_projects(limit=100)
        for p in page.projects:
            final = sim.truth(p.id).timeline.final_status
            assert p.state == (State.DELETED if final == RemoteStatus.COMPLETE else State.ERROR)
            if p.state == State.DELETED:
                saved.append((p.kind.value, p.id))
                rows = await reader.outputs(p.id)
                assert all(o.state == OutputState.SAVED and o.upload_key is None for o in rows)
    assert outcome.exit_code == (0 if len(saved) == len(specs) else 1)
    assert len(saved) > 20
    assert_bucket_holds_exactly(s3_env, bucket, "media", sim, saved)
    assert not (tmp_path / "downloads").exists()
    events = Counter(entry["event"] for entry in logs)
    assert events["download_saved"] == sum(len(sim.truth(pid).outputs) for _, pid in saved)


async def test_a_missing_bucket_stops_the_start_before_any_claim(
    serve: Serve, tmp_path: Path, s3_env: S3Server
) -> None:
    """A bucket that does not exist is a ConfigError at start-up: no project is polled."""
    from watcher.errors import ConfigError  # noqa: PLC0415

    server = serve(CONFIG)
    sim = server.simulator
    specs = [f"image:{p}" for p in sim.create_projects(Kind.IMAGE, 2)]
    settings = bucket_settings(
        server, tmp_path, "s3://absent-bucket/media", projects=" ".join(specs)
    )
    store = SQLiteStore(str(tmp_path / "watcher.db"), exclusive=True)
    with pytest.raises(ConfigError, match="absent-bucket"):
        await asyncio.wait_for(build(settings, store, until_done=True).run(), 30)
    assert [e for e in sim.events() if e.what == "get"] == []


CRASH_POINTS = {
    # What the store and the bucket hold after a kill -9 at each step of the order of writes,
    # and whether the output must be fetched from the CDN again.
    "after the temporary upload completed, before verified": ("pending", "temp", True),
    "after verified, before the final object": ("verified", "temp", False),
    "after the final object, before the temporary one was deleted": (
        "verified",
        "temp+final",
        False,
    ),
    "after the temporary object was deleted, before saved": ("verified", "final", False),
    "after verified, with a temporary object that does not match": ("verified", "corrupt", True),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
async def test_a_restart_after_a_crash_at_each_step_saves_every_output_once(
    serve: Serve, tmp_path: Path, s3_env: S3Server, point: str
) -> None:
    """The durable state a kill -9 leaves at each step of the order of writes is finished by
    the next run: the bucket ends with the output once, verified, nothing under .parts/, and
    the CDN is asked again only where no verified copy survived."""
    state, bucket_holds, refetch = CRASH_POINTS[point]
    server = serve(dataclasses.replace(CONFIG, error_rate=0.0))
    sim = server.simulator
    (pid,) = sim.create_projects(Kind.IMAGE, 1)
    bucket = fresh_bucket(s3_env)
    settings = bucket_settings(server, tmp_path, f"s3://{bucket}/media", projects=f"image:{pid}")
    db = str(tmp_path / "watcher.db")
    first = await asyncio.wait_for(build(settings, SQLiteStore(db), until_done=True).run(), 60)
    assert first.exit_code == 0
    (final,) = [k for k in s3_env.objects(bucket) if k.startswith(f"media/image/{pid}/0-")]
    temp = f"media/.parts/{final.removeprefix('media/')}.0123abcd.part"
    c = s3_env.client()
    if "temp" in bucket_holds:
        c.copy_object(Bucket=bucket, Key=temp, CopySource={"Bucket": bucket, "Key": final})
    if bucket_holds == "corrupt":
        c.put_object(Bucket=bucket, Key=temp, Body=b"not the output")
    if "final" not in bucket_holds:
        c.delete_object(Bucket=bucket, Key=final)
    with sqlite3.connect(db) as conn:  # the store as the crash left it
        conn.execute(
            "UPDATE projects SET state = 'downloading', due_at = 0, finished_at = NULL "
            "WHERE id = ?",
            (pid,),
        )
        conn.execute(
            "UPDATE outputs SET state = ?, saved_at = NULL, upload_key = ? "
            "WHERE project_id = ? AND idx = 0",
            (state, temp.removeprefix("media/"), pid),
        )
        if state == "pending":
            conn.execute(
                "UPDATE outputs SET bytes = NULL, sha256 = NULL WHERE project_id = ? AND idx = 0",
                (pid,),
            )
    fetched = Counter(e.index for e in sim.events() if e.what == "download" and e.completed)
    second = await asyncio.wait_for(build(settings, SQLiteStore(db), until_done=True).run(), 60)
    assert second.exit_code == 0
    again = Counter(e.index for e in sim.events() if e.what == "download" and e.completed)
    assert again[0] - fetched[0] == (1 if refetch else 0)
    assert sum(again.values()) - sum(fetched.values()) == (1 if refetch else 0)
    assert_bucket_holds_exactly(s3_env, bucket, "media", sim, [("image", pid)])


async def test_a_saved_output_is_never_uploaded_again(
    serve: Serve, tmp_path: Path, s3_env: S3Server
) -> None:
    """A restart after every output is saved fetches and uploads nothing."""
    server = serve(dataclasses.replace(CONFIG, error_rate=0.0))
    sim = server.simulator
    specs = [f"image:{p}" for p in sim.create_projects(Kind.IMAGE, 3)]
    bucket = fresh_bucket(s3_env)
    settings = bucket_settings(server, tmp_path, f"s3://{bucket}/media", projects=" ".join(specs))
    db = str(tmp_path / "watcher.db")
    await asyncio.wait_for(build(settings, SQLiteStore(db), until_done=True).run(), 60)
    before = s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]
    downloads = len([e for e in sim.events() if e.what == "download"])
    metrics = Metrics()
    again = build(settings, SQLiteStore(db), until_done=True, metrics=metrics)
    assert (await asyncio.wait_for(again.run(), 60)).exit_code == 0
    after = s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [(o["Key"], o["LastModified"]) for o in after] == [
        (o["Key"], o["LastModified"]) for o in before
    ]
    assert len([e for e in sim.events() if e.what == "download"]) == downloads
    assert metrics.upload_bytes._value.get() == 0
