"""Unit tests of :mod:`watcher.downloader` against a fake CDN (``httpx.MockTransport``)."""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import io
import re
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

import watcher.downloader
from watcher.downloader import (
    WRITEBACK_BYTES,
    Downloader,
    SavedFile,
    bytes_on_disk,
    finish_from_disk,
    remove_part,
)
from watcher.errors import (
    DiskFull,
    DownloadError,
    DownloadIncomplete,
    DownloadUrlExpired,
    StoreError,
)
from watcher.paths import legacy_part_path, part_path
from watcher.receive import Pace, TransferLimits, transfer_failure

pytestmark = pytest.mark.anyio

URL = "https://cdn.example.test/output/cm2xproj0001/output.mp4?X-Amz-Signature=abc"
BODY = bytes(range(256)) * 40 + b"tail"  # 10244 bytes, every byte value present
SHA = hashlib.sha256(BODY).hexdigest()
GZIPPED = gzip.compress(BODY)

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeCdn:
    """Serves ``BODY`` by default, honouring ``Range`` like S3; records every request."""

    handler: Handler | None = None
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.handler is not None:
            return self.handler(request)
        return serve(request)


def serve(request: httpx.Request, body: bytes = BODY) -> httpx.Response:
    """A well-behaved CDN: 206 with Content-Range for a Range request, else 200."""
    match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("range", ""))
    if match is None:
        return httpx.Response(200, content=body)
    start = int(match.group(1))
    if start >= len(body):
        return httpx.Response(416, headers={"Content-Range": f"bytes */{len(body)}"})
    return httpx.Response(
        206,
        headers={"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"},
        content=body[start:],
    )


async def cut_after(data: bytes, error: Exception) -> AsyncIterator[bytes]:
    """A body stream that sends ``data`` and then fails like a dropped connection."""
    yield data
    raise error


class Verified:
    """An ``on_verified`` callback that records what it saw on disk when it was called."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.calls: list[tuple[int, str]] = []
        self.final_existed: list[bool] = []
        self.part_bytes: list[bytes] = []

    async def __call__(self, size: int, sha256: str) -> None:
        self.calls.append((size, sha256))
        self.final_existed.append(self.final.exists())
        self.part_bytes.append(part_path(self.final).read_bytes())


@asynccontextmanager
async def downloader(cdn: FakeCdn) -> AsyncIterator[Downloader]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(cdn)) as http:
        yield Downloader(http)


@pytest.fixture
def final(tmp_path: Path) -> Path:
    return tmp_path / "downloads" / "video" / "cm2xproj0001" / "0-output.mp4"


# --- a whole download --------------------------------------------------------------------------


async def test_full_download(final: Path) -> None:
    """The body lands under its final name, verified before the rename, with no .part left."""
    cdn = FakeCdn()
    verified = Verified(final)
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, verified)
    assert saved == SavedFile(final, len(BODY), SHA, resumed_from=0)
    assert final.read_bytes() == BODY
    assert not part_path(final).exists()
    assert verified.calls == [(len(BODY), SHA)]
    assert verified.final_existed == [False]  # recorded before the final name appears
    assert verified.part_bytes == [BODY]  # ... and after the .part holds every byte
    assert len(cdn.requests) == 1


async def test_new_folders_are_made_durable_in_the_folders_that_hold_them(
    final: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename is fsynced in its folder and each folder the download made in its parent,
    before the output may be recorded saved; a second output in the same folder makes none."""
    synced: list[Path] = []
    real = watcher.downloader._fsync_dir

    def spy(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(watcher.downloader, "_fsync_dir", spy)
    root = final.parents[2]
    root.mkdir()
    sibling = final.with_name("1-output.mp4")
    async with downloader(FakeCdn()) as d:
        await d.fetch(URL, final, Verified(final))
        made = list(synced)
        synced.clear()
        await d.fetch(URL, sibling, Verified(sibling))
    project, kind = final.parent, final.parent.parent
    assert made == [project, kind, root]  # the rename; the project's entry; the kind's entry
    assert synced == [project]


async def test_no_authorization_header_is_sent(final: Path) -> None:
    """Signed CDN links get a plain GET: no Authorization, no Range, no compression."""
    cdn = FakeCdn()
    async with downloader(cdn) as d:
        await d.fetch(URL, final, Verified(final))
    [request] = cdn.requests
    assert "authorization" not in request.headers
    assert "range" not in request.headers
    assert request.headers["accept-encoding"] == "identity"
    assert str(request.url) == URL


async def test_a_download_carries_the_clients_own_headers_and_timeout(final: Path) -> None:
    """The prebuilt GET is what ``build_request`` would have made: the client's headers (the
    download's own win), its timeout; a resumed one adds only ``Range``."""
    cdn = FakeCdn()
    timeout = httpx.Timeout(3.5, connect=1.5)
    headers = {"X-Client": "kept", "User-Agent": "overridden"}
    transport = httpx.MockTransport(cdn)
    async with httpx.AsyncClient(transport=transport, headers=headers, timeout=timeout) as http:
        d = Downloader(http)
        part_path(final).parent.mkdir(parents=True)
        part_path(final).write_bytes(BODY[:100])
        other = final.with_name("1-output.mp4")
        await d.fetch(URL, final, Verified(final))
        await d.fetch(URL, other, Verified(other))
    assert final.read_bytes() == other.read_bytes() == BODY
    resumed, whole = cdn.requests
    for request in (resumed, whole):
        assert request.headers["x-client"] == "kept"
        assert request.headers["user-agent"] == "magic-hour-watcher"
        assert request.headers["accept-encoding"] == "identity"
        assert "authorization" not in request.headers
        assert request.extensions["timeout"] == timeout.as_dict()
        assert request.method == "GET"
    assert resumed.headers["range"] == "bytes=100-"
    assert "range" not in whole.headers
    assert str(whole.url) == URL


async def test_a_user_agent_that_cannot_be_sent_fails_the_download_not_the_daemon(
    final: Path,
) -> None:
    """A User-Agent that is not ASCII (a replica id with an accent) cannot be sent: the
    downloader is still built, and a download fails as a download error, sending nothing."""
    cdn = FakeCdn()
    async with httpx.AsyncClient(transport=httpx.MockTransport(cdn)) as http:
        d = Downloader(http, user_agent="magic-hour-watcher (replica r\u00e9plica)")
        with pytest.raises(DownloadError, match="cannot be sent"):
            await d.fetch(URL, final, Verified(final))
    assert cdn.requests == []
    assert not final.exists()


async def test_empty_output(final: Path) -> None:
    """A zero-byte output is saved as an empty file with the empty digest."""
    cdn = FakeCdn(lambda _request: httpx.Response(200, content=b""))
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert saved.size == 0
    assert saved.sha256 == hashlib.sha256(b"").hexdigest()
    assert final.read_bytes() == b""


async def test_body_without_length_is_accepted(final: Path) -> None:
    """A streamed body without Content-Length is saved whole."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(BODY), 1000):
            yield BODY[start : start + 1000]

    cdn = FakeCdn(lambda _request: httpx.Response(200, content=chunks()))
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert (saved.size, saved.sha256) == (len(BODY), SHA)
    assert final.read_bytes() == BODY


async def test_callback_failure_leaves_no_final_file(final: Path) -> None:
    """If recording the verification fails, the output is not renamed into place."""

    async def broken_store(size: int, sha256: str) -> None:
        raise StoreError("database is gone")

    async with downloader(FakeCdn()) as d:
        with pytest.raises(StoreError):
            await d.fetch(URL, final, broken_store)
    assert not final.exists()
    assert part_path(final).read_bytes() == BODY


# --- bodies cut short --------------------------------------------------------------------------


async def test_body_shorter_than_content_length(final: Path) -> None:
    """A body that ends before its Content-Length is incomplete and keeps its .part."""
    short = BODY[:4000]
    cdn = FakeCdn(
        lambda _request: httpx.Response(
            200, headers={"Content-Length": str(len(BODY))}, content=short
        )
    )
    verified = Verified(final)
    async with downloader(cdn) as d:
        with pytest.raises(DownloadIncomplete, match=f"got 4000 bytes of {len(BODY)}"):
            await d.fetch(URL, final, verified)
    assert not final.exists()
    assert part_path(final).read_bytes() == short
    assert verified.calls == []


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadError("connection reset by peer"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
        httpx.ReadTimeout("read timed out"),
    ],
)
async def test_broken_connection_keeps_the_bytes_received(
    final: Path, error: httpx.TransportError
) -> None:
    """A connection that drops mid-body is incomplete, and what arrived stays in the .part."""
    cdn = FakeCdn(
        lambda _request: httpx.Response(
            200,
            headers={"Content-Length": str(len(BODY))},
            content=cut_after(BODY[:3000], error),
        )
    )
    async with downloader(cdn) as d:
        with pytest.raises(DownloadIncomplete, match=r"\.part"):
            await d.fetch(URL, final, Verified(final))
    assert not final.exists()
    assert part_path(final).read_bytes() == BODY[:3000]


async def test_broken_download_resumes_where_it_stopped(final: Path) -> None:
    """After a cut, the next fetch asks for the rest and the whole file verifies."""
    first = True

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal first
        if first:
            first = False
            return httpx.Response(200, content=cut_after(BODY[:5000], httpx.ReadError("reset")))
        return serve(request)

    cdn = FakeCdn(flaky)
    verified = Verified(final)
    async with downloader(cdn) as d:
        with pytest.raises(DownloadIncomplete):
            await d.fetch(URL, final, verified)
        saved = await d.fetch(URL, final, verified)
    assert cdn.requests[1].headers["range"] == "bytes=5000-"
    assert "authorization" not in cdn.requests[1].headers
    assert saved == SavedFile(final, len(BODY), SHA, resumed_from=5000)
    assert final.read_bytes() == BODY
    assert verified.calls == [(len(BODY), SHA)]


LARGE = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32 + 77)  # 3 MiB + 2464 bytes


async def in_chunks(data: bytes, size: int, error: Exception | None = None) -> AsyncIterator[bytes]:
    """A body stream of ``size``-byte chunks, failing at the end if ``error`` is given."""
    for start in range(0, len(data), size):
        yield data[start : start + size]
    if error is not None:
        raise error


async def test_a_body_of_many_batches_is_written_in_order(final: Path) -> None:
    """A body larger than a writer batch arrives whole, in order, with the digest of its bytes."""
    cdn = FakeCdn(
        lambda _request: httpx.Response(
            200, headers={"Content-Length": str(len(LARGE))}, content=in_chunks(LARGE, 65_536)
        )
    )
    verified = Verified(final)
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, verified)
    assert final.read_bytes() == LARGE
    assert saved.sha256 == hashlib.sha256(LARGE).hexdigest()
    assert verified.calls == [(len(LARGE), saved.sha256)]


async def test_a_cut_after_several_batches_keeps_every_byte_received(final: Path) -> None:
    """Batches written, the batch in flight and the unwritten tail all reach the .part."""
    received = LARGE[: 2 * 1024 * 1024 + 4_321]

    def cut_then_whole(request: httpx.Request) -> httpx.Response:
        if "range" in request.headers:
            return serve(request, LARGE)
        error = httpx.ReadError("reset")
        return httpx.Response(
            200,
            headers={"Content-Length": str(len(LARGE))},
            content=in_chunks(received, 50_000, error),
        )

    cdn = FakeCdn(cut_then_whole)
    async with downloader(cdn) as d:
        with pytest.raises(DownloadIncomplete):
            await d.fetch(URL, final, Verified(final))
        assert part_path(final).read_bytes() == received
        saved = await d.fetch(URL, final, Verified(final))
    assert cdn.requests[1].headers["range"] == f"bytes={len(received)}-"
    assert saved.resumed_from == len(received)
    assert final.read_bytes() == LARGE


# Beyond two writeback windows: the oldest ranges are waited for and dropped from the cache.
HUGE = hashlib.sha256(b"huge").digest() * ((2 * WRITEBACK_BYTES + 3 * 1024 * 1024) // 32 + 5)


@pytest.mark.parametrize("early_writeback", ["sync_file_range", "fadvise"])
async def test_a_body_past_the_writeback_windows_is_saved_whole(
    final: Path, early_writeback: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body of several writeback windows reaches the disk whole and in order, with its
    digest, whether writeback is started by ``sync_file_range`` (Linux) or by the fallback."""
    if early_writeback == "fadvise":
        monkeypatch.setattr(watcher.downloader, "_sync_file_range", lambda: None)
    elif watcher.downloader._sync_file_range() is None:
        pytest.skip("no sync_file_range(2) here")
    cdn = FakeCdn(
        lambda _request: httpx.Response(
            200, headers={"Content-Length": str(len(HUGE))}, content=in_chunks(HUGE, 300_000)
        )
    )
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert final.read_bytes() == HUGE
    assert saved.sha256 == hashlib.sha256(HUGE).hexdigest()


async def test_a_sandbox_that_refuses_sync_file_range_still_saves_the_file(
    final: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``sync_file_range`` the kernel or a seccomp sandbox refuses (ENOSYS) only turns early
    writeback off: the download completes, whole."""

    def refused(fd: int, start: int, length: int, flags: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(watcher.downloader, "_sync_file_range", lambda: refused)
    cdn = FakeCdn(lambda _request: httpx.Response(200, content=in_chunks(HUGE, 300_000)))
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert final.read_bytes() == HUGE
    assert saved.size == len(HUGE)


async def test_a_write_error_from_sync_file_range_fails_the_download(
    final: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error that writeback reports (EIO) fails the download as a disk error, and leaves
    no file under the final name."""

    def broken_disk(fd: int, start: int, length: int, flags: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(watcher.downloader, "_sync_file_range", lambda: broken_disk)
    async with downloader(FakeCdn(lambda _request: serve(_request, HUGE))) as d:
        with pytest.raises(DownloadError, match="Input/output error"):
            await d.fetch(URL, final, Verified(final))
    assert not final.exists()


async def test_the_event_loop_never_waits_for_the_disk(
    final: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tail of a body, written on the event loop, starts its writeback but never waits
    for older ranges to reach the disk: a slow disk stalls the download, not the daemon."""
    real = watcher.downloader._sync_file_range()
    if real is None:
        pytest.skip("no sync_file_range(2) here")
    loop_thread = threading.get_ident()

    def on_loop_no_wait(fd: int, start: int, length: int, flags: int) -> None:
        if flags != 2 and threading.get_ident() == loop_thread:  # 2: SYNC_FILE_RANGE_WRITE
            raise AssertionError("waited for the disk on the event loop")
        real(fd, start, length, flags)

    monkeypatch.setattr(watcher.downloader, "_sync_file_range", lambda: on_loop_no_wait)
    # Batches of 1 MiB leave the oldest write 16 MiB behind after 25 of them; the 512 KiB tail
    # then crosses the two windows.
    body = (HUGE * 2)[: 25 * 1024 * 1024 + 512 * 1024]
    cdn = FakeCdn(lambda _request: httpx.Response(200, content=in_chunks(body, 512 * 1024)))
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert final.read_bytes() == body
    assert saved.size == len(body)


def test_a_failing_sync_file_range_raises_the_os_error() -> None:
    """``sync_file_range(2)`` failing (here on a closed descriptor) is an ``OSError`` with its
    errno, which the downloader turns into a download error, not a silent skip."""
    sync_file_range = watcher.downloader._sync_file_range()
    if sync_file_range is None:
        pytest.skip("no sync_file_range(2) here")
    with pytest.raises(OSError, match="Bad file descriptor") as caught:
        sync_file_range(-1, 0, 4096, 2)
    assert caught.value.errno == errno.EBADF


# --- resuming ----------------------------------------------------------------------------------


async def test_resume_from_an_existing_part(final: Path) -> None:
    """An existing .part is continued with Range; the digest covers the whole file."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(BODY[:1234])
    cdn = FakeCdn()
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, Verified(final))
    [request] = cdn.requests
    assert request.headers["range"] == "bytes=1234-"
    assert saved.resumed_from == 1234
    assert (saved.size, saved.sha256) == (len(BODY), SHA)
    assert final.read_bytes() == BODY
    assert not part_path(final).exists()


async def test_resume_with_unknown_total(final: Path) -> None:
    """A 206 whose Content-Range total is ``*`` is accepted without a length check."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(BODY[:100])

    def reply(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Range": f"bytes 100-{len(BODY) - 1}/*"}
        return httpx.Response(206, headers=headers, content=BODY[100:])

    async with downloader(FakeCdn(reply)) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert (saved.size, saved.sha256) == (len(BODY), SHA)


async def test_200_to_a_range_request_starts_over(final: Path) -> None:
    """A server that ignores Range and sends the whole body replaces the .part cleanly."""
    final.parent.mkdir(parents=True)
    stale = b"stale bytes from another version of the file " * 50
    part_path(final).write_bytes(stale)
    cdn = FakeCdn(lambda _request: httpx.Response(200, content=BODY))
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert cdn.requests[0].headers["range"] == f"bytes={len(stale)}-"
    assert saved == SavedFile(final, len(BODY), SHA, resumed_from=0)
    assert final.read_bytes() == BODY


@pytest.mark.parametrize(
    "content_range",
    [
        f"bytes 0-{len(BODY) - 1}/{len(BODY)}",
        f"bytes 999-{len(BODY) - 1}/{len(BODY)}",
        "",
        "garbage",
    ],
)
async def test_206_at_the_wrong_offset_starts_over(final: Path, content_range: str) -> None:
    """A 206 that does not continue at our offset drops the .part; the next try starts clean."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(BODY[:500])
    wrong = True

    def reply(request: httpx.Request) -> httpx.Response:
        nonlocal wrong
        if wrong:
            wrong = False
            headers = {"Content-Range": content_range} if content_range else {}
            return httpx.Response(206, headers=headers, content=BODY)
        return serve(request)

    cdn = FakeCdn(reply)
    async with downloader(cdn) as d:
        with pytest.raises(DownloadIncomplete, match="wrong offset"):
            await d.fetch(URL, final, Verified(final))
        assert not part_path(final).exists()
        assert not final.exists()
        saved = await d.fetch(URL, final, Verified(final))
    assert "range" not in cdn.requests[1].headers
    assert saved == SavedFile(final, len(BODY), SHA, resumed_from=0)
    assert final.read_bytes() == BODY


async def test_416_for_a_complete_part_finishes_it(final: Path) -> None:
    """A .part that already holds the whole file (416 naming its size) is verified and kept."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(BODY)

    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            416,
            headers={"Content-Range": f"bytes */{len(BODY)}", "Content-Type": "application/xml"},
            content=b"<Error><Code>InvalidRange</Code></Error>",
        )

    verified = Verified(final)
    async with downloader(FakeCdn(reply)) as d:
        saved = await d.fetch(URL, final, verified)
    assert (saved.size, saved.sha256) == (len(BODY), SHA)
    assert final.read_bytes() == BODY
    assert verified.calls == [(len(BODY), SHA)]


async def test_416_for_a_part_of_another_size_starts_over(final: Path) -> None:
    """A 416 that does not match the .part (longer than the file) drops it."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(BODY + b"junk")
    async with downloader(FakeCdn()) as d:
        with pytest.raises(DownloadIncomplete, match="416"):
            await d.fetch(URL, final, Verified(final))
        assert not part_path(final).exists()
        saved = await d.fetch(URL, final, Verified(final))
    assert final.read_bytes() == BODY
    assert saved.resumed_from == 0


# --- refused and expired links -----------------------------------------------------------------


@pytest.mark.parametrize("code", [401, 403, 404, 410])
async def test_refused_link_is_expired(final: Path, code: int) -> None:
    """A refused signed URL means it expired; a .part is kept for the fresh URL."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(BODY[:10])
    cdn = FakeCdn(lambda _request: httpx.Response(code, text="<Error>AccessDenied</Error>"))
    async with downloader(cdn) as d:
        with pytest.raises(DownloadUrlExpired, match=str(code)):
            await d.fetch(URL, final, Verified(final))
    assert part_path(final).read_bytes() == BODY[:10]
    assert not final.exists()


@pytest.mark.parametrize("code", [500, 503, 302, 204])
async def test_other_statuses_are_download_errors(final: Path, code: int) -> None:
    """Any other status is a plain download error, and nothing is written."""
    cdn = FakeCdn(lambda _request: httpx.Response(code, text="nope"))
    async with downloader(cdn) as d:
        with pytest.raises(DownloadError) as caught:
            await d.fetch(URL, final, Verified(final))
    assert type(caught.value) is DownloadError
    assert not final.exists()
    assert not part_path(final).exists()


# --- a full disk -------------------------------------------------------------------------------


class _FullDiskFile(io.FileIO):
    """A real file whose writes fail as on a full disk."""

    def write(self, data: Any, /) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def _fill_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every write to a ``.part`` file fail with ENOSPC."""
    real_open = Path.open

    def open_on_full_disk(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        if self.name.endswith(".part") and mode in {"wb", "r+b"}:
            return _FullDiskFile(self, mode)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_on_full_disk)


async def test_full_disk(final: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing is DiskFull; no final file, and the .part is removed to free space."""
    _fill_disk(monkeypatch)
    verified = Verified(final)
    async with downloader(FakeCdn()) as d:
        with pytest.raises(DiskFull, match="no space left"):
            await d.fetch(URL, final, verified)
    assert not final.exists()
    assert not part_path(final).exists()
    assert verified.calls == []


async def test_full_disk_while_resuming(final: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC on a resumed download is DiskFull too, and leaves no final file."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(BODY[:700])
    _fill_disk(monkeypatch)
    async with downloader(FakeCdn()) as d:
        with pytest.raises(DiskFull):
            await d.fetch(URL, final, Verified(final))
    assert not final.exists()


async def test_other_write_errors_are_download_errors(
    final: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write error other than a full disk is a DownloadError naming the cause, not DiskFull."""

    def read_only(self: Path, *args: Any, **kwargs: Any) -> IO[Any]:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "open", read_only)
    async with downloader(FakeCdn()) as d:
        with pytest.raises(DownloadError, match="Permission denied") as caught:
            await d.fetch(URL, final, Verified(final))
    assert not isinstance(caught.value, DiskFull)
    assert not final.exists()


# --- finishing after a crash -------------------------------------------------------------------


def test_finish_from_a_matching_final_file(final: Path) -> None:
    """A final file with the recorded size and digest is accepted as is."""
    final.parent.mkdir(parents=True)
    final.write_bytes(BODY)
    assert finish_from_disk(final, len(BODY), SHA) is True
    assert final.read_bytes() == BODY


def test_finish_from_a_matching_part(final: Path) -> None:
    """A verified .part left by a crash before the rename is renamed into place."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(BODY)
    assert finish_from_disk(final, len(BODY), SHA) is True
    assert final.read_bytes() == BODY
    assert not part_path(final).exists()


def test_finish_prefers_a_matching_part_over_a_bad_final(final: Path) -> None:
    """A corrupt final file does not hide a good .part, which replaces it."""
    final.parent.mkdir(parents=True)
    final.write_bytes(b"x" * len(BODY))
    part_path(final).write_bytes(BODY)
    assert finish_from_disk(final, len(BODY), SHA) is True
    assert final.read_bytes() == BODY


@pytest.mark.parametrize(
    "content",
    [
        BODY[:-1],  # wrong size
        BODY[:-1] + b"X",  # right size, wrong digest
        b"",
    ],
)
def test_finish_rejects_a_mismatch(final: Path, content: bytes) -> None:
    """Files whose size or digest differ from the record are not accepted, nor renamed."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(content)
    assert finish_from_disk(final, len(BODY), SHA) is False
    assert not final.exists()
    assert part_path(final).read_bytes() == content


def test_finish_with_nothing_on_disk(final: Path) -> None:
    """With neither file present there is nothing to finish."""
    assert finish_from_disk(final, len(BODY), SHA) is False


def test_remove_part(final: Path) -> None:
    """A leftover .part (of this version or an earlier one) is deleted, and deleting a missing
    one is not an error."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(b"leftover")
    legacy_part_path(final).write_bytes(b"older")
    remove_part(final)
    assert not part_path(final).exists()
    assert not legacy_part_path(final).exists()
    remove_part(final)


# --- an earlier version's temporary file -------------------------------------------------------


async def test_an_earlier_versions_part_is_resumed(final: Path) -> None:
    """A ``<final>.part`` left by an earlier version is adopted and resumed with Range."""
    final.parent.mkdir(parents=True)
    legacy_part_path(final).write_bytes(BODY[:1234])
    cdn = FakeCdn()
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert cdn.requests[0].headers["range"] == "bytes=1234-"
    assert saved == SavedFile(final, len(BODY), SHA, resumed_from=1234)
    assert final.read_bytes() == BODY
    assert not legacy_part_path(final).exists()
    assert not part_path(final).exists()


def test_finish_from_an_earlier_versions_part(final: Path) -> None:
    """A verified ``<final>.part`` of an earlier version is renamed into place after a crash."""
    final.parent.mkdir(parents=True)
    legacy_part_path(final).write_bytes(BODY)
    assert finish_from_disk(final, len(BODY), SHA) is True
    assert final.read_bytes() == BODY
    assert not legacy_part_path(final).exists()


# --- bodies the server compressed although asked for identity ---------------------------------


def encoded(
    data: bytes, coding: str, *, status: int = 200, headers: dict[str, str] | None = None
) -> httpx.Response:
    """A response whose body is ``data`` as sent, with ``Content-Encoding: coding``."""
    return httpx.Response(
        status,
        headers={"Content-Encoding": coding, "Content-Length": str(len(data)), **(headers or {})},
        stream=httpx.ByteStream(data),
    )


@pytest.mark.parametrize("cut", [0.5, 0.99, 10 / len(GZIPPED)])
async def test_a_gzip_stream_cut_inside_a_well_framed_body_is_incomplete(
    final: Path, cut: float
) -> None:
    """A gzip body whose Content-Length matches but whose stream stops before its end is a cut
    transfer, never a saved file."""
    short = GZIPPED[: int(len(GZIPPED) * cut)]
    verified = Verified(final)
    async with downloader(FakeCdn(lambda _request: encoded(short, "gzip"))) as d:
        with pytest.raises(DownloadIncomplete, match="end of stream"):
            await d.fetch(URL, final, verified)
    assert verified.calls == []
    assert not final.exists()


async def test_an_empty_gzip_body_is_incomplete(final: Path) -> None:
    """A body announced as gzip with no bytes at all has no end of stream: incomplete."""
    async with downloader(FakeCdn(lambda _request: encoded(b"", "gzip"))) as d:
        with pytest.raises(DownloadIncomplete):
            await d.fetch(URL, final, Verified(final))
    assert not final.exists()


@pytest.mark.parametrize(
    ("coding", "data"),
    [
        ("gzip", GZIPPED),
        ("x-gzip", GZIPPED),
        ("gzip", gzip.compress(BODY[:5000]) + gzip.compress(BODY[5000:])),  # two members
        ("deflate", zlib.compress(BODY)),
        ("deflate", zlib.compress(BODY)[2:-4]),  # raw deflate, as some servers send it
    ],
)
async def test_a_complete_compressed_body_is_saved_decoded(
    final: Path, coding: str, data: bytes
) -> None:
    """A whole compressed body is saved as the file it encodes, with that file's digest."""
    async with downloader(FakeCdn(lambda _request: encoded(data, coding))) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert (saved.size, saved.sha256) == (len(BODY), SHA)
    assert final.read_bytes() == BODY


async def test_a_second_gzip_member_starting_a_chunk_is_kept(final: Path) -> None:
    """A gzip member that ends exactly where a chunk ends is followed by the next one, whole."""
    members = [gzip.compress(BODY[:5000]), gzip.compress(BODY[5000:])]

    async def chunks() -> AsyncIterator[bytes]:
        for member in members:
            yield member

    cdn = FakeCdn(
        lambda _request: httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=chunks())
    )
    async with downloader(cdn) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert (saved.size, saved.sha256) == (len(BODY), SHA)


async def test_a_compression_bomb_is_decoded_in_bounded_pieces(final: Path) -> None:
    """A small gzip body that expands a thousandfold is written piece by piece, whole."""
    huge = bytes(8 * 1024 * 1024)
    async with downloader(FakeCdn(lambda _request: encoded(gzip.compress(huge), "gzip"))) as d:
        saved = await d.fetch(URL, final, Verified(final))
    assert saved.size == len(huge)
    assert saved.sha256 == hashlib.sha256(huge).hexdigest()


async def test_a_corrupt_gzip_body_is_an_error(final: Path) -> None:
    """Bytes that are not gzip at all, announced as gzip, are refused."""
    async with downloader(FakeCdn(lambda _request: encoded(b"not gzip" * 100, "gzip"))) as d:
        with pytest.raises(DownloadError, match="not valid gzip"):
            await d.fetch(URL, final, Verified(final))
    assert not final.exists()


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, gzip"])
async def test_an_encoding_that_cannot_be_checked_is_refused(final: Path, coding: str) -> None:
    """A Content-Encoding we did not ask for and cannot check for completeness is refused."""
    async with downloader(FakeCdn(lambda _request: encoded(b"xyz", coding))) as d:
        with pytest.raises(DownloadError, match="not asked for"):
            await d.fetch(URL, final, Verified(final))
    assert not final.exists()


async def test_a_compressed_answer_to_a_range_request_starts_over(final: Path) -> None:
    """A 206 whose bytes are a slice of a compressed body cannot continue our file: the .part
    is dropped, and the next try starts from byte 0."""
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(BODY[:100])
    slice_range = {"Content-Range": f"bytes 100-{len(GZIPPED) - 1}/{len(GZIPPED)}"}
    answers = iter([encoded(GZIPPED[100:], "gzip", status=206, headers=slice_range)])

    def reply(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or serve(request)

    cdn = FakeCdn(reply)
    async with downloader(cdn) as d:
        with pytest.raises(DownloadIncomplete, match="compressed"):
            await d.fetch(URL, final, Verified(final))
        assert not part_path(final).exists()
        saved = await d.fetch(URL, final, Verified(final))
    assert "range" not in cdn.requests[1].headers
    assert (saved.size, saved.sha256) == (len(BODY), SHA)


# --- progress ------------------------------------------------------------------------------------


async def test_bytes_are_counted_as_they_are_written(final: Path) -> None:
    """``on_bytes`` hears of every byte written, a resumed transfer's new bytes only, and the
    bytes of a transfer cut short too."""
    counted: list[int] = []
    first = True

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal first
        if first:
            first = False
            return httpx.Response(
                200, content=in_chunks(LARGE[:1_500_000], 65_536, httpx.ReadError("reset"))
            )
        return serve(request, LARGE)

    async with httpx.AsyncClient(transport=httpx.MockTransport(FakeCdn(flaky))) as http:
        d = Downloader(http, on_bytes=counted.append)
        with pytest.raises(DownloadIncomplete):
            await d.fetch(URL, final, Verified(final))
        assert sum(counted) == 1_500_000 == bytes_on_disk(final)
        await d.fetch(URL, final, Verified(final))
    assert sum(counted) == len(LARGE) == bytes_on_disk(final)
    assert len(counted) > 2  # counted batch by batch, not once at the end


def test_bytes_on_disk(final: Path) -> None:
    """Bytes so far: the temporary file's size while it is written, the file's once saved."""
    assert bytes_on_disk(final) == 0
    final.parent.mkdir(parents=True)
    part_path(final).write_bytes(b"x" * 10)
    assert bytes_on_disk(final) == 10
    part_path(final).rename(final)
    assert bytes_on_disk(final) == 10


# --- the pace a transfer must keep ------------------------------------------------------------


def test_pace_moves_its_due_each_time_a_windows_bytes_arrive() -> None:
    """Each window must bring ``min_rate * rate_window`` bytes; meeting it starts a new window."""
    pace = Pace(TransferLimits(min_rate=100, rate_window=10, max_seconds=1_000), started=0.0)
    assert pace.due == 10.0
    assert pace.advance(999, now=3.0) is False  # 1 byte short of this window's 1000
    assert pace.due == 10.0
    assert pace.advance(1, now=4.0) is True
    assert pace.due == 14.0
    assert "fewer than 1000 bytes arrived in 10 s" in pace.cause(14.0)


def test_pace_never_runs_past_the_deadline() -> None:
    """However fast the bytes come, the due never passes the overall deadline."""
    pace = Pace(TransferLimits(min_rate=1, rate_window=10, max_seconds=25), started=0.0)
    for now in (5.0, 10.0, 20.0):
        pace.advance(1_000, now=now)
    assert pace.due == 25.0
    assert pace.cause(25.0) == "it did not finish within 25 s"


def test_pace_without_a_minimum_has_only_the_deadline() -> None:
    """``min_rate=0``: no window, only the deadline."""
    pace = Pace(TransferLimits(min_rate=0, rate_window=10, max_seconds=50), started=100.0)
    assert pace.due == 150.0
    assert pace.advance(0, now=120.0) is False
    assert pace.due == 150.0


async def steady(data: bytes, size: int, every: float, stall: float = 0.0) -> AsyncIterator[bytes]:
    """``data`` in ``size``-byte chunks ``every`` seconds apart, then a ``stall`` before the
    last chunk."""
    for start in range(0, len(data), size):
        if start + size >= len(data):
            await asyncio.sleep(stall)
        yield data[start : start + size]
        await asyncio.sleep(every)


@pytest.mark.parametrize("stall", [0.0, 1.0])
async def test_a_transfer_that_keeps_its_pace_runs_past_a_window_and_one_that_stalls_is_cut(
    final: Path, stall: float
) -> None:
    """Meeting the quota of each window moves the transfer's due window after window (it runs
    for several windows); a stall after that cuts it with the window's cause."""

    def slow(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=steady(BODY, 2048, 0.1, stall))

    limits = TransferLimits(min_rate=2_000, rate_window=0.25, max_seconds=30)
    async with httpx.AsyncClient(transport=httpx.MockTransport(FakeCdn(slow))) as http:
        downloader = Downloader(http, limits=limits)
        if not stall:
            await downloader.fetch(URL, final, Verified(final))
            assert final.read_bytes() == BODY  # 6 chunks, 0.1 s apart: over 2 windows
            return
        with pytest.raises(DownloadIncomplete, match=r"fewer than 500 bytes arrived in 0\.25 s"):
            await downloader.fetch(URL, final, Verified(final))


@pytest.mark.parametrize(
    ("fault", "kind", "message"),
    [
        (httpx.ReadTimeout("slow"), DownloadIncomplete, "the download timed out; THEN"),
        (
            httpx.ReadError("reset"),
            DownloadIncomplete,
            "the connection broke during the download (ReadError); THEN",
        ),
        (
            httpx.RemoteProtocolError("cut"),
            DownloadIncomplete,
            "the connection broke during the download (RemoteProtocolError); THEN",
        ),
        (
            httpx.UnsupportedProtocol("ftp"),
            DownloadError,
            "the download failed (UnsupportedProtocol)",
        ),
    ],
)
def test_a_client_fault_during_a_transfer_is_incomplete_or_a_failure(
    fault: httpx.HTTPError, kind: type[DownloadError], message: str
) -> None:
    """A timeout or a broken connection while a body is fetched is incomplete (tried again, with
    what becomes of the transfer); any other fault of the client fails the download."""
    error = transfer_failure(fault, "THEN")
    assert type(error) is kind
    assert str(error) == message
