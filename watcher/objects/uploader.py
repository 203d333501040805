"""Outputs from the CDN into object storage, following the order of writes of
:mod:`watcher.objects` (steps 2 to 6; the caller does 1, 3 and 7 in the store).

The CDN's body streams through a running sha256 into a multipart upload under the output's
temporary key: memory stays at a few parts whatever the output's size, and an upload whose body
did not verifiably end (short of ``Content-Length``, a compressed stream cut before its end, too
slow for :class:`~watcher.downloader.TransferLimits`) is aborted, never completed. The verified
temporary object is then published under the output's final key with its sha256 as metadata
(``sha256``; S3 also checks each part's own ``x-amz-checksum-sha256``): object stores set
metadata only when an object is written, so the bytes are streamed from the temporary object to
the final key and hashed again on the way; a mismatch aborts that upload too. The final object
is confirmed (its size and recorded sha256 against the store's record) before the temporary one
is deleted and the caller records the output saved.

Nothing is written to local disk. An interrupted transfer starts over from byte 0 (no ``Range``
resume into object storage).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import structlog

from watcher.downloader import (
    USER_AGENT,
    Pace,
    TransferLimits,
    _decoder_for,
    _raw_body,
)
from watcher.errors import DownloadError, DownloadIncomplete, DownloadUrlExpired, ObjectStorageError
from watcher.objects.bucket import SHA256_ATTRIBUTE, Bucket

log = structlog.get_logger("watcher")

OnVerified = Callable[[int, str], Awaitable[None]]
# The body is handed to the upload in pieces of about this size (as they arrive, in ~64 KiB).
HANDOFF_BYTES = 1024 * 1024
OnBytes = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class SavedObject:
    """An output under its final key, confirmed."""

    url: str
    size: int
    sha256: str


@dataclass(slots=True)
class _Tally:
    received: int = 0  # as sent
    written: int = 0  # decoded: the output's bytes


@dataclass(slots=True)
class Uploader:
    """Saves outputs into a :class:`Bucket`; shares the daemon's ``httpx.AsyncClient`` (which
    sends no credential to the CDN). ``on_bytes`` counts the bytes sent to the service."""

    http: httpx.AsyncClient = field(repr=False)
    bucket: Bucket
    user_agent: str = USER_AGENT
    limits: TransferLimits = field(default_factory=TransferLimits)
    on_bytes: OnBytes | None = None

    def url(self, relpath: str) -> str:
        """The name of the output ``relpath``'s final object (``s3://bucket/key``)."""
        return self.bucket.url(relpath)

    async def upload(
        self, url: str, relpath: str, key: str, on_verified: OnVerified
    ) -> SavedObject:
        """Upload ``url`` under the temporary ``key`` (already in the store), have the caller
        record it verified, publish it as ``relpath`` and confirm it (steps 2 to 6)."""
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        digest = hashlib.sha256()
        tally = _Tally()
        try:
            async with self.http.stream("GET", url, headers=headers) as response:
                expected = _check_response(response)
                content_type = response.headers.get("content-type", "application/octet-stream")
                body = self._body(response, key, expected, digest, tally)
                coding = response.headers.get("content-encoding", "").strip().lower()
                await self.bucket.upload(
                    key,
                    body,
                    attributes={"Content-Type": content_type},
                    size=expected if coding in {"", "identity"} else None,  # as sent = the file
                )
        except httpx.TimeoutException:
            raise DownloadIncomplete("the download timed out; the upload starts over") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise DownloadIncomplete(
                f"the connection broke during the download ({type(exc).__name__}); "
                "the upload starts over"
            ) from None
        except httpx.HTTPError as exc:
            raise DownloadError(f"the download failed ({type(exc).__name__})") from None
        sha256 = digest.hexdigest()
        await on_verified(tally.written, sha256)
        await self.publish(key, relpath, tally.written, sha256, content_type=content_type)
        return SavedObject(self.url(relpath), tally.written, sha256)

    async def finish(self, key: str | None, relpath: str, size: int, sha256: str) -> bool:
        """Complete an output recorded as verified before a crash (steps 4 to 6): True if its
        final object is confirmed, or its temporary one matched and was published."""
        if await self.confirmed(relpath, size, sha256):
            if key is not None:
                await self.bucket.delete(key)
            return True
        if key is None:
            return False
        info = await self.bucket.info(key)
        if info is None or info.size != size:
            return False
        try:
            await self.publish(key, relpath, size, sha256)
        except ObjectStorageError as exc:
            if "does not match" not in str(exc):
                raise
            return False
        return True

    async def confirmed(self, relpath: str, size: int, sha256: str) -> bool:
        """Whether the final object of ``relpath`` has the recorded size and sha256."""
        info = await self.bucket.info(relpath)
        return info is not None and info.size == size and info.sha256 == sha256

    async def publish(
        self, key: str, relpath: str, size: int, sha256: str, *, content_type: str | None = None
    ) -> None:
        """Write the verified temporary object ``key`` under its final key ``relpath`` with its
        sha256 as metadata, hashing it again on the way; confirm it; delete ``key``."""
        attributes = {SHA256_ATTRIBUTE: sha256}
        if content_type:
            attributes["Content-Type"] = content_type
        source = self._reread(key, size, sha256)
        await self.bucket.upload(relpath, source, attributes=attributes, size=size)
        if not await self.confirmed(relpath, size, sha256):
            raise ObjectStorageError(
                f"{self.url(relpath)} does not match its record ({size} bytes, sha256 {sha256}) "
                "after its upload"
            )
        await self.bucket.delete(key)

    async def _reread(self, key: str, size: int, sha256: str) -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        seen = 0
        async for chunk in self.bucket.read(key):
            digest.update(chunk)
            seen += len(chunk)
            if self.on_bytes is not None:
                self.on_bytes(len(chunk))
            yield chunk
        if seen != size or digest.hexdigest() != sha256:
            raise ObjectStorageError(
                f"{self.bucket.url(key)} does not match its record: {seen} bytes, sha256 "
                f"{digest.hexdigest()}, recorded {size} bytes, sha256 {sha256}"
            )

    async def _body(
        self,
        response: httpx.Response,
        key: str,
        expected: int | None,
        digest: hashlib._Hash,
        tally: _Tally,
    ) -> AsyncIterator[bytes]:
        """The output's bytes as they arrive, hashed and counted, bounded by the transfer
        limits; raises at the end unless the body verifiably ended."""
        decoder = _decoder_for(response)
        loop = asyncio.get_running_loop()
        started = last_report = loop.time()
        pace = Pace(self.limits, started)
        raw = aiter(_raw_body(response))
        batch: list[bytes] = []
        batched = 0
        while True:
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation
                # that arrives as the read completes (a shutdown would not stop the upload).
                async with asyncio.timeout_at(pace.due):
                    chunk = await anext(raw)
            except StopAsyncIteration:
                break
            except TimeoutError:
                now = loop.time()
                raise DownloadIncomplete(
                    f"the transfer was cut after {now - started:.1f} s with {tally.received} "
                    f"bytes received: {pace.cause(now)}; the upload starts over"
                ) from None
            tally.received += len(chunk)
            now = loop.time()
            pace.advance(len(chunk), now)
            for piece in decoder.decode(chunk):
                digest.update(piece)
                tally.written += len(piece)
                batch.append(piece)
                batched += len(piece)
            if batched >= HANDOFF_BYTES:  # fewer, larger hand-overs to obstore: less CPU
                yield self._handed(batch, batched)
                batch, batched = [], 0
            if now - last_report >= self.limits.progress_seconds:
                last_report = now
                log.info(
                    "upload_progress",
                    object=self.bucket.url(key),
                    bytes=tally.written,
                    elapsed_s=round(now - started, 1),
                )
        if expected is not None and tally.received != expected:
            raise DownloadIncomplete(
                f"got {tally.received} bytes of {expected}; the upload starts over"
            )
        if not decoder.complete:
            raise DownloadIncomplete(
                "the compressed body (Content-Encoding) ended before its end of stream; "
                "the upload starts over"
            )
        if batch:
            yield self._handed(batch, batched)

    def _handed(self, batch: list[bytes], size: int) -> bytes:
        """The bytes of ``batch`` as one piece for the upload, counted as sent."""
        if self.on_bytes is not None:
            self.on_bytes(size)
        return b"".join(batch)


def _check_response(response: httpx.Response) -> int | None:
    """The expected length of the body as sent (``None`` if not given), or the error."""
    code = response.status_code
    if code in {401, 403, 404, 410}:
        raise DownloadUrlExpired(f"the signed URL was refused (HTTP {code})")
    if code != 200:
        raise DownloadError(f"unexpected HTTP {code} from the download URL")
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None
