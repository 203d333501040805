"""One response body received from the CDN: bounded in time, reported, batched, decoded, checked.

The receive loop of both places an output is saved, the disk (:mod:`watcher.downloader`) and
object storage (:mod:`watcher.objects.uploader`). :meth:`Receive.into` reads the body as sent
(:func:`raw_body`) on the event loop under one timer per transfer, which :class:`Pace` moves as
the bytes arrive (a minimum rate in every window, an overall deadline: a slow-drip server cannot
hold a slot forever); hands it to a :class:`Sink` in batches of about ``BATCH_BYTES`` (or what
arrived within ``HANDOVER_SECONDS``); has the sink log progress at a steady cadence; and once the
body ended refuses one that did not verifiably end: short of its ``Content-Length``, or a
compressed stream cut before its end.

The sink decodes the batches (:func:`decoder_for`: we ask for ``identity``, but a server may
compress anyway), hashes and writes them: the ``.part`` file, or a multipart upload. Decoding is
bounded: a gzip or deflate body is inflated in pieces of at most ``CHUNK_SIZE`` bytes, handed on
in groups of about ``BATCH_BYTES`` (:func:`decoded_groups`), so a small compressed body that
inflates a thousandfold (a gzip bomb) never sits in memory whole.

This module opens no file and talks to no store: the sinks do.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

import httpx

from watcher.errors import DownloadError, DownloadIncomplete, DownloadUrlExpired

CHUNK_SIZE = 1024 * 1024
BATCH_BYTES = 1024 * 1024
# A batch is handed to the sink after this long even if it is small: on a slow link the bytes
# received reach the disk (and the progress that ``watcher status`` shows) within about a second.
HANDOVER_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class TransferLimits:
    """Bounds of one transfer, and how often a long one reports progress.

    ``min_rate`` bytes per second must arrive in every ``rate_window`` seconds (``0``: no
    minimum); the whole transfer must end within ``max_seconds``.
    """

    min_rate: float = 1024.0
    rate_window: float = 60.0
    max_seconds: float = 3600.0
    progress_seconds: float = 30.0


class Pace:
    """When a transfer must next have made progress: ``min_rate * rate_window`` bytes in each
    window (a window starts when the previous one's due was met), and the end by the deadline."""

    def __init__(self, limits: TransferLimits, started: float) -> None:
        self._limits = limits
        self._deadline = started + limits.max_seconds
        self._quota = limits.min_rate * limits.rate_window
        self._window_end = started + limits.rate_window if self._quota > 0 else self._deadline
        self._window_bytes = 0

    @property
    def due(self) -> float:
        """When the transfer is cut unless :meth:`advance` moves it."""
        return min(self._deadline, self._window_end)

    def advance(self, received: int, now: float) -> bool:
        """Count ``received`` bytes at ``now``; whether :attr:`due` moved."""
        self._window_bytes += received
        if not self._quota or self._window_bytes < self._quota:
            return False
        self._window_bytes = 0
        self._window_end = now + self._limits.rate_window
        return True

    def cause(self, now: float) -> str:
        """Why the transfer was cut at ``now``."""
        if now >= self._deadline:
            return f"it did not finish within {self._limits.max_seconds:g} s"
        return (
            f"fewer than {self._quota:.0f} bytes arrived in {self._limits.rate_window:g} s "
            f"(the minimum is {self._limits.min_rate:g} bytes/s)"
        )


class Decoder(Protocol):
    """Turns the body as sent into the file's bytes, and knows whether it saw the end."""

    @property
    def complete(self) -> bool: ...

    def decode(self, data: bytes) -> Iterator[bytes]: ...


class Identity:
    """The body is the file."""

    complete = True

    def decode(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data


class Inflate:
    """A gzip or deflate body, decoded in pieces of at most ``CHUNK_SIZE`` (``max_length``: a
    small compressed body cannot expand in memory), which is complete only once its stream has
    ended."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._wbits = zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS
        self._z = zlib.decompressobj(self._wbits)
        self._started = False

    @property
    def complete(self) -> bool:
        return self._z.eof

    def decode(self, data: bytes) -> Iterator[bytes]:
        try:
            yield from self._inflate(data)
        except zlib.error as exc:
            if self._coding != "deflate" or self._started:
                raise DownloadError(
                    f"the body is not valid {self._coding} (Content-Encoding): {exc}"
                ) from None
            # "deflate" is often sent raw, without the zlib wrapper.
            self._wbits = -zlib.MAX_WBITS
            self._z = zlib.decompressobj(self._wbits)
            yield from self.decode(data)

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        while True:
            if self._z.eof:  # a gzip body may hold several members, one after another
                if not data:
                    return
                self._z = zlib.decompressobj(self._wbits)
            piece = self._z.decompress(data, CHUNK_SIZE)
            self._started = True  # the header was accepted: no raw-deflate fallback from here
            if piece:
                yield piece
            if self._z.eof:
                data = self._z.unused_data
            else:
                data = self._z.unconsumed_tail
                if not data and len(piece) < CHUNK_SIZE:
                    return  # every byte given is decoded, and no output is pending


def decoder_for(response: httpx.Response) -> Decoder:
    """The decoder of the response's ``Content-Encoding`` (we asked for ``identity``)."""
    coding = response.headers.get("content-encoding", "").strip().lower()
    if coding in {"", "identity"}:
        return Identity()
    if coding in {"gzip", "x-gzip"}:
        return Inflate("gzip")
    if coding == "deflate":
        return Inflate("deflate")
    raise DownloadError(
        f"the server sent Content-Encoding {coding!r}, which was not asked for and cannot be "
        "checked for completeness"
    )


def whole_body(response: httpx.Response) -> tuple[int | None, Decoder]:
    """The length announced of a ``200``'s body as sent (``None`` if none is) and the decoder
    of its content coding; the error of any other status."""
    code = response.status_code
    if code in {401, 403, 404, 410}:
        raise DownloadUrlExpired(f"the signed URL was refused (HTTP {code})")
    if code != 200:
        raise DownloadError(f"unexpected HTTP {code} from the download URL")
    length = response.headers.get("content-length")
    return (int(length) if length and length.isdigit() else None), decoder_for(response)


def transfer_failure(exc: httpx.HTTPError, then: str) -> DownloadError:
    """What a fault of the HTTP client while a body is fetched means; ``then``: what becomes
    of the transfer ("it resumes from its .part file"). A timeout or a broken connection is
    incomplete (tried again); anything else (a bad URL scheme, a proxy error) a failure."""
    if isinstance(exc, httpx.TimeoutException):
        return DownloadIncomplete(f"the download timed out; {then}")
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return DownloadIncomplete(
            f"the connection broke during the download ({type(exc).__name__}); {then}"
        )
    return DownloadError(f"the download failed ({type(exc).__name__})")


def decoded_groups(decoder: Decoder, chunks: list[bytes]) -> Iterator[list[bytes]]:
    """The decoded bytes of ``chunks``, in lists of about ``BATCH_BYTES`` (never empty): at
    most ``BATCH_BYTES + CHUNK_SIZE`` decoded bytes are held at once, whatever the ratio."""
    group: list[bytes] = []
    size = 0
    for chunk in chunks:
        for piece in decoder.decode(chunk):
            group.append(piece)
            size += len(piece)
            if size >= BATCH_BYTES:
                yield group
                group, size = [], 0
    if group:
        yield group


def raw_body(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as sent, before any ``Content-Encoding`` is undone. (A response built in memory,
    by a test's transport, was read as it was built; its stream still holds the bytes as sent.)"""
    if response.is_stream_consumed and isinstance(response.stream, httpx.AsyncByteStream):
        return aiter(response.stream)
    return response.aiter_raw()


class Sink(Protocol):
    """Where a received body goes: it decodes, hashes and writes each batch."""

    async def take(self, chunks: list[bytes]) -> None:
        """A batch of the body as sent, in the order received (never empty)."""

    async def settle(self, rest: list[bytes], *, ended: bool) -> None:
        """The receive loop is leaving, whatever the outcome: ``rest`` is what arrived since the
        last :meth:`take` (maybe nothing); ``ended``: the body ended (it is still to be checked),
        rather than being cut, broken or cancelled."""

    def progress(self, received: int, elapsed: float) -> None:
        """Log how far a long transfer is: ``received`` bytes as sent in ``elapsed`` seconds."""


class _Watchdog:
    """Expire ``timer`` once ``pace`` is due, while in its ``with`` block. It looks at the pace
    when the due it last saw comes, and only then: moving a timer on every chunk received (a
    heap push and a cancel, several thousand times a GiB) would cost more than looking once a
    window. (A class, not a generator: nothing more is built per transfer.)"""

    __slots__ = ("_handle", "_loop", "_pace", "_timer")
    _handle: asyncio.TimerHandle

    def __init__(self, pace: Pace, timer: asyncio.Timeout) -> None:
        self._loop = asyncio.get_running_loop()
        self._pace = pace
        self._timer = timer

    def __enter__(self) -> None:
        self._handle = self._loop.call_at(self._pace.due, self._look)

    def __exit__(self, *exc_info: object) -> None:
        self._handle.cancel()

    def _look(self) -> None:
        now, due = self._loop.time(), self._pace.due
        if now >= due:
            self._timer.reschedule(now)
        else:
            self._handle = self._loop.call_at(due, self._look)


@dataclass(frozen=True, slots=True)
class Receive:
    """One response body on its way into a :class:`Sink`: bounded, reported, checked."""

    limits: TransferLimits
    expected: int | None  # the body's length as announced
    decoder: Decoder
    then: str  # what becomes of a transfer cut or short: "the upload starts over"
    offset: int = 0  # bytes of the output the sink already holds (a resumed download)

    async def into(self, sink: Sink, response: httpx.Response) -> int:
        """Receive the body into ``sink``; how many bytes were received (as sent). Raises
        :class:`DownloadIncomplete` if the transfer was too slow, or the body did not verifiably
        end (after ``sink.settle``)."""
        loop = asyncio.get_running_loop()  # the clock asyncio's timeouts run on
        started = last_report = last_handover = loop.time()
        pace = Pace(self.limits, started)
        received = batched = 0
        batch: list[bytes] = []
        ended = False
        try:
            try:
                async with asyncio.timeout_at(None) as timer:
                    with _Watchdog(pace, timer):
                        async for chunk in raw_body(response):
                            batch.append(chunk)
                            batched += len(chunk)
                            received += len(chunk)
                            now = loop.time()
                            pace.advance(len(chunk), now)
                            if now - last_report >= self.limits.progress_seconds:
                                last_report = now
                                sink.progress(received, now - started)
                            if batched >= BATCH_BYTES or now - last_handover >= HANDOVER_SECONDS:
                                last_handover = now
                                await sink.take(batch)
                                batch, batched = [], 0
                ended = True
            finally:
                await sink.settle(batch, ended=ended)  # outside the time limit
        except TimeoutError:
            now = loop.time()
            raise DownloadIncomplete(
                f"the transfer was cut after {now - started:.1f} s with {received} bytes "
                f"received: {pace.cause(now)}; {self.then}"
            ) from None
        self._check_complete(received)
        return received

    def _check_complete(self, received: int) -> None:
        """Refuse a body that did not verifiably end: short of its length, or a compressed
        stream that stopped before its end."""
        if self.expected is not None and received != self.expected:
            raise DownloadIncomplete(
                f"got {self.offset + received} bytes of {self.offset + self.expected}; {self.then}"
            )
        if not self.decoder.complete:
            raise DownloadIncomplete(
                f"the compressed body (Content-Encoding) ended before its end of stream; "
                f"{self.then}"
            )
