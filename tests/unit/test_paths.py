"""Unit tests of :mod:`watcher.paths`: file names from untrusted URLs, and where outputs land."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest

from watcher.errors import InvalidProjectId
from watcher.models import Kind
from watcher.paths import (
    MAX_NAME_LENGTH,
    PART_SUFFIX,
    is_part_name,
    legacy_part_path,
    may_be_part_name,
    output_relpath,
    part_path,
    resolve_inside,
    safe_file_name,
)

CDN = "https://videos.magichour.ai/id/cm2xabc"
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"{CDN}/output.png", "output.png"),
        (f"{CDN}/output.mp4?X-Amz-Signature=abc&X-Amz-Expires=86400#frag", "output.mp4"),
        (f"{CDN}/my%20clip%20(1).mp4", "my_clip_1_.mp4"),
        (f"{CDN}/caf%C3%A9.png", "caf_.png"),
        ("output.png", "output.png"),
    ],
)
def test_name_is_the_urls_last_segment_made_safe(url: str, expected: str) -> None:
    """The name is the decoded last path segment, with unsafe runs replaced by ``_``."""
    assert safe_file_name(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        f"{CDN}/../../etc/passwd",
        f"{CDN}/..",
        f"{CDN}/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        f"{CDN}/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        f"{CDN}/%2e%2e",
        f"{CDN}/%252e%252e%252fpasswd",
        f"{CDN}/..%5c..%5cwindows%5csystem32",
        "/etc/passwd",
        "file:///etc/passwd",
        f"{CDN}/a%00b.png",
        f"{CDN}/.bashrc",
        f"{CDN}/-rf",
        f"{CDN}/line%0Abreak.png",
    ],
)
def test_hostile_names_become_plain_file_names(url: str) -> None:
    """Traversal, separators, NUL, control characters and leading dots never survive."""
    name = safe_file_name(url)
    assert SAFE.fullmatch(name), name
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert name not in {".", ".."}
    assert len(name) <= MAX_NAME_LENGTH


def test_encoded_traversal_keeps_only_the_last_segment() -> None:
    """A percent-encoded ``../`` is decoded before the last segment is taken."""
    assert safe_file_name(f"{CDN}/%2e%2e%2f%2e%2e%2fetc%2fpasswd") == "passwd"
    assert safe_file_name(f"{CDN}/..%2F..%2Fsecret.png") == "secret.png"


def test_nul_is_dropped() -> None:
    """An encoded NUL disappears from the name instead of truncating it."""
    assert safe_file_name(f"{CDN}/out%00put.png") == "output.png"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "https://cdn.example",
        "https://cdn.example/",
        "https://cdn.example/?name=x.png",
        f"{CDN}/..",
        f"{CDN}/%2e%2e",
        f"{CDN}/...",
        f"{CDN}/%00",
        f"{CDN}/%E2%9C%93",
        f"{CDN}/---",
    ],
)
def test_empty_or_hopeless_names_use_the_fallback(url: str) -> None:
    """A URL whose last segment leaves nothing usable gets the fallback name."""
    assert safe_file_name(url) == "output"
    assert safe_file_name(url, fallback="result") == "result"


def test_long_names_are_cut_but_keep_their_extension() -> None:
    """A very long name is cut to the limit and keeps its extension."""
    name = safe_file_name(f"{CDN}/{'a' * 500}.mp4")
    assert len(name) == MAX_NAME_LENGTH
    assert name.endswith(".mp4")
    assert name.startswith("a" * 50)


def test_long_extension_is_cut_too() -> None:
    """An absurd extension is shortened as well, so the name still fits."""
    name = safe_file_name(f"{CDN}/{'b' * 300}.{'x' * 300}")
    assert len(name) == MAX_NAME_LENGTH
    assert name.endswith("." + "x" * 16)


def test_long_name_without_extension_is_cut() -> None:
    """A long name without a dot is cut to the limit."""
    assert safe_file_name(f"{CDN}/{'c' * 500}") == "c" * MAX_NAME_LENGTH


def test_name_at_the_limit_is_kept_whole() -> None:
    """A name exactly at the limit is not touched."""
    name = "d" * (MAX_NAME_LENGTH - 4) + ".png"
    assert safe_file_name(f"{CDN}/{name}") == name


@pytest.mark.parametrize(
    ("kind", "index", "url", "expected"),
    [
        (Kind.IMAGE, 0, f"{CDN}/output.png", "image/cm2xabc/0-output.png"),
        (Kind.VIDEO, 3, f"{CDN}/clip.mp4?sig=1", "video/cm2xabc/3-clip.mp4"),
        (Kind.AUDIO, 1, "https://cdn.example/", "audio/cm2xabc/1-output"),
        (Kind.IMAGE, 2, f"{CDN}/%2e%2e%2f%2e%2e%2fx.png", "image/cm2xabc/2-x.png"),
    ],
)
def test_output_layout(kind: Kind, index: int, url: str, expected: str) -> None:
    """Outputs are laid out as ``<kind>/<project id>/<index>-<file name>``."""
    assert output_relpath(kind, "cm2xabc", index, url) == expected


def test_same_file_name_in_two_projects_does_not_collide() -> None:
    """Every project's ``output.png`` gets its own path (the SDK overwrites them)."""
    first = output_relpath(Kind.IMAGE, "p1", 0, f"{CDN}/output.png")
    second = output_relpath(Kind.IMAGE, "p2", 0, f"{CDN}/output.png")
    third = output_relpath(Kind.IMAGE, "p1", 1, f"{CDN}/output.png")
    assert len({first, second, third}) == 3


@pytest.mark.parametrize("project_id", ["../x", "", "a/b", "/abs", "a\x00"])
def test_layout_refuses_a_bad_project_id(project_id: str) -> None:
    """An id that could act as a path is refused before any path is built."""
    with pytest.raises(InvalidProjectId):
        output_relpath(Kind.IMAGE, project_id, 0, f"{CDN}/output.png")


def test_resolve_inside_joins_under_the_root(tmp_path: Path) -> None:
    """A well-formed relative path resolves under the download directory."""
    target = resolve_inside(tmp_path, "image/p1/0-output.png")
    assert target == tmp_path.resolve() / "image" / "p1" / "0-output.png"


@pytest.mark.parametrize(
    "relpath",
    [
        "../outside.png",
        "image/../../outside.png",
        "image/p1/../../../etc/passwd",
        "/etc/passwd",
        "image/p1/0-a\x00.png",
    ],
)
def test_resolve_inside_refuses_escapes(tmp_path: Path, relpath: str) -> None:
    """Absolute paths, ``..`` and NUL are refused, whatever they would resolve to."""
    with pytest.raises(InvalidProjectId, match="outside the download directory"):
        resolve_inside(tmp_path / "downloads", relpath)


def test_resolve_inside_refuses_a_symlink_out(tmp_path: Path) -> None:
    """A symlink inside the root that points outside it is not followed out."""
    root = tmp_path / "downloads"
    (root / "image").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "image" / "p1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidProjectId):
        resolve_inside(root, "image/p1/0-output.png")


def test_part_path_sits_beside_the_final_file(tmp_path: Path) -> None:
    """The temporary file is the final name, hidden and with ``.part``, in the same directory."""
    final = tmp_path / "image" / "p1" / "0-output.png"
    assert part_path(final) == final.parent / (".0-output.png" + PART_SUFFIX)
    assert legacy_part_path(final) == final.parent / ("0-output.png" + PART_SUFFIX)


@pytest.mark.parametrize(
    "url",
    [
        f"{CDN}/output.png",
        f"{CDN}/video.part",
        f"{CDN}/.part",
        f"{CDN}/x.part.part",
        f"{CDN}/.hidden.part",
        f"{CDN}/%2e0-output.png.part",
        "https://cdn.example/",
        f"{CDN}/{'p' * 300}.part",
    ],
)
@pytest.mark.parametrize("index", [0, 7, 12])
def test_no_output_can_take_a_temporary_name(url: str, index: int) -> None:
    """Whatever the URL's name ends with, an output's name is never a temporary file's, and a
    temporary file's name is never an output's: a sweep of temporary files cannot hit one."""
    relpath = output_relpath(Kind.VIDEO, "cm2xabc", index, url)
    name = PurePosixPath(relpath).name
    assert not is_part_name(name), name
    assert is_part_name(part_path(Path(relpath)).name)
    assert part_path(Path(relpath)).name != name


def test_an_earlier_versions_part_name_may_be_an_outputs() -> None:
    """``<name>.part`` (earlier versions' temporary name) is also what an output named from a URL
    ending in ``.part`` is called: only the store can tell them apart."""
    name = PurePosixPath(output_relpath(Kind.VIDEO, "cm2xabc", 0, f"{CDN}/video.part")).name
    assert name == "0-video.part"
    assert may_be_part_name(name)
    assert not is_part_name(name)
