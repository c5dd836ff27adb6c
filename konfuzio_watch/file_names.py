"""Names: which files in the inbox are no candidates (hidden, temporary, NAS junk, the user's
globs), and the name a file is uploaded under (one any HTTP stack can carry)."""

from __future__ import annotations

import fnmatch
import re
import unicodedata

BUILTIN_IGNORES = (
    "*.part",
    "*.partial",
    "*.tmp",
    "*.temp",
    "*.crdownload",
    "*.download",
    "*.swp",
    "~$*",
    ".~lock*",
    "@eaDir",
    "#recycle",
    "#snapshot",
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
    "._*",
    "*~",
)
SAFE_NAME_MAX = 120
_TRANSLITERATE = str.maketrans(
    {
        "ß": "ss",
        "æ": "ae",
        "Æ": "AE",
        "ø": "o",
        "Ø": "O",
        "œ": "oe",
        "Œ": "OE",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
        "þ": "th",
        "Þ": "Th",
    }
)


def is_ignored(rel_parts: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """Hidden files, partial/temporary names, NAS junk and the user's globs (on any component)."""
    return ignore_reason(rel_parts, patterns) is not None


def ignore_reason(rel_parts: tuple[str, ...], patterns: tuple[str, ...]) -> str | None:
    """Why a path (its components relative to the inbox) is not a candidate, or None if it is."""
    for part in rel_parts:
        if part.startswith("."):
            return "hidden (its name starts with '.')"
        builtin = next((p for p in BUILTIN_IGNORES if fnmatch.fnmatchcase(part, p)), None)
        if builtin is not None:
            return f"a temporary or system file (built-in pattern {builtin!r})"
    rel = "/".join(rel_parts)
    pattern = next((p for p in patterns if fnmatch.fnmatchcase(rel_parts[-1], p) or fnmatch.fnmatchcase(rel, p)), None)
    return None if pattern is None else f"matches watch.ignore {pattern!r}"


def safe_upload_name(raw_name: bytes, fallback: str) -> str:
    """A name any HTTP stack can carry: ASCII, no controls, no leading dash/dot, bounded length.

    ``Straße März.pdf`` -> ``Strasse Marz.pdf``; ``b'scan\\xff\\n.pdf'`` -> ``scan__.pdf``.
    """
    text = raw_name.decode("utf-8", errors="replace")
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    text = re.sub(r"[^A-Za-z0-9._()\[\] +,=@&'-]", "_", text.translate(_TRANSLITERATE))
    text = text.lstrip("-. ").strip()
    stem, dot, ext = text.rpartition(".")
    if not dot or not stem:
        stem, ext = text, ""
    ext = ext[:16]
    stem = stem[: SAFE_NAME_MAX - len(ext) - 1] or fallback
    return f"{stem}.{ext}" if ext else stem
