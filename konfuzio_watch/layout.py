"""Pure: where in done/ a finished file goes, from an admin's template like ``{category}/{date:%Y-%m}/{name}``.

Placeholders: ``{path}`` (the file's path relative to the inbox: the default, today's layout), ``{dir}``
(its folder there, empty at the top), ``{name}``, ``{stem}`` and ``{ext}`` (``{stem}{ext}`` is
``{name}``; ``{ext}`` keeps its dot), ``{category}`` (the name of the document's category),
``{document_id}`` (it takes an int format, ``{document_id:08d}``) and ``{date:<strftime>}`` (the upload
date in UTC; ``{date}`` alone is ``%Y-%m-%d``).

The file's own name is kept byte for byte (docs/results.md promises it, and it was a valid name in the
inbox). What the template adds is made safe for a path component, also on an SMB share: a category
or a date cannot add ``/``, NUL, control characters or ``\\ : * ? " < > |``, cannot start a
component with a dot or dash, and cannot make it ``..``. A ``/`` only comes from the template itself,
from ``{path}``/``{dir}`` or from a date format (``{date:%Y/%m}``: folders by design). A component that
grows past 255 bytes is shortened (its extension and a hash of the whole kept). The result is always
relative and inside done/. Collisions are the caller's business (``files.free_target``).

Paths are ``str`` as ``os.fsdecode`` gives them: a name that is not UTF-8 travels as surrogate escapes
and ``os.fsencode`` of the result gives its bytes back unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import string
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_TEMPLATE = "{path}"
PLACEHOLDERS = ("path", "dir", "name", "stem", "ext", "category", "document_id", "date")
FILE_PLACEHOLDERS = frozenset({"path", "dir", "name", "stem", "ext"})  # kept byte for byte
DISTINCT = ("path", "name", "stem", "document_id")  # at least one: files get names of their own
DEFAULT_DATE_FORMAT = "%Y-%m-%d"
UNCATEGORIZED = "uncategorized"
NO_ID = "unknown"
UNDATED = "undated"
UNNAMED = "unnamed"
NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, SMB)
_UNSAFE = frozenset('/\\:*?"<>|')  # plus NUL and control characters (unicodedata category Cc)
_KNOWN = ", ".join("{date:<strftime>}" if p == "date" else "{" + p + "}" for p in PLACEHOLDERS)


@dataclass(frozen=True)
class _Field:
    name: str
    spec: str


@dataclass(frozen=True)
class _Piece:
    text: str
    from_file: bool  # the file's own path: never changed


def validate(template: str) -> None:
    """Raise a one-line ``ValueError`` naming what is wrong with ``template`` (for config checks)."""
    _parse(template)


def render(
    template: str,
    *,
    path: bytes | str,
    category: str | None = None,
    document_id: int | None = None,
    uploaded_at: float | dt.datetime | None = None,
) -> str:
    """The relative path in done/ for a file at ``path`` (relative to the inbox) rendered by ``template``.

    A missing category renders as ``uncategorized``, a missing id as ``unknown``, a missing upload
    time as ``undated``. Raises ``ValueError`` for an invalid template (see ``validate``).
    """
    rel = os.fsdecode(path)
    folder, _, name = rel.rpartition("/")
    stem, ext = split_ext(name)
    values = {"path": rel, "dir": folder, "name": name, "stem": stem, "ext": ext}
    components: list[list[_Piece]] = [[]]
    for part in _parse(template):
        if isinstance(part, str):
            _add(components, part, from_file=False)
        elif part.name in FILE_PLACEHOLDERS:
            _add(components, values[part.name], from_file=True)
        elif part.name == "date":
            _add(components, _date(uploaded_at, part.spec), from_file=False)
        elif part.name == "category":
            components[-1].append(_Piece(_category(category), from_file=False))
        else:  # document_id
            text = NO_ID if document_id is None else format(document_id, part.spec)
            components[-1].append(_Piece(text, from_file=False))
    names = [n for n in (_component(pieces) for pieces in components) if n]
    return "/".join(names) or UNNAMED


def split_ext(name: str) -> tuple[str, str]:
    """``report.final.pdf`` -> (``report.final``, ``.pdf``); no extension for ``README`` or an
    extension longer than 16 characters (as ``files.free_target`` sees it)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) > 16:
        return name, ""
    return stem, "." + ext


@lru_cache(maxsize=64)
def _parse(template: str) -> tuple[str | _Field, ...]:
    """The template as literal text and placeholders, checked once per template."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("the layout template is empty; the default is {path}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # "Single '}' encountered in format string"
        raise ValueError(f"layout template {template!r}: {exc} (write {{{{ or }}}} for a literal brace)") from None
    parts: list[str | _Field] = []
    for literal, name, spec, conversion in parsed:
        if literal:
            parts.append(literal)
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if name not in PLACEHOLDERS:
            raise ValueError(f"layout template {template!r}: unknown placeholder {shown}; known: {_KNOWN}")
        if conversion:
            raise ValueError(f"layout template {template!r}: placeholder {shown} takes no !{conversion}")
        if "{" in (spec or ""):
            raise ValueError(f"layout template {template!r}: placeholder {shown} has a nested placeholder")
        _check_spec(template, name, spec or "", shown)
        parts.append(_Field(name, spec or ""))
    names = {p.name for p in parts if isinstance(p, _Field)}
    skeleton = "".join(p if isinstance(p, str) else "\0" for p in parts).split("/")
    if template.startswith("/"):
        raise ValueError(f"layout template {template!r}: must be relative to done/ (no leading /)")
    if template.endswith("/"):
        raise ValueError(f"layout template {template!r}: must end with a file name, not /")
    if "." in skeleton or ".." in skeleton:
        raise ValueError(f"layout template {template!r}: must not contain a '.' or '..' component")
    if not names & set(DISTINCT):
        raise ValueError(
            f"layout template {template!r}: needs {{path}}, {{name}}, {{stem}} or {{document_id}} "
            "so that files get names of their own"
        )
    return tuple(parts)


def _check_spec(template: str, name: str, spec: str, shown: str) -> None:
    if name == "date":
        _date(dt.datetime(2024, 1, 31, tzinfo=dt.UTC), spec)  # strftime itself never rejects a format
    elif name == "document_id":
        try:
            format(1, spec)
        except ValueError as exc:
            raise ValueError(f"layout template {template!r}: placeholder {shown}: {exc}") from None
    elif spec:
        raise ValueError(
            f"layout template {template!r}: placeholder {shown} takes no format; "
            "only {date:...} and {document_id:...} do"
        )


def _add(components: list[list[_Piece]], text: str, *, from_file: bool) -> None:
    """Append ``text``; each ``/`` in it starts a new component."""
    first, *rest = text.split("/")
    components[-1].append(_Piece(first, from_file))
    for chunk in rest:
        components.append([_Piece(chunk, from_file)])


def _component(pieces: list[_Piece]) -> str:
    """One path component: the file's own pieces as they are, the rest made safe; never ``.`` or
    ``..``, never hidden or dash-led by what the template added, at most NAME_MAX bytes."""
    pieces = [p for p in pieces if p.text]
    if not pieces:
        return ""
    texts = [p.text if p.from_file else _clean(p.text) for p in pieces]
    if not pieces[0].from_file and texts[0][0] in ".-":
        texts[0] = "_" + texts[0][1:]
    text = "".join(texts)
    if text in (".", ".."):
        text = text.replace(".", "_")
    return _shorten(text)


def _clean(text: str) -> str:
    return "".join("_" if ch in _UNSAFE or unicodedata.category(ch) == "Cc" else ch for ch in text)


def _category(name: str | None) -> str:
    cleaned = _clean((name or "").strip())
    return cleaned or UNCATEGORIZED


def _date(value: float | dt.datetime | None, spec: str) -> str:
    if value is None:
        return UNDATED
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromtimestamp(value, dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime(spec or DEFAULT_DATE_FORMAT)


def _shorten(name: str) -> str:
    """``name`` if it fits in NAME_MAX bytes; else its start, ``~``, a hash of the whole, its extension."""
    raw = os.fsencode(name)
    if len(raw) <= NAME_MAX:
        return name
    stem, ext = split_ext(name)
    tail = "~" + hashlib.sha256(raw).hexdigest()[:10] + ext
    room = NAME_MAX - len(os.fsencode(tail))
    kept, size = [], 0
    for ch in stem:  # whole characters only: a cut inside a UTF-8 sequence would make a new invalid name
        width = len(os.fsencode(ch))
        if size + width > room:
            break
        kept.append(ch)
        size += width
    return "".join(kept) + tail
