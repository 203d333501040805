"""Temporary objects of uploads that will not finish: found through the store and the bucket.

The store records every upload's temporary key before its first byte (:mod:`watcher.objects`,
step 1), so a temporary object belongs to an output whose project the store knows. When that
project reaches a final state its temporary objects are removed; at start-up, those of projects
no longer downloading (a crash's leftovers) are. Objects of projects still active are never
touched here: another replica may be uploading them.
"""

from __future__ import annotations

from watcher.objects.bucket import Bucket
from watcher.objects.location import PARTS_PREFIX, project_of_upload_key
from watcher.store import Store


async def remove_uploads(store: Store, bucket: Bucket, project_id: str) -> int:
    """Delete the temporary objects of a project that has reached its final state; how many.

    The store names them all (a key is recorded before its upload's first byte and forgotten
    only once its object is deleted), so this costs no listing, and nothing for a project that
    never uploaded."""
    keys = sorted({o.upload_key for o in await store.outputs(project_id) if o.upload_key})
    for key in keys:
        await bucket.delete(key)
    return len(keys)


async def sweep_uploads(bucket: Bucket, active: set[str]) -> int:
    """Delete the temporary objects of projects not in ``active``; how many."""
    doomed = [
        key
        for key in await bucket.keys(f"{PARTS_PREFIX}/")
        if (project := project_of_upload_key(key)) is not None and project not in active
    ]
    for key in doomed:
        await bucket.delete(key)
    return len(doomed)
