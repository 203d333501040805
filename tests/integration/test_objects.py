"""Uploads into a real S3 endpoint (moto's server on 127.0.0.1), judged with boto3: objects
appear whole and verified or not at all, and no multipart upload is left open."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import itertools
import threading
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.s3 import SECRET_KEY, S3Server, sha256
from watcher.errors import (
    ConfigError,
    DownloadIncomplete,
    DownloadUrlExpired,
    ObjectStorageError,
)
from watcher.objects import (
    Bucket,
    Uploader,
    check_storage,
    open_bucket,
    parse_storage_url,
    upload_key,
)

pytestmark = pytest.mark.anyio

_names = itertools.count()
REL = "video/cm1/0-out.mp4"


def body_of(size: int) -> bytes:
    return hashlib.sha256(str(size).encode()).digest() * (size // 32) + b"x" * (size % 32)


@pytest.fixture
def bucket(s3_env: S3Server) -> Bucket:
    """A fresh bucket under a prefix, opened through obstore."""
    name = f"bucket-{next(_names)}"
    s3_env.create_bucket(name)
    b = open_bucket(parse_storage_url(f"s3://{name}/media"), allow_http=True, timeout=10)
    b.part_size = 5 * 1024 * 1024  # S3's smallest part: several parts for a 12 MiB output
    return b


def cdn(body: bytes, *, length: int | None = None, status: int = 200) -> httpx.AsyncClient:
    """A client whose every GET is answered with ``body`` (a CDN that may lie about length)."""

    async def stream(request: httpx.Request) -> httpx.Response:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]
                await asyncio.sleep(0)

        headers = {"content-length": str(len(body) if length is None else length)}
        headers["content-type"] = "video/mp4"
        return httpx.Response(status, headers=headers, content=chunks())

    return httpx.AsyncClient(transport=httpx.MockTransport(stream))


async def test_an_output_is_uploaded_verified_under_its_final_key(
    bucket: Bucket, s3_env: S3Server
) -> None:
    """A 12 MiB body goes up in parts and ends under <prefix>/<kind>/<id>/<index>-<name> with
    its sha256 as metadata; the temporary object is gone and no upload is left open."""
    data = body_of(12 * 1024 * 1024 + 7)
    verified: list[tuple[int, str]] = []

    async def on_verified(size: int, digest: str) -> None:
        verified.append((size, digest))

    uploaded: list[int] = []
    async with cdn(data) as http:
        up = Uploader(http, bucket, on_bytes=uploaded.append)
        saved = await up.upload("https://cdn/x", REL, upload_key(REL), on_verified)
    name = bucket.location.bucket
    assert verified == [(len(data), sha256(data))]
    assert saved.url == f"s3://{name}/media/{REL}"
    assert s3_env.objects(name) == {f"media/{REL}": data}
    assert s3_env.metadata(name, f"media/{REL}") == {"sha256": sha256(data)}
    assert s3_env.unfinished_uploads(name) == []
    assert sum(uploaded) == 2 * len(data)  # into the temporary object, then the final one


@pytest.mark.parametrize("size", [6 * 1024 * 1024, 3000])
async def test_a_short_body_leaves_no_object_and_no_open_upload(
    bucket: Bucket, s3_env: S3Server, size: int
) -> None:
    """A body shorter than its Content-Length is refused: nothing appears, under the final key
    or the temporary one, and its multipart upload (or its single PUT) is never completed."""
    data = body_of(size)

    async def on_verified(size: int, digest: str) -> None:
        raise AssertionError("a short body is never verified")

    async with cdn(data, length=len(data) + 100) as http:
        with pytest.raises(DownloadIncomplete):
            await Uploader(http, bucket).upload("https://cdn/x", REL, upload_key(REL), on_verified)
    name = bucket.location.bucket
    assert s3_env.objects(name) == {}
    assert s3_env.unfinished_uploads(name) == []


async def test_a_refused_link_is_a_stale_url(bucket: Bucket) -> None:
    """A CDN that refuses the signed URL says so as DownloadUrlExpired (fresh URLs are fetched)."""

    async def on_verified(size: int, digest: str) -> None:
        raise AssertionError

    async with cdn(b"denied", status=403) as http:
        with pytest.raises(DownloadUrlExpired):
            await Uploader(http, bucket).upload("https://cdn/x", REL, upload_key(REL), on_verified)


async def test_a_cancelled_upload_is_aborted(bucket: Bucket, s3_env: S3Server) -> None:
    """An upload cancelled half-way (a shutdown) aborts its multipart upload: none left open."""
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * (1024 * 1024)
        started.set()
        await asyncio.sleep(3600)
        yield b""

    task = asyncio.ensure_future(
        bucket.upload(upload_key(REL), slow(), attributes={"Content-Type": "video/mp4"})
    )
    await started.wait()
    await asyncio.sleep(0.5)  # the first part is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    name = bucket.location.bucket
    assert s3_env.unfinished_uploads(name) == []
    assert s3_env.objects(name) == {}


async def test_a_verified_output_is_finished_from_its_temporary_object(
    bucket: Bucket, s3_env: S3Server
) -> None:
    """After a crash between verified and saved, finish() publishes the temporary object if it
    matches the record, accepts a confirmed final object, and refuses a wrong one."""
    data = body_of(3000)
    key = upload_key(REL)

    async def one() -> AsyncIterator[bytes]:
        yield data

    await bucket.upload(key, one(), attributes={})
    async with httpx.AsyncClient() as http:
        up = Uploader(http, bucket)
        assert not await up.finish(key, REL, len(data), "00" * 32)  # the digest does not match
        assert await up.finish(key, REL, len(data), sha256(data))
        name = bucket.location.bucket
        assert s3_env.objects(name) == {f"media/{REL}": data}
        assert await up.finish(key, REL, len(data), sha256(data))  # already published: as is
        assert not await up.finish(None, "video/cm1/1-other.mp4", 5, "00" * 32)
    assert s3_env.unfinished_uploads(name) == []


async def test_a_missing_bucket_is_one_clear_line(s3_env: S3Server) -> None:
    """A bucket that does not exist is a ConfigError of one line naming it, without secrets."""
    b = open_bucket(parse_storage_url("s3://no-such-bucket/p"), allow_http=True, timeout=5)
    with pytest.raises(ConfigError) as caught:
        await check_storage(b, "r1")
    message = str(caught.value)
    assert "\n" not in message
    assert "s3://no-such-bucket/p" in message
    assert "NoSuchBucket" in message
    assert SECRET_KEY not in message
    assert SECRET_KEY not in repr(b)


async def test_the_start_up_check_passes_on_a_writable_bucket(
    bucket: Bucket, s3_env: S3Server
) -> None:
    """A writable bucket passes the check, which leaves nothing behind."""
    await check_storage(bucket, "host-1")
    assert s3_env.objects(bucket.location.bucket) == {}


async def test_an_error_names_the_object_not_the_credentials(bucket: Bucket) -> None:
    """Reading a missing object through read() fails naming s3://bucket/key only."""
    with pytest.raises(ObjectStorageError) as caught:
        async for _ in bucket.read(".parts/nothing"):
            pass
    assert f"s3://{bucket.location.bucket}/media/.parts/nothing" in str(caught.value)
    assert SECRET_KEY not in str(caught.value)


class SlowDownProxy(http.server.ThreadingHTTPServer):
    """A proxy in front of moto on 127.0.0.1 that answers the first ``faults`` writes with S3's
    ``503 SlowDown`` and passes everything else through."""

    daemon_threads = True

    def __init__(self, upstream: str, faults: int) -> None:
        self.upstream = urlsplit(upstream)
        self.faults = faults
        self.refused = 0
        self.seen: list[str] = []  # "METHOD /path?query" of every request
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SlowDownProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        with self.server.lock:
            self.server.seen.append(f"{self.command} {self.path}")
            refuse = self.command in {"PUT", "POST"} and self.server.refused < self.server.faults
            self.server.refused += refuse
        if refuse:
            page = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
            self.send_response(503)
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname or "", up.port, timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        head = self.command == "HEAD"  # a HEAD's Content-Length is the object's, kept as is
        for name, value in answer.getheaders():
            if name.lower() not in {"transfer-encoding", "connection"} | (
                set() if head else {"content-length"}
            ):
                self.send_header(name, value)
        if not head:
            self.send_header("content-length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay  # noqa: N815


async def test_slow_down_answers_are_retried_with_backoff(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3's 503 SlowDown on writes is retried (obstore's backoff) until the upload succeeds:
    the output ends in the bucket whole and verified."""
    name = f"bucket-{next(_names)}"
    s3_env.create_bucket(name)
    proxy = SlowDownProxy(s3_env.endpoint, faults=4)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        b = open_bucket(parse_storage_url(f"s3://{name}/media"), allow_http=True, timeout=10)
        data = body_of(7 * 1024 * 1024)

        async def on_verified(size: int, digest: str) -> None:
            pass

        async with cdn(data) as http_client:
            saved = await Uploader(http_client, b).upload(
                "https://cdn/x", REL, upload_key(REL), on_verified
            )
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.refused == 4
    assert saved.sha256 == sha256(data)
    assert s3_env.objects(name) == {f"media/{REL}": data}
    assert s3_env.unfinished_uploads(name) == []


@pytest.mark.parametrize(("mib", "multipart"), [(1, False), (9, True)])
async def test_an_output_that_fits_in_a_part_goes_up_in_one_put(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, mib: int, multipart: bool
) -> None:
    """An output no larger than a part (8 MiB) is written with single PUTs, so no multipart
    upload exists that a kill could leave open; a larger one streams in parts."""
    name = f"bucket-{next(_names)}"
    s3_env.create_bucket(name)
    proxy = SlowDownProxy(s3_env.endpoint, faults=0)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    data = body_of(mib * 1024 * 1024)

    async def on_verified(size: int, digest: str) -> None:
        pass

    try:
        b = open_bucket(parse_storage_url(f"s3://{name}/media"), allow_http=True, timeout=10)
        async with cdn(data) as http_client:
            await Uploader(http_client, b).upload(
                "https://cdn/x", REL, upload_key(REL), on_verified
            )
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert any("?uploads" in r for r in proxy.seen) == multipart
    assert s3_env.objects(name) == {f"media/{REL}": data}
    assert s3_env.unfinished_uploads(name) == []
