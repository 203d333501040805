"""Outputs to object storage (``WATCHER_STORAGE_URL``: S3 and S3-compatible services, GCS,
Azure) instead of the download directory, with the same guarantees.

The order of writes for one output (what makes ``kill -9`` at any instant safe), beside the
disk's in :mod:`watcher.downloader`:

1. The store records the output's temporary key, ``<prefix>/.parts/<kind>/<id>/<index>-<name>.
   <random>.part`` (:func:`~watcher.objects.location.upload_key`), *before* the first byte is
   sent. A fresh key per attempt: two attempts never share an upload.
2. The CDN's body streams into a multipart upload (one PUT if it fits in a part) to the
   temporary key, hashed on the way; the upload is completed (the object appears, whole) only
   once the body verifiably ended, and aborted otherwise.
3. The store records the output ``verified`` (size, sha256).
4. The temporary object is written under the final key ``<prefix>/<kind>/<id>/<index>-<name>``
   with its sha256 as metadata, re-hashed on the way (a mismatch aborts): the final object
   appears only whole and verified, never partial.
5. The final object is confirmed: its size and recorded sha256 match the store's record.
6. The temporary object is deleted.
7. The store records the output ``saved`` (and forgets the temporary key). Only then may a
   DELETE be sent to Magic Hour, and a saved output is never uploaded again.

After a crash: an output ``pending`` with a temporary key has its temporary object deleted (if
its upload had completed) and starts again under a new key; one ``verified`` is finished from
the bucket (:meth:`Uploader.finish`): a confirmed final object is accepted as is, a temporary
object of the recorded size is published (steps 4 to 7), anything else is fetched again. At
start-up, temporary objects of projects no longer downloading are removed, and on a project's
final state its own. A multipart upload (an output larger than one part; a smaller one goes up
in one PUT) cut by ``kill -9`` in step 2 or 4 leaves parts the
service keeps out of sight (no object appears); obstore cannot list them, so a bucket lifecycle
rule (``AbortIncompleteMultipartUpload``, see the README) removes them.

Start-up (:func:`check_storage`): the bucket must exist and the credentials must list, write
and delete, or ``watcher run`` exits 2 with one line before it claims any project.
"""

from __future__ import annotations

from watcher.errors import ConfigError, ObjectStorageError
from watcher.objects.bucket import Bucket, ObjectInfo, open_store
from watcher.objects.location import (
    StorageLocation,
    is_upload_key,
    parse_storage_url,
    project_of_upload_key,
    upload_key,
)
from watcher.objects.recovery import remove_uploads, sweep_uploads
from watcher.objects.uploader import SavedObject, Uploader

__all__ = [
    "Bucket",
    "ObjectInfo",
    "SavedObject",
    "StorageLocation",
    "Uploader",
    "check_storage",
    "is_upload_key",
    "open_bucket",
    "parse_storage_url",
    "project_of_upload_key",
    "remove_uploads",
    "sweep_uploads",
    "upload_key",
]


def open_bucket(location: StorageLocation, *, allow_http: bool, timeout: float) -> Bucket:
    """The bucket of ``location`` (nothing is sent yet)."""
    return Bucket(location, open_store(location, allow_http=allow_http, timeout=timeout))


async def check_storage(bucket: Bucket, replica_id: str) -> None:
    """:class:`ConfigError` (one line) unless ``bucket`` exists and may be written."""
    try:
        await bucket.check(f"probe-{_safe(replica_id)}")
    except ObjectStorageError as exc:
        raise ConfigError(
            f"WATCHER_STORAGE_URL: {exc}; check that the bucket exists and that the credentials "
            "may list, write and delete in it"
        ) from None


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:100]
