"""Outputs from the CDN into object storage, following the order of writes of
:mod:`watcher.objects` (steps 2 to 6; the caller does 1, 3 and 7 in the store).

The CDN's body streams (received by :mod:`watcher.receive`'s loop into this module's sink)
through a running sha256 into a multipart upload under the output's
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

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import structlog

from watcher.downloader import USER_AGENT, CdnRequests
from watcher.errors import ObjectStorageError
from watcher.objects.bucket import SHA256_ATTRIBUTE, Bucket, Upload
from watcher.receive import (
    Decoder,
    Identity,
    Receive,
    TransferLimits,
    decoded_groups,
    transfer_failure,
    whole_body,
)

log = structlog.get_logger("watcher")

OnVerified = Callable[[int, str], Awaitable[None]]
OnBytes = Callable[[int], None]
# What becomes of a transfer cut or short: nothing of it is kept.
_STARTS_OVER = "the upload starts over"


@dataclass(frozen=True, slots=True)
class SavedObject:
    """An output under its final key, confirmed."""

    url: str
    size: int
    sha256: str


@dataclass(slots=True)
class Uploader:
    """Saves outputs into a :class:`Bucket`; shares the daemon's ``httpx.AsyncClient`` (which
    sends no credential to the CDN; its ``GET`` is :class:`~watcher.downloader.CdnRequests`'s).
    ``on_bytes`` counts the bytes sent to the service."""

    http: httpx.AsyncClient = field(repr=False)
    bucket: Bucket
    user_agent: str = USER_AGENT
    limits: TransferLimits = field(default_factory=TransferLimits)
    on_bytes: OnBytes | None = None
    _requests: CdnRequests = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._requests = CdnRequests(self.http, self.user_agent)

    def url(self, relpath: str) -> str:
        """The name of the output ``relpath``'s final object (``s3://bucket/key``)."""
        return self.bucket.url(relpath)

    async def upload(
        self, url: str, relpath: str, key: str, on_verified: OnVerified
    ) -> SavedObject:
        """Upload ``url`` under the temporary ``key`` (already in the store), have the caller
        record it verified, publish it as ``relpath`` and confirm it (steps 2 to 6)."""
        try:
            async with self._requests.stream(url) as response:
                expected, decoder = whole_body(response)
                content_type = response.headers.get("content-type", "application/octet-stream")
                async with self.bucket.writing(
                    key,
                    attributes={"Content-Type": content_type},
                    size=expected if isinstance(decoder, Identity) else None,  # as sent = file
                ) as upload:
                    sink = _ObjectSink(upload, decoder, self.bucket.url(key), self.on_bytes)
                    await Receive(self.limits, expected, decoder, _STARTS_OVER).into(sink, response)
        except httpx.HTTPError as exc:
            raise transfer_failure(exc, _STARTS_OVER) from None
        sha256 = sink.digest.hexdigest()
        await on_verified(sink.written, sha256)
        await self.publish(key, relpath, sink.written, sha256, content_type=content_type)
        return SavedObject(self.url(relpath), sink.written, sha256)

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


@dataclass(slots=True)
class _ObjectSink:
    """The running sha256 of an output and the upload it goes into: object storage's
    :class:`~watcher.receive.Sink`. Each batch is decoded on the event loop and handed to the
    upload in pieces of about ``BATCH_BYTES`` of decoded bytes; what arrived since the last
    batch goes up only if the body ended (anything else aborts the upload)."""

    upload: Upload
    decoder: Decoder
    name: str  # the temporary object's URL, for the log
    on_bytes: OnBytes | None
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    written: int = 0  # decoded: the output's bytes

    async def take(self, chunks: list[bytes]) -> None:
        for pieces in decoded_groups(self.decoder, chunks):
            for piece in pieces:
                self.digest.update(piece)
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self.written += len(data)
            if self.on_bytes is not None:
                self.on_bytes(len(data))
            await self.upload.write(data)

    async def settle(self, rest: list[bytes], *, ended: bool) -> None:
        if ended and rest:
            await self.take(rest)

    def progress(self, received: int, elapsed: float) -> None:  # noqa: ARG002
        log.info(
            "upload_progress", object=self.name, bytes=self.written, elapsed_s=round(elapsed, 1)
        )
