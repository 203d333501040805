"""The receive loop (:mod:`watcher.receive`) against a real server on 127.0.0.1 through the
watcher's HTTP stack: a gzip bomb (a small body that inflates a thousandfold) is saved whole,
to disk and to object storage, in bounded memory.

Memory is Python's as traced by ``tracemalloc``, so the S3 endpoint here is moto's server in a
process of its own (in this one, its copy of the object would be traced too)."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.integration.http_support import free_port
from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY
from watcher.downloader import Downloader
from watcher.objects import ObjectInfo, Uploader, open_bucket, parse_storage_url, upload_key
from watcher.settings import load_settings
from watcher.transport import http_client

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
INFLATED = 96 * MIB  # of zeros: about 96 KiB gzipped, so each read inflates to tens of MiB
# What the receive path may hold at once (traced Python memory): a few batches of 1 MiB, the
# upload's queue of them. Each read inflated whole would be tens of MiB.
BOUND = 24 * MIB


def gzip_bomb() -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(MIB)
    return b"".join(z.compress(block) for _ in range(INFLATED // MIB)) + z.flush()


BOMB = gzip_bomb()
SETTINGS = load_settings({"WATCHER_API_TOKEN": "mhk_live_ReceiveTestToken0042"})
SHA = hashlib.sha256(bytes(INFLATED)).hexdigest()


@pytest.fixture
def s3_apart(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server in a process of its own, a bucket in it; the AWS variables set."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        _create_bucket(endpoint, "bucket")
        yield "s3://bucket/media"
    finally:
        server.terminate()
        server.wait()


def _create_bucket(endpoint: str, name: str) -> None:
    import boto3  # noqa: PLC0415 - only this test's fixture needs it

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    for _ in range(200):  # until the server listens (a few seconds at most)
        try:
            client.create_bucket(Bucket=name)
        except Exception:  # noqa: BLE001 - not up yet: connection refused
            time.sleep(0.05)
        else:
            return
    raise AssertionError("moto's server did not start")


@asynccontextmanager
async def cdn() -> AsyncIterator[str]:
    """A server that answers every GET with the bomb, gzip-encoded although asked for identity."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-type: video/mp4\r\n"
            + f"content-length: {len(BOMB)}\r\nconnection: close\r\n\r\n".encode()
            + BOMB
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/output.mp4?sig=1"
    finally:
        server.close()
        await server.wait_closed()


class Peak:
    """The peak of traced memory up to the moment the output is verified."""

    value = 0

    async def on_verified(self, size: int, sha256: str) -> None:
        self.value = tracemalloc.get_traced_memory()[1]
        assert (size, sha256) == (INFLATED, SHA)


async def test_a_gzip_bomb_is_written_to_disk_in_bounded_memory(tmp_path: Path) -> None:
    """The disk path inflates the bomb in pieces: the file is whole, memory stays bounded."""
    final = tmp_path / "0-output.mp4"
    peak = Peak()
    async with cdn() as url, http_client(SETTINGS) as http:
        tracemalloc.start()
        try:
            await Downloader(http).fetch(url, final, peak.on_verified)
        finally:
            tracemalloc.stop()
    assert final.stat().st_size == INFLATED
    assert 0 < peak.value < BOUND


async def test_a_gzip_bomb_is_uploaded_in_bounded_memory(s3_apart: str) -> None:
    """The object-storage path inflates the bomb in pieces too (it once joined all that one
    read inflated to): the object is whole, memory stays bounded."""
    bucket = open_bucket(parse_storage_url(s3_apart), allow_http=True, timeout=10)
    bucket.part_size = 5 * MIB  # S3's smallest part: obstore holds at most two at once
    rel = "video/cm1/0-output.mp4"
    peak = Peak()
    async with cdn() as url, http_client(SETTINGS) as http:
        tracemalloc.start()
        try:
            saved = await Uploader(http, bucket).upload(url, rel, upload_key(rel), peak.on_verified)
        finally:
            tracemalloc.stop()
    assert (saved.size, saved.sha256) == (INFLATED, SHA)
    assert (await bucket.info(rel)) == ObjectInfo(INFLATED, SHA)
    assert 0 < peak.value < BOUND
