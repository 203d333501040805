"""Unit tests of object storage's names: WATCHER_STORAGE_URL parsed (and refused clearly), the
keys of outputs and of uploads in flight, and outputs named by URL in status and events."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.errors import ConfigError
from watcher.models import Kind, State
from watcher.objects import is_upload_key, parse_storage_url, project_of_upload_key, upload_key
from watcher.settings import load_settings
from watcher.store import OutputRecord, OutputState, ProjectRecord
from watcher.views import notification_event, project_json


@pytest.mark.parametrize(
    ("url", "scheme", "bucket", "prefix"),
    [
        ("s3://media/watcher/outputs", "s3", "media", "watcher/outputs"),
        ("s3://media", "s3", "media", ""),
        ("gs://my.bucket/p/", "gs", "my.bucket", "p"),
        ("az://container-1//x//y", "az", "container-1", "x/y"),
    ],
)
def test_storage_urls_name_a_bucket_and_a_prefix(
    url: str, scheme: str, bucket: str, prefix: str
) -> None:
    """s3://, gs:// and az:// URLs give the bucket and a prefix without empty segments."""
    location = parse_storage_url(url)
    assert (location.scheme, location.bucket, location.prefix) == (scheme, bucket, prefix)
    assert location.url("video/p1/0-a.mp4") == (
        f"{scheme}://{bucket}/{prefix + '/' if prefix else ''}video/p1/0-a.mp4"
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://media/x", "expected s3://"),
        ("s3://AKIA:secret@media/x", "must not carry credentials"),
        ("s3://media/x?token=abc", "query string"),
        ("s3://a/x", "is not a bucket name"),
        ("s3://media/../x", "is not allowed"),
        ("s3://media/a b", "is not allowed"),
    ],
)
def test_a_bad_storage_url_is_one_line_that_never_echoes_it(url: str, problem: str) -> None:
    """A bad WATCHER_STORAGE_URL is a ConfigError of one line naming the variable, without the
    value (which may carry a key given by mistake)."""
    with pytest.raises(ConfigError) as caught:
        load_settings({"WATCHER_STORAGE_URL": url})
    message = str(caught.value)
    assert message.startswith("WATCHER_STORAGE_URL: ")
    assert problem in message
    assert "\n" not in message
    assert "secret" not in message
    assert "token=abc" not in message


def test_an_empty_storage_url_means_the_download_dir() -> None:
    """Unset or empty, outputs go to disk as before."""
    assert load_settings({"WATCHER_STORAGE_URL": ""}).storage is None
    assert load_settings({}).storage is None


def test_upload_keys_are_fresh_per_attempt_and_belong_to_their_project() -> None:
    """Each attempt gets its own temporary key under .parts/, which names its project and can
    never be an output's key."""
    rel = "video/cm1/0-out.mp4"
    first, second = upload_key(rel), upload_key(rel)
    assert first != second
    assert first.startswith(f".parts/{rel}.")
    assert is_upload_key(first)
    assert not is_upload_key(rel)
    assert project_of_upload_key(first) == "cm1"
    assert project_of_upload_key(".parts/probe-host") is None


def records() -> tuple[ProjectRecord, list[OutputRecord]]:
    project = ProjectRecord(
        id="cm1",
        kind=Kind.VIDEO,
        state=State.SAVED,
        remote_status=None,
        delete_after_download=False,
        due_at=0.0,
        attempt=0,
        polls=1,
        tracked_at=1.0,
        updated_at=2.0,
    )
    outputs = [
        OutputRecord("cm1", 0, "https://cdn/x", 9.0, "video/cm1/0-out.mp4", OutputState.SAVED, 5),
        OutputRecord("cm1", 1, "https://cdn/y", 9.0, "video/cm1/1-b.mp4", OutputState.PENDING),
    ]
    return project, outputs


def test_status_and_events_name_outputs_by_their_object(tmp_path: Path) -> None:
    """In object storage each output is named by its s3:// URL; nothing is read from a disk,
    and an event has no absolute path."""
    project, outputs = records()
    storage = parse_storage_url("s3://media/w")
    (tmp_path / "video" / "cm1").mkdir(parents=True)
    (tmp_path / "video" / "cm1" / ".1-b.mp4.part").write_bytes(b"123")  # not ours to read
    body = project_json(project, outputs, tmp_path, storage)
    assert [o["url"] for o in body["outputs"]] == [
        "s3://media/w/video/cm1/0-out.mp4",
        "s3://media/w/video/cm1/1-b.mp4",
    ]
    assert [o["bytes_received"] for o in body["outputs"]] == [5, None]
    event = notification_event(project, outputs, tmp_path, now=3.0, storage=storage)
    assert [o["url"] for o in event["payload"]["outputs"]] == [o["url"] for o in body["outputs"]]
    assert all("absolute_path" not in o for o in event["payload"]["outputs"])
    on_disk = notification_event(project, outputs, tmp_path, now=3.0)
    assert all("url" not in o and "absolute_path" in o for o in on_disk["payload"]["outputs"])
