"""Where an output is saved: ``<kind>/<project id>/<index>-<file name>`` under the download
directory, and never anywhere else.

The file name comes from the download URL's last path segment (what the official SDK uses), so it
is untrusted: it is percent-decoded, stripped to a safe alphabet, kept short, and the resolved path
is checked to lie inside the download directory. Project ids are validated at ``track`` time and
cannot contain a separator or a dot.

An output's name always starts with its index (a digit), so the temporary name it is written under
until verified, ``.<final name>.part``, is one no output can take: a clean-up that removes
temporary files cannot hit an output, whatever the URL's name ends with. Earlier versions
wrote ``<final name>.part`` (:func:`legacy_part_path`); such a name *can* be an output's (a URL
ending in ``.part``), so those files are only resumed, or removed when the store says they are
not an output.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from watcher.errors import InvalidProjectId
from watcher.models import Kind, validate_project_id

MAX_NAME_LENGTH = 100
PART_PREFIX = "."
PART_SUFFIX = ".part"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(url: str, fallback: str = "output") -> str:
    """A file name derived from ``url`` that is safe on any filesystem."""
    segment = PurePosixPath(unquote(urlsplit(url).path)).name
    name = _UNSAFE.sub("_", segment.replace("\x00", "")).lstrip("._-")
    if not name:
        return fallback
    if len(name) > MAX_NAME_LENGTH:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:16] if dot and stem else ""
        name = name[: MAX_NAME_LENGTH - len(ext) - 1] + "." + ext if ext else name[:MAX_NAME_LENGTH]
    return name


def output_relpath(kind: Kind, project_id: str, index: int, url: str) -> str:
    """The output's path relative to the download directory (always with ``/``)."""
    validate_project_id(project_id)
    return f"{kind.value}/{project_id}/{index}-{safe_file_name(url)}"


def resolve_inside(root: Path, relpath: str) -> Path:
    """``root / relpath``, refusing anything that would land outside ``root`` (a symlink out
    included). ``root`` is resolved once per process (:func:`_resolved_root`): it is the
    download directory, resolved again for every output otherwise (a ``realpath`` per call)."""
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts or "\x00" in relpath:
        raise InvalidProjectId(f"refusing output path outside the download directory: {relpath!r}")
    base = _resolved_root(root)
    target = os.path.realpath(base + os.sep + relpath)
    if not (target + os.sep).startswith(base.rstrip(os.sep) + os.sep):
        raise InvalidProjectId(f"refusing output path outside the download directory: {relpath!r}")
    return Path(target)


@functools.lru_cache(maxsize=16)
def _resolved_root(root: Path) -> str:
    """``root`` with every symlink resolved, as a string."""
    return str(root.resolve())


def part_path(final: Path) -> Path:
    """The temporary name an output is written under until it is verified (hidden, beside it)."""
    return final.with_name(PART_PREFIX + final.name + PART_SUFFIX)


def legacy_part_path(final: Path) -> Path:
    """The temporary name earlier versions used: ``<final name>.part``."""
    return final.with_name(final.name + PART_SUFFIX)


def is_part_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of this version (never an output's name)."""
    return (
        name.startswith(PART_PREFIX)
        and name.endswith(PART_SUFFIX)
        and len(name) > len(PART_PREFIX + PART_SUFFIX)
    )


def may_be_part_name(name: str) -> bool:
    """Whether ``name`` may be a temporary file of this version or an earlier one (an earlier
    one's can also be an output's name: ask the store before removing it)."""
    return name.endswith(PART_SUFFIX)
