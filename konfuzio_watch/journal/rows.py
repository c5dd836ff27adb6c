"""A row of the journal: one file, its ``state`` its place in the pipeline; and the SQL helpers that
read and write rows in every dialect."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..states import State

COLUMNS = [
    "id",
    "rel_path",
    "state",
    "size",
    "sha256",
    "upload_name",
    "token_hash",
    "document_id",
    "attempts",
    "next_at",
    "callback_at",
    "uploaded_at",
    "final_path",
    "error",
    "stage",
    "project_id",
    "detected_at",
    "updated_at",
    "finished_at",
    "failures",
    "claim_name",
    "file_dev",
    "file_ino",
    "mtime_ns",
    "ambiguous_since",
    "revision",
    "fingerprint",
    "refresh_at",
    "ctime_ns",
]
UPDATABLE = frozenset(COLUMNS) - {"id", "detected_at", "state"}
# A done file is looked at again at most this often, however many callbacks arrive for it.
REFRESH_GAP_S = 2.0

COLS = ", ".join(COLUMNS)
F_COLS = ", ".join(f"f.{name}" for name in COLUMNS)


@dataclass(frozen=True)
class NewClaim:
    """A file about to be claimed: its inbox path, the unpredictable name it gets in processing/,
    and its identity (device, inode), so that a file found under that name can be checked."""

    rel_path: bytes
    claim_name: bytes
    dev: int | None = None
    ino: int | None = None
    detected_at: float | None = None


@dataclass(frozen=True)
class Row:
    id: int
    rel_path: bytes
    state: State
    size: int | None
    sha256: str | None
    upload_name: str | None
    token_hash: str | None
    document_id: int | None
    attempts: int
    next_at: float | None
    callback_at: float | None
    uploaded_at: float | None
    final_path: bytes | None
    error: str | None
    stage: str | None
    project_id: int | None
    detected_at: float
    updated_at: float
    finished_at: float | None
    failures: int = 0
    claim_name: bytes | None = None
    file_dev: int | None = None
    file_ino: int | None = None
    mtime_ns: int | None = None
    ambiguous_since: float | None = None
    revision: int = 0
    fingerprint: str | None = None
    refresh_at: float | None = None
    ctime_ns: int | None = None

    @property
    def display_path(self) -> str:
        """The relative path for humans and logs: undecodable bytes and control characters escaped."""
        return display_name(self.rel_path)

    @property
    def rel_fspath(self) -> str:
        return os.fsdecode(self.rel_path)


def display_name(raw: bytes | str) -> str:
    """One-line, printable rendering of a file name (newlines cannot forge log lines)."""
    if isinstance(raw, str):
        raw = os.fsencode(raw)
    text = raw.decode("utf-8", errors="backslashreplace")
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def to_row(values: Sequence[object]) -> Row:
    """A ``Row`` from the values of ``COLS`` as a statement returned them."""
    data = dict(zip(COLUMNS, values, strict=True))
    data["state"] = State(data["state"])
    return Row(**data)


def marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


def in_list(column: str, values: Sequence[object], *, negate: bool = False) -> tuple[str, list[object]]:
    """``column IN (?, ...)`` and its values; an empty list matches nothing (NOT IN: everything)."""
    if not values:
        return ("1 = 1" if negate else "1 = 0"), []
    return f"{column} {'NOT IN' if negate else 'IN'} ({marks(values)})", list(values)


assert [f.name for f in dataclasses.fields(Row)] == COLUMNS
