"""End to end into object storage: ``watcher run`` as a subprocess against the simulator (with
download faults) and moto's S3 server on 127.0.0.1, SIGKILLed while an upload is in flight,
then run to the end; the bucket is judged with boto3, an independent client."""

from __future__ import annotations

import hashlib
import itertools
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.test_chaos import assert_no_delete_before_download
from tests.e2e.test_chaos import env_for as chaos_env
from tests.e2e.test_shutdown import BIG as BIG_OUTPUT
from tests.e2e.test_shutdown import big_project, events, start
from tests.s3 import SECRET_KEY, S3Server
from tests.support import run_watcher, spawn, watcher_status
from watcher.models import Kind
from watcher.simulator.config import Faults, SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator

Serve = Callable[..., SimulatorServer]
WATCHER = [sys.executable, "-m", "watcher"]
_names = itertools.count()

BIG = SimConfig(
    seed=77,
    queued_seconds=(0.05, 0.3),
    rendering_seconds=(0.1, 0.5),
    error_rate=0.0,
    cancel_rate=0.0,
    output_bytes=(3_000_000, 12_000_000),
    faults=Faults(rate_reset=0.1, rate_truncate=0.1),
)


def env_for(
    server: SimulatorServer, root: Path, s3: S3Server, url: str, projects: str
) -> dict[str, str]:
    """The chaos test's environment, with outputs to ``url`` on moto."""
    env = {k: v for k, v in chaos_env(server, root, projects).items() if not k.startswith("AWS_")}
    return {
        **env,
        **s3.env(),
        "WATCHER_STORAGE_URL": url,
        "WATCHER_STORAGE_ALLOW_HTTP": "true",
    }


def wait_for_an_upload_in_flight(s3: S3Server, bucket: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not s3.unfinished_uploads(bucket):
        assert time.monotonic() < deadline, "no upload began: the kill cannot hit one"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_mid_upload_loses_nothing_and_leaves_nothing_partial(
    serve: Serve, tmp_path: Path, s3_server: S3Server
) -> None:
    """Killed twice while an upload is in flight, then run to the end: every output is in the
    bucket once under its final key, whole, its sha256 on it and in the store; nothing partial
    is visible, nothing is left under .parts/, every project was deleted only after its
    outputs were confirmed, and no credential was ever logged."""
    server = serve(BIG)
    sim = server.simulator
    specs = [f"video:{p}" for p in sim.create_projects(Kind.VIDEO, 6)]
    bucket = f"e2e-{next(_names)}"
    s3_server.create_bucket(bucket)
    env = env_for(server, tmp_path, s3_server, f"s3://{bucket}/media", " ".join(specs))
    transcripts: list[str] = []
    left_by_kills: set[str] = set()
    for run in range(2):
        log = tmp_path / f"run{run}.log"
        daemon = spawn([*WATCHER, "run"], env, log)
        wait_for_an_upload_in_flight(s3_server, bucket, within=30)
        daemon.send_signal(signal.SIGKILL)
        assert daemon.wait(timeout=10) == -signal.SIGKILL
        transcripts.append(log.read_text())
        left_by_kills |= set(s3_server.unfinished_uploads(bucket))
        # Whatever is visible after a kill is whole: every object under a final key is an
        # output, byte for byte.
        assert_final_objects_are_whole(s3_server, bucket, sim)

    final = run_watcher(["run", "--until-done"], env, timeout=90)
    transcripts += [final.stdout, final.stderr]
    assert final.returncode == 0, final.stderr[-2000:]
    status = watcher_status(env, limit=100)
    objects = s3_server.objects(bucket)
    expected: dict[str, str] = {}
    for project in status["projects"]:
        assert project["state"] == "deleted", project
        truth = sim.truth(project["id"])
        assert len(project["outputs"]) == len(truth.outputs)
        for output, out in zip(project["outputs"], truth.outputs, strict=True):
            key = f"media/{output['path']}"
            assert output["url"] == f"s3://{bucket}/{key}"
            assert output["sha256"] == out.sha256
            expected[key] = out.sha256
    assert {k: hashlib.sha256(v).hexdigest() for k, v in objects.items()} == expected
    for key, digest in expected.items():
        assert s3_server.metadata(bucket, key)["sha256"] == digest
    # The last run finished cleanly: it left no upload open of its own.
    assert set(s3_server.unfinished_uploads(bucket)) <= left_by_kills
    assert not (tmp_path / "downloads").exists()
    assert_no_delete_before_download(sim)
    for text in transcripts:
        assert SECRET_KEY not in text
    names = {json.loads(line)["event"] for t in transcripts for line in t.splitlines() if line}
    assert "download_saved" in names


def assert_final_objects_are_whole(s3: S3Server, bucket: str, sim: Simulator) -> None:
    """Every object under a final key is an output, byte for byte."""
    for key, data in s3.objects(bucket).items():
        assert not key.startswith("media/.parts/") or key.endswith(".part"), key
        if key.startswith("media/.parts/"):
            continue
        _, _kind, pid, name = key.split("/")
        index = int(name.split("-", 1)[0])
        truth = sim.truth(pid).outputs[index]
        assert hashlib.sha256(data).hexdigest() == truth.sha256, key


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_mid_upload_aborts_it_and_the_restart_saves_the_output(
    serve: Serve, tmp_path: Path, s3_server: S3Server
) -> None:
    """A graceful stop with no grace left cancels the upload in flight and aborts it: exit 0,
    no multipart upload left open, nothing under the final key; the next run saves the output
    whole."""
    bucket = f"e2e-{next(_names)}"
    s3_server.create_bucket(bucket)
    url = f"s3://{bucket}/media"
    server, pid, env = big_project(
        serve, tmp_path, shutdown_grace="0", storage_url=url, storage_allow_http="true"
    )
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")} | s3_server.env()
    daemon = start(env)
    wait_for_an_upload_in_flight(s3_server, bucket, within=30)
    daemon.send_signal(signal.SIGTERM)
    out, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    assert "shutdown_cancelled_work" in events(out)
    assert s3_server.unfinished_uploads(bucket) == []
    assert not [k for k in s3_server.objects(bucket) if k.startswith(f"media/video/{pid}/")], out

    finish = run_watcher(["run", "--until-done"], env, timeout=90)
    assert finish.returncode == 0, finish.stderr[-2000:]
    (data,) = s3_server.objects(bucket).values()
    assert len(data) == BIG_OUTPUT
    assert hashlib.sha256(data).hexdigest() == server.simulator.expected_sha256(pid, 0)
    assert s3_server.unfinished_uploads(bucket) == []
