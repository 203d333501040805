"""Streaming, verified, resumable, bounded downloads of one output to disk.

The order of writes for one output (what makes ``kill -9`` at any instant safe):

1. Stream the body into the temporary file ``.<final name>.part`` beside the final name (see
   :mod:`watcher.paths`: no output can have that name) in chunks (memory does not grow with the
   file), resuming an existing temporary file with ``Range`` when the server answers ``206`` with
   a matching ``Content-Range`` (a ``200`` starts over from byte 0). A temporary file of an
   earlier version (``<final name>.part``) is adopted first, so an upgrade resumes it.
2. ``fsync`` the temporary file; check that the body was complete: its length against
   ``Content-Length``/``Content-Range`` and, for a body the server compressed although it was
   asked for ``identity``, that the decompressor reached the end of the stream.
3. The caller records size and sha256 in the store (``verified``).
4. ``rename`` the temporary file to the final name (atomic), then ``fsync`` the directory, and
   for each folder this download made (the project's, a kind's) the folder that holds it: the
   new entries are durable too.
5. The caller records the output ``saved``. Only then may a DELETE be sent.

A reader therefore never sees a partial file under a final name. After a crash, an output in the
store as ``verified`` is finished from disk (:func:`finish_from_disk`): the final file or the
temporary file is accepted only if its size and sha256 match the record; otherwise it is fetched
again.

The body is received by the receive loop of :mod:`watcher.receive` into this module's sink
(the ``.part``, written and hashed on a worker thread). Every transfer is bounded
(:class:`~watcher.receive.TransferLimits`): it must deliver a minimum number of bytes in
every window of time and finish within an overall deadline, or it is cut (its bytes stay in the
temporary file, resumed later with ``Range``), so a slow-drip server cannot hold a download slot
forever. A long transfer logs ``download_progress`` at a steady cadence and counts its bytes in
``watcher_download_bytes_total`` as they are written; the size of the temporary file is the
bytes-so-far that ``watcher status`` and the API show (:func:`bytes_on_disk`).

A download's ``GET`` is built once (:class:`CdnRequests`, shared with the object storage's
uploader): the client's headers merged with the download's own once per downloader, the URL
parsed once (:func:`watcher.models.parsed_url`, the parse that validated the snapshot), and the
``httpx.Request`` handed to ``AsyncClient.send`` as it is, not merged again by
``build_request`` (the client has no base URL, params or cookies to merge; its timeout is set
on the request here). It never carries an ``Authorization`` header: the client has none, and
httpx strips one from a redirect to another origin anyway.

This module does not talk to the store or the API; the daemon does. The URL's ``expires_at`` is
not consulted here: a clock that is off would skip a good URL, so the CDN's answer decides.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import re
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import httpx
import structlog

from watcher.errors import DiskFull, DownloadError, DownloadIncomplete
from watcher.models import parsed_url
from watcher.paths import PART_SUFFIX, legacy_part_path, may_be_part_name, part_path
from watcher.receive import (
    CHUNK_SIZE,
    Decoder,
    Identity,
    Receive,
    TransferLimits,
    decoded_groups,
    decoder_for,
    transfer_failure,
    whole_body,
)

log = structlog.get_logger("watcher")

WRITEBACK_BYTES = 8 * 1024 * 1024
# A batch this large is hashed on a thread of its own while it is written (a smaller one costs
# less to hash than to hand over).
PARALLEL_HASH_BYTES = 256 * 1024
# An output of at most this many bytes (known from its Content-Length) is written and hashed on
# the event loop as it arrives, with no early writeback: its one ``fsync`` costs less than handing
# its few batches to threads and the disk (1,000 outputs of 200 KB: see bench/RESULTS.md).
SMALL_OUTPUT_BYTES = 4 * 1024 * 1024
# What becomes of a transfer cut or short (its bytes stay in the .part).
_RESUMES = "it resumes from its .part file"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
USER_AGENT = "magic-hour-watcher"

OnVerified = Callable[[int, str], Awaitable[None]]
OnBytes = Callable[[int], None]
_SyncFileRange = Callable[[int, int, int, int], None]  # (fd, start, length, flags)


@dataclass(frozen=True, slots=True)
class SavedFile:
    """An output under its final name."""

    path: Path
    size: int
    sha256: str
    resumed_from: int = 0


class CdnRequests:
    """The ``GET`` of a download URL through ``http``, with the client's headers and timeout
    merged once (see the module docstring); ``Accept-Encoding: identity``, and ``Range`` when
    it resumes."""

    def __init__(self, http: httpx.AsyncClient, user_agent: str = USER_AGENT) -> None:
        self._http = http
        self._extensions: dict[str, Any] = {"timeout": http.timeout.as_dict()}
        # The headers, or why none can be sent (a User-Agent that is not ASCII): a download
        # fails with it, as the API's requests do; the daemon does not die building this.
        self._headers: httpx.Headers | str
        try:
            self._headers = httpx.Headers(http.headers)
            self._headers.update({"User-Agent": user_agent, "Accept-Encoding": "identity"})
        except ValueError as exc:  # UnicodeEncodeError
            self._headers = f"its headers cannot be sent ({type(exc).__name__}: {exc})"

    def request(self, url: str, offset: int = 0) -> httpx.Request:
        """The request of ``url``'s bytes from ``offset`` on (``httpx.Request`` copies the
        headers, so the shared ones are never changed)."""
        headers = self._headers
        if isinstance(headers, str):
            raise DownloadError(f"the download cannot be sent: {headers}")
        if offset:
            headers = headers.copy()
            headers["Range"] = f"bytes={offset}-"
        return httpx.Request("GET", parsed_url(url), headers=headers, extensions=self._extensions)

    def stream(self, url: str, offset: int = 0) -> _Streamed:
        """``async with requests.stream(url) as response``: the response, its body unread,
        closed on the way out (what ``AsyncClient.stream`` does, with the prebuilt request)."""
        return _Streamed(self._http, self.request(url, offset))


class _Streamed:
    """The async context manager of :meth:`CdnRequests.stream` (a class, not a generator: no
    generator object per download)."""

    __slots__ = ("_http", "_request", "_response")

    def __init__(self, http: httpx.AsyncClient, request: httpx.Request) -> None:
        self._http = http
        self._request = request
        self._response: httpx.Response | None = None

    async def __aenter__(self) -> httpx.Response:
        self._response = await self._http.send(self._request, stream=True)
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._response is not None:
            await self._response.aclose()


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
        user_agent: str = USER_AGENT,
        limits: TransferLimits | None = None,
        on_bytes: OnBytes | None = None,
    ) -> None:
        self._requests = CdnRequests(http, user_agent)
        self._limits = limits or TransferLimits()
        self._on_bytes = on_bytes

    async def fetch(self, url: str, final: Path, on_verified: OnVerified) -> SavedFile:
        """Download ``url`` to ``final`` following the order of writes in the module docstring."""
        part, offset, made = _prepare(final)
        try:
            async with self._requests.stream(url, offset) as response:
                expected, offset, decoder = self._check_response(response, offset, part)
                size, digest = await self._write(response, final, offset, expected, decoder)
        except httpx.HTTPError as exc:
            raise transfer_failure(exc, _RESUMES) from None
        sha256 = digest.hexdigest()
        await on_verified(size, sha256)
        await asyncio.to_thread(_commit, part, final, made)
        return SavedFile(final, size, sha256, resumed_from=offset)

    def _check_response(
        self, response: httpx.Response, offset: int, part: Path
    ) -> tuple[int | None, int, Decoder]:
        """Validate status and headers; return (expected length of the body as sent, or None;
        offset to write from; the decoder of its content coding)."""
        code = response.status_code
        if not offset or code not in {206, 416}:
            expected, decoder = whole_body(response)
            return expected, 0, decoder
        if code == 416:
            total = response.headers.get("content-range", "").removeprefix("bytes */")
            if total.isdigit() and int(total) == offset:
                # The .part already holds every byte (killed before commit).
                return 0, offset, Identity()
            part.unlink(missing_ok=True)
            raise DownloadIncomplete("the server refused to resume (HTTP 416); starting over")
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))  # a 206
        if match is None or int(match.group(1)) != offset:
            part.unlink(missing_ok=True)
            raise DownloadIncomplete("the server resumed at the wrong offset; starting over")
        if not isinstance(decoder_for(response), Identity):
            # The range is one of the compressed bytes, which cannot continue our file.
            part.unlink(missing_ok=True)
            raise DownloadIncomplete(
                "the server resumed a compressed body (Content-Encoding "
                f"{response.headers['content-encoding']!r}); starting over"
            )
        total = match.group(3)
        return (int(total) - offset if total != "*" else None), offset, Identity()

    async def _write(
        self,
        response: httpx.Response,
        final: Path,
        offset: int,
        expected: int | None,
        decoder: Decoder,
    ) -> tuple[int, hashlib._Hash]:
        part = part_path(final)
        try:
            if offset:
                size, digest = await asyncio.to_thread(_hash_file, part, offset)
            else:
                size, digest = 0, hashlib.sha256()
            with part.open("r+b" if offset else "wb") as f:
                f.seek(offset)
                f.truncate()
                small = expected is not None and offset + expected <= SMALL_OUTPUT_BYTES
                sink = _Sink(
                    f, digest, offset, decoder, self._on_bytes, final, expected, inline=small
                )
                try:
                    # A 416 (the .part is already whole) carries an error page, not file bytes.
                    if response.status_code != 416:
                        receive = Receive(self._limits, expected, decoder, _RESUMES, offset)
                        await receive.into(sink, response)
                        size = sink.written
                    await asyncio.to_thread(sink.sync)
                finally:
                    sink.close()
        except OSError as exc:
            if exc.errno in {errno.ENOSPC, errno.EDQUOT}:
                part.unlink(missing_ok=True)  # frees space at once
            raise _disk_error(exc, part) from None
        return size, digest


def _prepare(final: Path) -> tuple[Path, int, tuple[Path, ...]]:
    """Make ``final``'s folder; return its temporary file (taking over an earlier version's
    ``<final>.part``), how many bytes that already holds, and the folders made (deepest first).
    On the event loop: a few calls on metadata, which cost less than the trip to a worker thread
    (about 50 µs of CPU)."""
    made = _make_folders(final.parent)
    part = part_path(final)
    if made:  # a folder just made holds no temporary file
        return part, 0, made
    legacy = legacy_part_path(final)
    try:
        return part, part.stat().st_size, made
    except FileNotFoundError:
        pass
    if legacy.is_file():
        # The legacy name of output N starts with "N-" and is not output N's own name, and the
        # store records one path per index: it cannot be another output's file.
        legacy.replace(part)
        return part, part.stat().st_size, made
    return part, 0, made


def _make_folders(folder: Path) -> tuple[Path, ...]:
    """Make ``folder`` and its missing parents; the folders made, deepest first."""
    missing: list[Path] = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
    return tuple(missing)


@dataclass(eq=False)
class _Sink:
    """The open ``.part`` file and the running digest of its bytes: the disk's
    :class:`~watcher.receive.Sink`.

    Each batch is absorbed on a worker thread while the event loop receives the next, with at
    most one batch in flight, so receiving overlaps writing and hashing (both release the GIL)
    and memory stays at about two batches whatever the file's size. What was received is
    written even when the body is cut short, too slow, or the task is cancelled: those bytes
    stay in the ``.part`` for resuming. ``inline`` (a small output): each batch is absorbed on
    the event loop, with no thread and no early writeback (the final ``fsync`` does it all).

    A large batch is hashed by the sink's own thread while this one
    writes it: both release the GIL, so a batch costs the longer of the two, not their sum.

    Writeback starts early (:class:`_Writeback`): each batch is handed to the disk as soon as it
    is written, and the file's pages that are on disk are dropped from the page cache, so the
    disk works from the first batch on, the final ``fsync`` waits only for the last few, and a
    large output does not push everything else out of memory.
    """

    f: BinaryIO
    digest: hashlib._Hash
    written: int  # bytes in the file (at first, the offset a resumed download starts at)
    decoder: Decoder
    on_bytes: OnBytes | None
    final: Path
    expected: int | None  # the body's length as announced
    inline: bool = False
    _writeback: _Writeback | None = field(init=False)
    _hasher: ThreadPoolExecutor | None = field(init=False, default=None)
    _writer: ThreadPoolExecutor | None = field(init=False, default=None)
    _in_flight: Future[None] | None = field(init=False, default=None)
    _offset: int = field(init=False)

    def __post_init__(self) -> None:
        self._offset = self.written
        self._writeback = None if self.inline else _Writeback(self.f.fileno(), self.written)

    async def take(self, chunks: list[bytes]) -> None:
        """Absorb ``chunks`` on the sink's thread once the batch before them is (inline: at
        once, on the loop)."""
        if self.inline:
            self.absorb(chunks, may_wait=False)
            return
        await self._absorbed()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="watcher-write")
        self._in_flight = self._writer.submit(self.absorb, chunks)

    async def settle(self, rest: list[bytes], *, ended: bool) -> None:  # noqa: ARG002
        """Let the batch in flight finish (a thread cannot be interrupted) before the file is
        touched again, then write ``rest``: every byte received is kept, ended or not."""
        await self._absorbed()
        self.absorb(rest, may_wait=False)

    async def _absorbed(self) -> None:
        """Wait for the batch in flight, if any, and raise its error. A thread's future, not an
        asyncio one: the loop is woken only when it has to wait (the thread usually keeps up)."""
        busy = self._in_flight
        if busy is None:
            return
        if not busy.done():
            await asyncio.shield(asyncio.wrap_future(busy))
        self._in_flight = None
        busy.result()

    def progress(self, received: int, elapsed: float) -> None:
        """Log ``download_progress``: the bytes of the file so far (of a compressed body: those
        decoded and written), of how many, at what rate."""
        identity = isinstance(self.decoder, Identity)
        offset = self._offset
        so_far = offset + received if identity else self.written
        log.info(
            "download_progress",
            path=str(self.final),
            bytes=so_far,
            total=offset + self.expected if self.expected is not None and identity else None,
            resumed_from=offset,
            elapsed_s=round(elapsed, 1),
            bytes_per_second=round((so_far - offset) / elapsed) if elapsed > 0 else None,
        )

    def absorb(self, chunks: list[bytes], *, may_wait: bool = True) -> None:
        """Decode ``chunks`` as received, write them and add them to the digest (a compressed
        batch in groups of about ``BATCH_BYTES`` of decoded bytes: memory stays bounded).

        ``may_wait=False`` on the event loop: writeback is started but never waited for, so
        a slow disk cannot stall every other project's work (the final ``fsync`` waits)."""
        for pieces in decoded_groups(self.decoder, chunks):
            self._absorb(pieces, may_wait=may_wait)

    def _absorb(self, pieces: list[bytes], *, may_wait: bool) -> None:
        size = sum(map(len, pieces))
        hashed = None
        if size >= PARALLEL_HASH_BYTES:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="watcher-sha256")
            hashed = self._hasher.submit(_update, self.digest, pieces)
        try:
            for piece in pieces:
                self.f.write(piece)
        finally:
            if hashed is None:
                _update(self.digest, pieces)
            else:
                hashed.result()
        self.written += size
        if self._writeback is not None:
            self.f.flush()
            self._writeback.advance(self.written, may_wait=may_wait)
        if self.on_bytes is not None:
            self.on_bytes(size)

    def sync(self) -> None:
        """Flush and ``fsync`` the file."""
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        """Stop the sink's threads (the file is the caller's to close)."""
        for thread in (self._writer, self._hasher):
            if thread is not None:
                thread.shutdown()


def _update(digest: hashlib._Hash, pieces: list[bytes]) -> None:
    for piece in pieces:
        digest.update(piece)


class _Writeback:
    """Early writeback of a file written front to back, from ``offset`` on.

    On Linux, each range written is handed to the disk at once (``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``, which does not wait); once more than ``2 * WRITEBACK_BYTES`` are
    in flight, the oldest are waited for (so the dirty pages of one download stay bounded and
    the writer keeps the disk's pace) and then dropped from the page cache
    (``POSIX_FADV_DONTNEED``: clean pages, so nothing is written twice). Elsewhere, every
    ``WRITEBACK_BYTES`` the range written is advised ``POSIX_FADV_DONTNEED``, which starts its
    writeback where the kernel does that (macOS has neither call: the final fsync does it all).
    None of this is what makes the file durable: the final ``fsync`` is.
    """

    def __init__(self, fd: int, offset: int) -> None:
        self._fd = fd
        self._kicked = offset  # writeback started up to here
        self._settled = offset  # on disk and out of the page cache up to here
        self._sync_file_range = _sync_file_range()

    def advance(self, written: int, *, may_wait: bool = True) -> None:
        """The file now holds ``written`` bytes; ``may_wait``: the oldest ranges in flight may
        be waited for (never on the event loop)."""
        if self._sync_file_range is not None:
            try:
                self._hand_over(self._sync_file_range, written, may_wait=may_wait)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise  # a write error (EIO, ENOSPC) the final fsync would report too
                self._sync_file_range = None  # a sandbox that refuses the call: fall back
            else:
                return
        if written - self._kicked >= WRITEBACK_BYTES:
            _drop_cache(self._fd, self._kicked, written - self._kicked)
            self._kicked = written

    def _hand_over(self, sync_file_range: _SyncFileRange, written: int, *, may_wait: bool) -> None:
        sync_file_range(self._fd, self._kicked, written - self._kicked, _SFR_WRITE)
        self._kicked = written
        if may_wait and written - self._settled > 2 * WRITEBACK_BYTES:
            upto = written - WRITEBACK_BYTES
            sync_file_range(self._fd, self._settled, upto - self._settled, _SFR_WAIT_WRITE)
            _drop_cache(self._fd, self._settled, upto - self._settled)
            self._settled = upto


def _drop_cache(fd: int, start: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):  # not on macOS
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


@functools.cache
def _sync_file_range() -> _SyncFileRange | None:
    """Linux's ``sync_file_range(2)`` (the os module lacks it), or None where there is none;
    looked up at the first download, so start-up does not load ctypes."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # noqa: PLC0415 - only where the call exists

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int

    def sync_file_range(fd: int, start: int, length: int, flags: int) -> None:
        if length > 0 and call(fd, start, length, flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return sync_file_range


_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE
_SFR_WAIT_WRITE = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER: the range is on disk
# What a kernel or sandbox answers when it will not do sync_file_range on this file at all.
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP})


def _commit(part: Path, final: Path, made: tuple[Path, ...] = ()) -> None:
    """Rename the verified ``.part`` to its final name and make the rename durable, with the
    entries of the folders ``made`` for it."""
    try:
        part.replace(final)
        _fsync_dir(final.parent)
        for folder in made:
            _fsync_dir(folder.parent)
    except OSError as exc:
        raise _disk_error(exc, final) from None


def finish_from_disk(final: Path, size: int, sha256: str) -> bool:
    """Complete an output recorded as verified before a crash.

    True if the final file (or its temporary file, of this version or an earlier one, then
    renamed) has the recorded size and digest.
    """
    for candidate in (final, part_path(final), legacy_part_path(final)):
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
    """Delete a leftover temporary file of ``final`` (of this version or an earlier one)."""
    part_path(final).unlink(missing_ok=True)
    legacy_part_path(final).unlink(missing_ok=True)


def find_parts(folder: Path, pattern: str) -> list[Path]:
    """Files under ``folder`` matching ``pattern`` (a glob ending in ``*``) whose names may be
    temporary files, of this version or an earlier one; see :func:`watcher.paths.is_part_name`
    for which of them can also be an output's name."""
    if not folder.is_dir():
        return []
    return [
        p for p in folder.glob(pattern + PART_SUFFIX) if may_be_part_name(p.name) and p.is_file()
    ]


def remove_files(paths: list[Path]) -> int:
    """Delete ``paths`` (those already gone count as removed too); how many."""
    for path in paths:
        path.unlink(missing_ok=True)
    return len(paths)


def bytes_on_disk(final: Path) -> int:
    """How many bytes of ``final`` are on disk so far: its temporary file's size while it
    downloads (the daemon writes it in batches of about 1 MiB), the file's once it is saved."""
    for candidate in (part_path(final), legacy_part_path(final), final):
        try:
            return candidate.stat().st_size
        except OSError:
            continue
    return 0
