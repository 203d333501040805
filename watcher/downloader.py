"""Streaming, verified, resumable downloads of one output to disk.

The order of writes for one output (what makes ``kill -9`` at any instant safe):

1. Stream the body into ``<final>.part`` in chunks (memory does not grow with the file), resuming
   an existing ``.part`` with ``Range`` when the server answers ``206`` with a matching
   ``Content-Range`` (a ``200`` starts over from byte 0).
2. ``fsync`` the ``.part`` file; check its length against ``Content-Length``/``Content-Range``.
3. The caller records size and sha256 in the store (``verified``).
4. ``rename`` ``.part`` to the final name (atomic), then ``fsync`` the directory.
5. The caller records the output ``saved``. Only then may a DELETE be sent.

A reader therefore never sees a partial file under a final name. After a crash, an output in the
store as ``verified`` is finished from disk (:func:`finish_from_disk`): the final file or the
``.part`` is accepted only if its size and sha256 match the record; otherwise it is fetched again.

This module does not talk to the store or the API; the daemon does.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

from watcher import clock
from watcher.errors import DiskFull, DownloadError, DownloadIncomplete, DownloadUrlExpired
from watcher.paths import part_path

CHUNK_SIZE = 1024 * 1024
BATCH_BYTES = 1024 * 1024
WRITEBACK_BYTES = 8 * 1024 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
USER_AGENT = "magic-hour-watcher"

OnVerified = Callable[[int, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SavedFile:
    """An output under its final name."""

    path: Path
    size: int
    sha256: str
    resumed_from: int = 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path, limit: int | None = None) -> tuple[int, hashlib._Hash]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while limit is None or size < limit:
            chunk = f.read(CHUNK_SIZE if limit is None else min(CHUNK_SIZE, limit - size))
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return size, digest


def _disk_error(exc: OSError, path: Path) -> DownloadError:
    if exc.errno in {errno.ENOSPC, errno.EDQUOT}:
        return DiskFull(f"no space left on device while writing {path}")
    return DownloadError(f"cannot write {path}: {exc.strerror or exc}")


class Downloader:
    """Saves outputs; shares the daemon's ``httpx.AsyncClient`` (no auth header is ever sent)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        now: Callable[[], float] = clock.now,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._http = http
        self._now = now
        self._user_agent = user_agent

    async def fetch(
        self, url: str, expires_at: float, final: Path, on_verified: OnVerified
    ) -> SavedFile:
        """Download ``url`` to ``final`` following the order of writes in the module docstring."""
        if expires_at <= self._now():
            raise DownloadUrlExpired("the signed URL expired before the download started")
        final.parent.mkdir(parents=True, exist_ok=True)
        part = part_path(final)
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": self._user_agent, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            async with self._http.stream("GET", url, headers=headers) as response:
                expected, offset = self._check_response(response, offset, part)
                size, digest = await self._write(response, part, offset)
        except httpx.TimeoutException:
            raise DownloadIncomplete(
                "the download timed out; it resumes from its .part file"
            ) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise DownloadIncomplete(
                f"the connection broke during the download ({type(exc).__name__}); "
                "it resumes from its .part file"
            ) from None
        except httpx.HTTPError as exc:  # a bad URL scheme, a proxy error, an undecodable body
            raise DownloadError(f"the download failed ({type(exc).__name__})") from None
        if expected is not None and size != expected:
            raise DownloadIncomplete(f"got {size} bytes of {expected}; resuming later")
        sha256 = digest.hexdigest()
        await on_verified(size, sha256)
        await asyncio.to_thread(_commit, part, final)
        return SavedFile(final, size, sha256, resumed_from=offset)

    def _check_response(
        self, response: httpx.Response, offset: int, part: Path
    ) -> tuple[int | None, int]:
        """Validate status and headers; return (expected total size, offset to write from)."""
        code = response.status_code
        if code in {401, 403, 404, 410}:
            raise DownloadUrlExpired(f"the signed URL was refused (HTTP {code})")
        if code == 416 and offset:
            total = response.headers.get("content-range", "").removeprefix("bytes */")
            if total.isdigit() and int(total) == offset:
                return offset, offset  # the .part already holds every byte (killed before commit)
            part.unlink(missing_ok=True)
            raise DownloadIncomplete("the server refused to resume (HTTP 416); starting over")
        if code == 206 and offset:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if match is None or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise DownloadIncomplete("the server resumed at the wrong offset; starting over")
            total = match.group(3)
            return (int(total) if total != "*" else None), offset
        if code == 200:
            length = response.headers.get("content-length")
            encoded = response.headers.get("content-encoding", "identity") != "identity"
            expected = int(length) if length and length.isdigit() and not encoded else None
            return expected, 0
        raise DownloadError(f"unexpected HTTP {code} from the download URL")

    async def _write(
        self, response: httpx.Response, part: Path, offset: int
    ) -> tuple[int, hashlib._Hash]:
        try:
            if offset:
                size, digest = await asyncio.to_thread(_hash_file, part, offset)
            else:
                size, digest = 0, hashlib.sha256()
            with part.open("r+b" if offset else "wb") as f:
                f.seek(offset)
                f.truncate()
                sink = _Sink(f, digest, offset)
                # A 416 (the .part is already whole) carries an error page, not bytes of the file.
                if response.status_code != 416:
                    size += await _stream_to_sink(response, sink)
                await asyncio.to_thread(sink.sync)
        except OSError as exc:
            if exc.errno in {errno.ENOSPC, errno.EDQUOT}:
                part.unlink(missing_ok=True)  # noqa: ASYNC240 - frees space at once
            raise _disk_error(exc, part) from None
        return size, digest


class _Sink:
    """The open ``.part`` file and the running digest of its bytes.

    Written from one thread at a time. Every ``WRITEBACK_BYTES`` it asks the kernel to start
    writing the pages already written back to disk and to drop them from the page cache
    (``POSIX_FADV_DONTNEED``): the final ``fsync`` then waits for little, and a large output does
    not push everything else out of memory.
    """

    def __init__(self, f: BinaryIO, digest: hashlib._Hash, offset: int) -> None:
        self._f = f
        self._digest = digest
        self._written = offset
        self._advised = offset

    def absorb(self, chunks: list[bytes]) -> None:
        """Write ``chunks`` as received (not re-chunked) and add them to the digest."""
        for chunk in chunks:
            self._f.write(chunk)
            self._digest.update(chunk)
            self._written += len(chunk)
        if self._written - self._advised >= WRITEBACK_BYTES:
            self._f.flush()
            _start_writeback(self._f.fileno(), self._advised, self._written - self._advised)
            self._advised = self._written

    def sync(self) -> None:
        """Flush and ``fsync`` the file."""
        self._f.flush()
        os.fsync(self._f.fileno())


def _start_writeback(fd: int, start: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):  # not on macOS; the final fsync does it all there
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


async def _stream_to_sink(response: httpx.Response, sink: _Sink) -> int:
    """Receive the body on the event loop while a worker thread writes and hashes it.

    Chunks are handed over in batches of about ``BATCH_BYTES`` with at most one batch in flight, so
    receiving overlaps writing and hashing (both release the GIL) and memory stays at about two
    batches whatever the file's size. A batch already received is written even when the body is
    cut short or the task is cancelled: those bytes stay in the ``.part`` for resuming.
    """
    received = 0
    batch: list[bytes] = []
    batched = 0
    in_flight: asyncio.Future[None] | None = None
    try:
        async for chunk in response.aiter_bytes():
            batch.append(chunk)
            batched += len(chunk)
            received += len(chunk)
            if batched >= BATCH_BYTES:
                if in_flight is not None:
                    await in_flight
                in_flight = asyncio.ensure_future(asyncio.to_thread(sink.absorb, batch))
                batch, batched = [], 0
    finally:
        if in_flight is not None:
            # A thread cannot be interrupted: let it finish before the file is touched again.
            await asyncio.shield(in_flight)
        sink.absorb(batch)
    return received


def _commit(part: Path, final: Path) -> None:
    """Rename the verified ``.part`` to its final name and make the rename durable."""
    try:
        part.replace(final)
        _fsync_dir(final.parent)
    except OSError as exc:
        raise _disk_error(exc, final) from None


def finish_from_disk(final: Path, size: int, sha256: str) -> bool:
    """Complete an output recorded as verified before a crash.

    True if the final file (or its ``.part``, then renamed) has the recorded size and digest.
    """
    for candidate in (final, part_path(final)):
        if not candidate.is_file() or candidate.stat().st_size != size:
            continue
        _, digest = _hash_file(candidate)
        if digest.hexdigest() != sha256:
            continue
        if candidate != final:
            _commit(candidate, final)
        return True
    return False


def remove_part(final: Path) -> None:
    """Delete a leftover ``.part`` of ``final``, if any."""
    part_path(final).unlink(missing_ok=True)
