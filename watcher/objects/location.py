"""Where outputs go in object storage: ``WATCHER_STORAGE_URL`` parsed, and the keys under it.

``s3://bucket/prefix`` (AWS S3 and any S3-compatible service), ``gs://bucket/prefix`` (Google
Cloud Storage), ``az://container/prefix`` (Azure Blob Storage). An output's key is
``<prefix>/<kind>/<project id>/<index>-<name>``, the same relative path as on disk
(:func:`watcher.paths.output_relpath`); an upload in flight runs under a unique temporary key
below ``<prefix>/.parts/``, which no output's key can be (a kind never starts with a dot).

This module only parses and names; :mod:`watcher.objects.bucket` talks to the service.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

SCHEMES = {"s3": "S3", "gs": "GCS", "az": "Azure"}
PARTS_PREFIX = ".parts"
PART_SUFFIX = ".part"
# Bucket and container names of the three services: lowercase letters, digits, dots, hyphens
# (underscores only in old S3 buckets), 3 to 63 characters.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
_SEGMENT = re.compile(r"[A-Za-z0-9._=+-]+")


@dataclass(frozen=True, slots=True)
class StorageLocation:
    """A bucket (or container) and the prefix every key of this watcher is under."""

    scheme: str
    bucket: str
    prefix: str = ""

    @property
    def service(self) -> str:
        """The service's name for people: S3, GCS or Azure."""
        return SCHEMES[self.scheme]

    def key(self, relpath: str) -> str:
        """The full key of ``relpath`` (what a listing of the bucket shows)."""
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def url(self, relpath: str = "") -> str:
        """``scheme://bucket/<prefix>/<relpath>``: how status, the API and notifications name
        an object."""
        key = self.key(relpath) if relpath else self.prefix
        return f"{self.scheme}://{self.bucket}/{key}" if key else f"{self.scheme}://{self.bucket}"

    def __str__(self) -> str:
        return self.url()


def parse_storage_url(value: str) -> StorageLocation:
    """The location ``value`` names; :class:`ValueError` with a message for an operator."""
    parts = urlsplit(value.strip())
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError("expected s3://bucket/prefix, gs://bucket/prefix or az://container/prefix")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError(
            "must not carry credentials: they come from the service's standard variables "
            "(AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY, ...)"
        )
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(
            f"{bucket!r} is not a bucket name (3 to 63 lowercase letters, digits, dots, hyphens)"
        )
    segments = [s for s in parts.path.split("/") if s]
    for segment in segments:
        if segment in {".", ".."} or not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"the prefix segment {segment!r} is not allowed (letters, digits and . _ = + -)"
            )
    return StorageLocation(scheme, bucket, "/".join(segments))


def upload_key(relpath: str, nonce: str | None = None) -> str:
    """A fresh temporary key for an upload of ``relpath`` (relative to the prefix), unique per
    attempt: ``.parts/<relpath>.<nonce>.part``."""
    return f"{PARTS_PREFIX}/{relpath}.{nonce or secrets.token_hex(8)}{PART_SUFFIX}"


def is_upload_key(key: str) -> bool:
    """Whether ``key`` (relative to the prefix) is a temporary key of an upload."""
    path = PurePosixPath(key)
    return path.parts[:1] == (PARTS_PREFIX,) and key.endswith(PART_SUFFIX)


def project_of_upload_key(key: str) -> str | None:
    """The project id a temporary key belongs to (``.parts/<kind>/<id>/...``), if it has one."""
    parts = PurePosixPath(key).parts
    return parts[2] if len(parts) >= 4 and is_upload_key(key) else None
