"""Unit tests of :mod:`watcher.models`: ids, kinds, project lists and the API's project object."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from watcher.errors import InvalidProjectId, WatcherError
from watcher.models import (
    ACTIVE_STATES,
    FINAL_STATES,
    MAX_ID_LENGTH,
    URL_CACHE_LENGTH,
    Kind,
    ProjectRef,
    ProjectSnapshot,
    RemoteStatus,
    State,
    parse_kind,
    parse_project_list,
    parse_project_spec,
    parsed_url,
    validate_project_id,
)

GOOD_IDS = [
    "cm2xq9z0k0001abcd1234efgh",
    "cuid-example",
    "a",
    "7",
    "A_b-9",
    "x" * MAX_ID_LENGTH,
]

BAD_IDS = [
    "",
    "../x",
    "..",
    ".hidden",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    "abc\n",
    " abc",
    "a b",
    "a.b",
    "-abc",
    "_abc",
    "x" * (MAX_ID_LENGTH + 1),
    "caf\u00e9",
    "\uff41\uff42\uff43",  # full-width letters
    "\u0661\u0662",  # Arabic-Indic digits
    "a:b",
    "%2e%2e",
]


def _project(**overrides: Any) -> dict[str, Any]:
    """A complete image project as the API returns it, with ``overrides`` applied."""
    body: dict[str, Any] = {
        "id": "cm2xproj0001",
        "name": "portrait",
        "status": "complete",
        "type": "AI_IMAGE",
        "created_at": "2024-10-18T05:16:19.027Z",
        "enabled": True,
        "credits_charged": 5,
        "downloads": [
            {"url": "https://cdn.example/a/output.png", "expires_at": "2024-10-19T05:16:19.027Z"}
        ],
        "error": None,
        "image_count": 1,
        "total_frame_cost": 5,
    }
    body.update(overrides)
    return body


# --- ids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", GOOD_IDS)
def test_valid_ids_are_returned_unchanged(raw: str) -> None:
    """A cuid-like id of letters, digits, '-' and '_' is accepted as is."""
    assert validate_project_id(raw) == raw


@pytest.mark.parametrize("raw", BAD_IDS)
def test_invalid_ids_are_refused(raw: str) -> None:
    """Ids that are empty, too long, non-ASCII or could act as a path are refused."""
    with pytest.raises(InvalidProjectId, match="invalid project id"):
        validate_project_id(raw)


def test_invalid_project_id_is_a_watcher_error_and_a_value_error() -> None:
    """Callers may catch a bad id either as the watcher's root error or as a ValueError."""
    with pytest.raises(WatcherError):
        validate_project_id("../x")
    with pytest.raises(ValueError, match="invalid project id"):
        validate_project_id("../x")


def test_overlong_id_is_shortened_in_the_message() -> None:
    """An absurdly long id is cut in the error message, so a log line stays readable."""
    raw = "y" * 10_000
    with pytest.raises(InvalidProjectId) as caught:
        validate_project_id(raw)
    message = str(caught.value)
    assert "y" * MAX_ID_LENGTH + "…" in message
    assert len(message) < 300


# --- kinds and states ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "kind"),
    [("image", Kind.IMAGE), ("VIDEO", Kind.VIDEO), (" Audio ", Kind.AUDIO)],
)
def test_kinds_parse_case_insensitively(raw: str, kind: Kind) -> None:
    """Kind names are read regardless of case and surrounding spaces."""
    assert parse_kind(raw) is kind


def test_unknown_kind_lists_the_known_ones() -> None:
    """An unknown kind is refused with a message naming every valid kind."""
    with pytest.raises(InvalidProjectId, match="image, video, audio"):
        parse_kind("gif")


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        (Kind.IMAGE, "/v1/image-projects"),
        (Kind.VIDEO, "/v1/video-projects"),
        (Kind.AUDIO, "/v1/audio-projects"),
    ],
)
def test_kind_api_paths(kind: Kind, path: str) -> None:
    """Each kind selects its own collection of the API."""
    assert kind.api_path == path


def test_terminal_statuses_are_complete_error_and_canceled() -> None:
    """Only complete, error and canceled are terminal, as the API documents."""
    terminal = {status for status in RemoteStatus if status.is_terminal}
    assert terminal == {RemoteStatus.COMPLETE, RemoteStatus.ERROR, RemoteStatus.CANCELED}


def test_states_split_into_active_and_final() -> None:
    """Every state is either active or final, and only saved/deleted count as success."""
    assert set(State) == ACTIVE_STATES | FINAL_STATES
    assert not ACTIVE_STATES & FINAL_STATES
    assert {s for s in State if not s.is_final} == {
        State.POLLING,
        State.DOWNLOADING,
        State.DELETING,
    }
    assert {s for s in State if s.is_success} == {State.SAVED, State.DELETED}


# --- specs and lists -----------------------------------------------------------------------------


def test_bare_id_takes_the_default_kind() -> None:
    """A spec without a kind uses the default kind."""
    assert parse_project_spec("cm2xabc") == ProjectRef(Kind.IMAGE, "cm2xabc")
    assert parse_project_spec("cm2xabc", Kind.AUDIO) == ProjectRef(Kind.AUDIO, "cm2xabc")


def test_kind_prefix_selects_the_kind() -> None:
    """``KIND:ID`` selects the kind, whatever the default."""
    assert parse_project_spec("video:cm2xabc", Kind.AUDIO) == ProjectRef(Kind.VIDEO, "cm2xabc")
    assert parse_project_spec("  AUDIO:cm2xabc \n") == ProjectRef(Kind.AUDIO, "cm2xabc")


def test_project_ref_prints_as_kind_colon_id() -> None:
    """A ref prints in the same ``KIND:ID`` form it is parsed from."""
    ref = ProjectRef(Kind.VIDEO, "cm2xabc")
    assert str(ref) == "video:cm2xabc"
    assert parse_project_spec(str(ref)) == ref


@pytest.mark.parametrize(
    "spec", ["", "video:", ":cm2xabc", "gif:cm2xabc", "video:../x", "image:a:b", "/abs/path"]
)
def test_bad_specs_are_refused(spec: str) -> None:
    """A spec with an empty or unsafe id or an unknown kind is refused."""
    with pytest.raises(InvalidProjectId):
        parse_project_spec(spec)


def test_list_splits_on_commas_and_any_whitespace() -> None:
    """Commas, spaces, tabs and newlines all separate entries; empty entries are skipped."""
    refs = parse_project_list(" a1, b2  c3\n\td4,,e5 ,\n")
    assert [ref.id for ref in refs] == ["a1", "b2", "c3", "d4", "e5"]
    assert {ref.kind for ref in refs} == {Kind.IMAGE}


def test_list_accepts_kind_prefixes_and_the_default_kind() -> None:
    """Entries may carry their own kind; the rest take the default kind."""
    refs = parse_project_list("video:v1, audio:a1 plain", Kind.VIDEO)
    assert refs == [
        ProjectRef(Kind.VIDEO, "v1"),
        ProjectRef(Kind.AUDIO, "a1"),
        ProjectRef(Kind.VIDEO, "plain"),
    ]


def test_list_keeps_the_first_of_duplicates() -> None:
    """A repeated id is tracked once, as its first mention says, in first-seen order."""
    refs = parse_project_list("b1, a1, video:a1, b1, audio:a1")
    assert refs == [ProjectRef(Kind.IMAGE, "b1"), ProjectRef(Kind.IMAGE, "a1")]


@pytest.mark.parametrize("text", ["", "   ", ",,,", "\n\t ,"])
def test_empty_list_is_empty(text: str) -> None:
    """A blank list names no projects (and is not an error)."""
    assert parse_project_list(text) == []


def test_every_bad_entry_is_reported_at_once() -> None:
    """All bad entries appear in one error, so an operator fixes the list in one go."""
    with pytest.raises(InvalidProjectId) as caught:
        parse_project_list("good1, ../x, gif:abc, good2, /etc/passwd, video:")
    message = str(caught.value)
    for bad in ("'../x'", "'gif'", "'/etc/passwd'", "''"):
        assert bad in message
    assert message.count(";") == 3
    assert "good1" not in message
    assert "good2" not in message


# --- the project object --------------------------------------------------------------------------


def test_snapshot_reads_the_fields_the_watcher_acts_on() -> None:
    """A complete project yields its id, status, enabled flag and download links."""
    snapshot = ProjectSnapshot.parse(_project())
    assert snapshot.id == "cm2xproj0001"
    assert snapshot.status is RemoteStatus.COMPLETE
    assert snapshot.enabled is True
    assert snapshot.error is None
    [link] = snapshot.downloads
    assert link.url == "https://cdn.example/a/output.png"
    assert link.expires_at == datetime(2024, 10, 19, 5, 16, 19, 27_000, tzinfo=UTC)


def test_snapshot_ignores_unknown_and_deprecated_fields() -> None:
    """Deprecated fields may be missing or present and new fields are ignored."""
    with_extras = _project(
        download={"url": "https://cdn.example/old", "expires_at": "2024-10-19T05:16:19Z"},
        brand_new_field={"nested": [1, 2, 3]},
    )
    without_deprecated = _project()
    del without_deprecated["total_frame_cost"]
    assert ProjectSnapshot.parse(with_extras) == ProjectSnapshot.parse(without_deprecated)
    assert "brand_new_field" not in ProjectSnapshot.parse(with_extras).model_dump()


def test_snapshot_needs_only_id_and_status() -> None:
    """A minimal object is enough; the optional fields take safe defaults."""
    snapshot = ProjectSnapshot.parse({"id": "p1", "status": "queued"})
    assert snapshot.status is RemoteStatus.QUEUED
    assert snapshot.enabled is True
    assert snapshot.downloads == []
    assert snapshot.error is None


def test_snapshot_reads_the_error_object() -> None:
    """A project in error carries the API's code and message."""
    snapshot = ProjectSnapshot.parse(
        _project(
            status="error",
            downloads=[],
            error={"code": "no_source_face", "message": "Please use an image with a face"},
        )
    )
    assert snapshot.status is RemoteStatus.ERROR
    assert snapshot.error is not None
    assert snapshot.error.code == "no_source_face"


def test_snapshot_reads_a_deleted_project() -> None:
    """``enabled: false`` (a deleted project) is read, not defaulted to true."""
    assert ProjectSnapshot.parse(_project(enabled=False)).enabled is False


@pytest.mark.parametrize("status", ["done", "COMPLETE", "", None, 3])
def test_snapshot_rejects_an_unknown_status(status: object) -> None:
    """A status outside the documented six is refused rather than guessed."""
    with pytest.raises(pydantic.ValidationError):
        ProjectSnapshot.parse(_project(status=status))


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "complete",
        {"status": "complete"},
        {"id": "p1"},
        {"id": "p1", "status": "complete", "downloads": [{"url": "https://x"}]},
        {"id": "p1", "status": "complete", "downloads": [{"url": "u", "expires_at": "soon"}]},
    ],
)
def test_snapshot_rejects_malformed_objects(data: object) -> None:
    """A body that is not a project object (or misses what the watcher needs) is refused."""
    with pytest.raises(pydantic.ValidationError):
        ProjectSnapshot.parse(data)


def test_snapshot_is_immutable() -> None:
    """A snapshot cannot be changed after parsing."""
    snapshot = ProjectSnapshot.parse(_project())
    with pytest.raises(pydantic.ValidationError):
        snapshot.status = RemoteStatus.QUEUED  # type: ignore[misc]


def _link(
    url: str = "https://cdn.example/a.png", expires_at: object = "2030-01-01T00:00:00Z"
) -> Any:
    return _project(downloads=[{"url": url, "expires_at": expires_at}])


@pytest.mark.parametrize(
    "expires_at",
    [
        "0001-01-01T00:00:00",
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+05:00",
        "9999-12-31T23:59:59-05:00",
        "1969-12-31T23:59:59Z",
        -1e12,
    ],
)
def test_an_expiry_no_timestamp_can_hold_is_refused(expires_at: object) -> None:
    """Year 1, a date that overflows once in UTC, or one before 1970 is refused when parsed,
    so nothing later calls ``.timestamp()`` on it and crashes."""
    with pytest.raises(pydantic.ValidationError, match=r"out of range|valid datetime"):
        ProjectSnapshot.parse(_link(expires_at=expires_at))


@pytest.mark.parametrize(
    ("expires_at", "seconds"),
    [
        ("2024-10-19T05:16:19", 1729314979.0),
        ("2024-10-19T07:16:19+02:00", 1729314979.0),
        ("9999-12-31T23:59:59", 253402300799.0),
    ],
)
def test_an_expiry_is_an_aware_utc_instant(expires_at: str, seconds: float) -> None:
    """A time without an offset is UTC, whatever the host's zone; an offset is honoured."""
    [link] = ProjectSnapshot.parse(_link(expires_at=expires_at)).downloads
    assert link.expires_at.tzinfo is UTC
    assert link.expires_at.timestamp() == seconds


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://cdn.example/a.png",
        "javascript:alert(1)",
        "/relative/a.png",
        "https://",
        "https://cdn.example/a\x00.png",
        "https://cdn.example:port/a.png",
        "https://cdn.example/" + "a" * 9000,
    ],
)
def test_a_download_url_that_is_not_http_is_refused(url: str) -> None:
    """Only absolute http(s) URLs the download's own parser accepts are taken."""
    with pytest.raises(pydantic.ValidationError, match="download URL"):
        ProjectSnapshot.parse(_link(url=url))


@pytest.mark.parametrize("enabled", ["false", 0, "no", None])
def test_enabled_of_the_wrong_type_is_refused(enabled: object) -> None:
    """``enabled`` must be a JSON boolean: "false" or 0 is refused rather than guessed."""
    with pytest.raises(pydantic.ValidationError):
        ProjectSnapshot.parse(_project(enabled=enabled))


def test_an_error_object_may_have_nulls_and_is_bounded() -> None:
    """An error object with a null code and a megabyte of message is read, shortened."""
    snapshot = ProjectSnapshot.parse(
        _project(status="error", downloads=[], error={"code": None, "message": "x" * 1_000_000})
    )
    assert snapshot.error is not None
    assert snapshot.error.code is None
    assert snapshot.error.message is not None
    assert len(snapshot.error.message) <= 2001


def test_a_download_url_is_parsed_once_and_a_long_one_is_not_kept() -> None:
    """The snapshot's parse is the download's: the same ``httpx.URL``; one past the cache's
    length is parsed again each time, equal but not kept."""
    url = "https://cdn.example/once/output.png?X-Amz-Signature=abc"
    link = {"url": url, "expires_at": "2030-01-01T00:00:00Z"}
    snapshot = ProjectSnapshot.parse(_project(downloads=[link]))
    assert parsed_url(snapshot.downloads[0].url) is parsed_url(url)
    long = "https://cdn.example/long/output.png?sig=" + "a" * URL_CACHE_LENGTH
    assert parsed_url(long) == parsed_url(long)
    assert parsed_url(long) is not parsed_url(long)
