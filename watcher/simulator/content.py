"""The bytes of simulated outputs: deterministic, seekable and never held in memory whole.

This module owns what an output file contains (a real magic number, then pseudo-random bytes),
its name and media type, and the parsing of ``Range`` headers. Any byte range of any output can
be produced in O(range) time, so a 1 GiB output is streamed block by block.

How a block is made: one 1 MiB random pool is drawn per seed; block ``n`` of an output is a
64 KiB window of that pool at an offset drawn from ``sha256(key, n)``, stamped with 16 bytes of
the same digest so that no two blocks are equal. This is ~10x faster than hashing every byte.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from watcher.models import Kind

if TYPE_CHECKING:
    from collections.abc import Iterator

BLOCK_SIZE = 64 * 1024
_POOL_SIZE = 1 << 20
_STAMP = 16

MAGIC: dict[Kind, bytes] = {
    Kind.IMAGE: b"\x89PNG\r\n\x1a\n",
    Kind.VIDEO: b"\x00\x00\x00\x18ftypmp42",
    Kind.AUDIO: b"ID3\x04\x00\x00\x00\x00\x00\x00",
}
EXTENSION: dict[Kind, str] = {Kind.IMAGE: "png", Kind.VIDEO: "mp4", Kind.AUDIO: "mp3"}
CONTENT_TYPE: dict[Kind, str] = {
    Kind.IMAGE: "image/png",
    Kind.VIDEO: "video/mp4",
    Kind.AUDIO: "audio/mpeg",
}


def output_name(kind: Kind, index: int) -> str:
    """The file name of output ``index``: ``output.png``, then ``output-1.png`` and so on."""
    suffix = "" if index == 0 else f"-{index}"
    return f"output{suffix}.{EXTENSION[kind]}"


def output_key(seed: int, project_id: str, index: int) -> bytes:
    """The 16-byte key that selects one output's bytes."""
    return hashlib.sha256(f"output:{seed}:{project_id}:{index}".encode()).digest()[:16]


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """One output of a project: everything needed to serve and verify its bytes."""

    index: int
    name: str
    content_type: str
    size: int
    key: bytes
    magic: bytes


class ByteSource:
    """Produces the bytes of any output of one seed; immutable, so safe to share between threads."""

    def __init__(self, seed: int) -> None:
        self._pool = hashlib.shake_256(f"pool:{seed}".encode()).digest(_POOL_SIZE + BLOCK_SIZE)

    def block(self, output: OutputSpec, number: int) -> bytes:
        """Return block ``number`` of ``output`` (always ``BLOCK_SIZE`` bytes; the caller trims)."""
        digest = hashlib.sha256(output.key + number.to_bytes(8, "big")).digest()
        offset = int.from_bytes(digest[:8], "big") % _POOL_SIZE
        data = digest[8 : 8 + _STAMP] + self._pool[offset + _STAMP : offset + BLOCK_SIZE]
        if number == 0:
            data = output.magic + data[len(output.magic) :]
        return data

    def chunks(self, output: OutputSpec, start: int, end: int) -> Iterator[bytes]:
        """Yield the bytes ``[start, end)`` of ``output`` in block-aligned chunks."""
        end = min(end, output.size)
        first, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        for number in range(first, last + 1):
            base = number * BLOCK_SIZE
            block = self.block(output, number)
            yield block[max(start - base, 0) : min(end - base, BLOCK_SIZE)]

    def read(self, output: OutputSpec, start: int = 0, end: int | None = None) -> bytes:
        """Return the bytes ``[start, end)`` of ``output`` at once (for small outputs)."""
        stop = output.size if end is None else end
        return b"".join(self.chunks(output, start, stop)) if stop > start else b""

    def sha256(self, output: OutputSpec) -> str:
        """Return the hex SHA-256 of the whole output, streaming it through the hash."""
        digest = hashlib.sha256()
        for chunk in self.chunks(output, 0, output.size):
            digest.update(chunk)
        return digest.hexdigest()


# --- Range headers (RFC 9110 section 14) -------------------------------------------------------

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeNotSatisfiableError(Exception):
    """The ``Range`` header is well formed but selects no byte of the representation."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A half-open byte range ``[start, end)``."""

    start: int
    end: int

    @property
    def length(self) -> int:
        """How many bytes the range covers."""
        return self.end - self.start

    def content_range(self, size: int) -> str:
        """The ``Content-Range`` value for this range of a ``size``-byte representation."""
        return f"bytes {self.start}-{self.end - 1}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Parse one ``bytes=`` range; ``None`` means serve the whole body.

    Malformed headers, other units and multiple ranges are ignored, as RFC 9110 allows.
    Raises :class:`RangeNotSatisfiableError` when the range starts past the end.
    """
    match = _RANGE_RE.fullmatch(header.strip()) if header else None
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        return _suffix_range(last, size)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiableError(header)
    end = min(int(last) + 1, size) if last else size
    return ByteRange(start, end)


def _suffix_range(length_text: str, size: int) -> ByteRange | None:
    if not length_text:
        return None
    length = int(length_text)
    if length == 0:
        raise RangeNotSatisfiableError(f"bytes=-{length_text}")
    return ByteRange(max(size - length, 0), size)
