"""One bucket (or container) of object storage, through obstore (the Python face of Rust's
``object_store``): streamed multipart uploads, reads, heads, deletes, listings.

obstore is async, streams a multipart upload part by part from an async iterator with bounded
memory (``PART_SIZE`` times ``PART_CONCURRENCY`` at most per upload), retries the service's 5xx
answers (S3's ``SlowDown`` is a 503), dropped connections and timeouts with exponential backoff
and jitter, and takes credentials from each service's standard variables and roles
(``AWS_*``, IRSA's web identity token, instance metadata; ``GOOGLE_*``; ``AZURE_*``).

An upload is atomic: the object appears under its key only when the upload completes. When the
bytes to upload stop coming (the source raised, the task was cancelled) the multipart upload is
aborted, never completed and never left open: the source is fed through a queue to obstore's
upload task, which is told to give up and awaited before the exception goes on.

Errors become :class:`ObjectStorageError` naming the object (``s3://bucket/key``) and the
service's answer (status and error code); never a credential or a signed query string.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from watcher.errors import ObjectStorageError
from watcher.objects.location import PARTS_PREFIX, StorageLocation

if TYPE_CHECKING:
    from obstore import Attributes
    from obstore.store import ClientConfig, ObjectStore, RetryConfig

PART_SIZE = 8 * 1024 * 1024
PART_CONCURRENCY = 2
QUEUED_CHUNKS = 4
SHA256_ATTRIBUTE = "sha256"
# Variables whose values must never appear in a message (obstore's errors quote requests).
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
)
_STATUS = re.compile(r"status code: (\d{3}[A-Za-z ]*)")
_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_QUERY = re.compile(r"\?\S*")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the service says of an object: its size and the sha256 recorded on it."""

    size: int
    sha256: str | None


class _End:
    """The source is done: complete the upload."""


class _Abort(Exception):
    """The source failed: abort the upload."""


class Upload(Protocol):
    """An upload under way (:meth:`Bucket.writing`)."""

    async def write(self, data: bytes) -> None:
        """Add ``data`` to the object (:class:`ObjectStorageError` if the upload failed)."""


@dataclass(slots=True)
class _Multipart:
    """A multipart upload fed through a bounded queue to obstore's upload task."""

    bucket: Bucket
    key: str
    queue: asyncio.Queue[bytes | _End | _Abort]
    put: asyncio.Future[Any]

    async def write(self, data: bytes) -> None:
        if self.put.done():  # it failed: it cannot have completed without the end
            with self.bucket._errors("upload", self.key):  # noqa: SLF001 - its own upload
                await self.put
            raise ObjectStorageError(f"cannot upload {self.bucket.url(self.key)}: it ended early")
        await self.queue.put(data)


@dataclass(slots=True)
class _Whole:
    """An object of at most ``size`` bytes (or it is refused), gathered for one PUT."""

    bucket: Bucket
    key: str
    size: int
    pieces: list[bytes] = field(default_factory=list)
    count: int = 0

    async def write(self, data: bytes) -> None:
        self.count += len(data)
        if self.count > self.size:
            raise ObjectStorageError(
                f"cannot upload {self.bucket.url(self.key)}: more than the {self.size} bytes "
                "announced"
            )
        self.pieces.append(data)

    def gathered(self) -> bytes:
        return b"".join(self.pieces)


def retry_config() -> RetryConfig:
    """Retries of the service's 5xx (``SlowDown``), connection faults and timeouts."""
    return {
        "max_retries": 10,
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=15),
            "base": 2,
        },
        "retry_timeout": timedelta(minutes=3),
    }


def open_store(location: StorageLocation, *, allow_http: bool, timeout: float) -> ObjectStore:
    """The obstore store of ``location``; credentials and endpoints come from the environment
    (each service's standard variables, read by obstore)."""
    from obstore.store import AzureStore, GCSStore, S3Store  # noqa: PLC0415 - only if configured

    client: ClientConfig = {
        "allow_http": allow_http,
        "connect_timeout": timedelta(seconds=min(10.0, timeout)),
        "timeout": timedelta(seconds=max(timeout, 300.0)),
    }
    prefix = location.prefix or None
    if location.scheme == "s3":
        return S3Store(
            location.bucket,
            prefix=prefix,
            client_options=client,
            retry_config=retry_config(),
            # The service checks every part's sha256 as it arrives, too.
            checksum_algorithm="SHA256",
        )
    if location.scheme == "gs":
        return GCSStore(
            location.bucket, prefix=prefix, client_options=client, retry_config=retry_config()
        )
    return AzureStore(
        location.bucket, prefix=prefix, client_options=client, retry_config=retry_config()
    )


@dataclass(slots=True)
class Bucket:
    """The objects under one :class:`StorageLocation`; keys are relative to its prefix. A
    multipart upload sends parts of ``part_size`` bytes, ``concurrency`` at a time."""

    location: StorageLocation
    store: ObjectStore = field(repr=False)
    part_size: int = PART_SIZE
    concurrency: int = PART_CONCURRENCY

    def url(self, key: str) -> str:
        """How people and other programs name the object of ``key``."""
        return self.location.url(key)

    async def check(self, probe: str) -> None:
        """Prove the bucket exists and these credentials may list, write and delete in it:
        list one key, write the small object ``probe`` under ``.parts/`` and delete it.
        :class:`ObjectStorageError` saying what failed."""
        import obstore  # noqa: PLC0415 - loaded only when object storage is configured

        with self._errors("list", ""):
            stream = obstore.list(self.store, prefix=PARTS_PREFIX, chunk_size=1)
            with contextlib.suppress(StopAsyncIteration):
                await anext(aiter(stream))
        key = f"{PARTS_PREFIX}/{probe}"
        with self._errors("write", key):
            await obstore.put_async(self.store, key, b"watcher start-up check\n")
        with self._errors("delete", key):
            await obstore.delete_async(self.store, key)

    async def upload(
        self,
        key: str,
        source: AsyncIterator[bytes],
        *,
        attributes: Attributes,
        size: int | None = None,
    ) -> None:
        """Stream ``source`` into an upload to ``key`` (:meth:`writing`): the object appears
        only if ``source`` ends without an exception."""
        async with self.writing(key, attributes=attributes, size=size) as upload:
            async for chunk in source:
                await upload.write(chunk)

    @contextlib.asynccontextmanager
    async def writing(
        self, key: str, *, attributes: Attributes, size: int | None = None
    ) -> AsyncIterator[Upload]:
        """An upload to ``key`` to :meth:`Upload.write` into: a multipart upload, whose object
        appears only if the block ends without an exception; every other outcome aborts it
        (the exception, cancellation included, goes on). A ``size`` known to fit in one part
        goes up in one PUT instead, once the block has ended: no multipart upload at all, so
        nothing that a ``kill -9`` could leave open."""
        import obstore  # noqa: PLC0415 - loaded only when object storage is configured

        if size is not None and size <= self.part_size:
            whole = _Whole(self, key, size)
            yield whole
            with self._errors("upload", key):
                await obstore.put_async(
                    self.store, key, whole.gathered(), attributes=attributes, use_multipart=False
                )
            return
        queue: asyncio.Queue[bytes | _End | _Abort] = asyncio.Queue(QUEUED_CHUNKS)

        async def feed() -> AsyncIterator[bytes]:
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, _Abort):
                    raise item
                yield item

        put = asyncio.ensure_future(
            obstore.put_async(
                self.store,
                key,
                feed(),
                attributes=attributes,
                chunk_size=self.part_size,
                max_concurrency=self.concurrency,
            )
        )
        put.add_done_callback(lambda _: _drain(queue))
        try:
            yield _Multipart(self, key, queue, put)
            if not put.done():
                await queue.put(_End())
        except BaseException:
            _drain(queue)
            queue.put_nowait(_Abort())
            with contextlib.suppress(BaseException):
                await asyncio.shield(put)
            raise
        with self._errors("upload", key):
            await put

    async def info(self, key: str) -> ObjectInfo | None:
        """The size and recorded sha256 of the object ``key``; ``None`` if there is none."""
        import obstore  # noqa: PLC0415 - loaded only when object storage is configured

        with self._errors("head", key):
            try:
                result = await obstore.get_async(self.store, key, options={"head": True})
            except FileNotFoundError:
                return None
        return ObjectInfo(int(result.meta["size"]), result.attributes.get(SHA256_ATTRIBUTE))

    async def read(self, key: str) -> AsyncIterator[bytes]:
        """The bytes of the object ``key``, streamed."""
        import obstore  # noqa: PLC0415 - loaded only when object storage is configured

        with self._errors("read", key):
            result = await obstore.get_async(self.store, key)
        stream = result.stream(min_chunk_size=1024 * 1024)
        while True:
            with self._errors("read", key):
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    return
            yield bytes(chunk)

    async def delete(self, key: str) -> None:
        """Delete the object ``key`` (one already gone counts as deleted)."""
        import obstore  # noqa: PLC0415 - loaded only when object storage is configured

        with self._errors("delete", key), contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self.store, key)

    async def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (relative to the location's prefix)."""
        import obstore  # noqa: PLC0415 - loaded only when object storage is configured

        found: list[str] = []
        strip = f"{self.location.prefix}/" if self.location.prefix else ""
        with self._errors("list", prefix):
            async for page in obstore.list(self.store, prefix=prefix, chunk_size=1000):
                found += [m["path"].removeprefix(strip) for m in page]
        return found

    @contextlib.contextmanager
    def _errors(self, what: str, key: str) -> Any:  # noqa: ANN401 - a context manager
        """Turn obstore's exceptions into :class:`ObjectStorageError` (but a FileNotFoundError
        of a head or a delete, whose callers decide what a missing object means)."""
        import obstore  # noqa: PLC0415 - loaded only when object storage is configured

        try:
            yield
        except FileNotFoundError as exc:
            if what not in {"head", "delete"}:  # a missing object or bucket
                raise ObjectStorageError(self._describe(what, key, exc)) from None
            raise
        except (obstore.exceptions.BaseError, OSError, ValueError, RuntimeError) as exc:
            raise ObjectStorageError(self._describe(what, key, exc)) from None

    def _describe(self, what: str, key: str, exc: BaseException) -> str:
        text = str(exc)
        status = _STATUS.search(text)
        code = _CODE.search(text)
        reason = type(exc).__name__
        if status:
            reason += f", HTTP {status.group(1).strip()}"
        if code:
            reason += f", {code.group(1)}"
        if not status and not code:
            first = _QUERY.sub("", text.split("\n", 1)[0])[:200]
            reason += f": {first}"
        return redact(f"cannot {what} {self.url(key)} ({reason})")


def redact(text: str) -> str:
    """``text`` with the value of every credential variable of the environment blanked."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "[redacted]")
    return text


def _drain(queue: asyncio.Queue[Any]) -> None:
    while not queue.empty():
        queue.get_nowait()
