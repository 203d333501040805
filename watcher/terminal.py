"""Text for people's terminals: what the watcher prints is shown, never obeyed.

Error messages come from the Magic Hour API, ids and notes from the store or from a control API
at ``--url``; any of them may hold escape sequences that would retitle, clear or recolour the
operator's terminal, a carriage return that overwrites a line, or a bidirectional override that
reorders one. :func:`printable` is the one helper every human-facing output goes through (the
status table, error lines, console logs). JSON output needs none: it escapes them itself.
"""

from __future__ import annotations

import re

# C0 and C1 controls (ESC, CR, LF, BEL, CSI...), DEL, lone surrogates (unprintable: they would
# crash the write), and the invisible format characters that reorder or hide text.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control or invisible formatting character shown as ``\\xNN`` or
    ``\\uNNNN``; printable text (any script) is left as it is."""
    return _UNSAFE.sub(_escape, text)
