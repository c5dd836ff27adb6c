"""The SQLite journal: one row per file, its ``state`` is its place in the pipeline.

The only module with SQL. Every state change is one transaction, committed with
``synchronous=FULL`` in WAL mode, so a row read back after SIGKILL or power loss is a fact.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


class State(enum.StrEnum):
    CLAIMING = "claiming"  # row written; the file may still be in the inbox
    CLAIMED = "claimed"  # the file is in processing/, waiting for a validation + upload slot
    UPLOADING = "uploading"  # token stored; the upload POST may have reached the server
    UPLOADED = "uploaded"  # the server has it (document_id known); waiting for callback/poll
    EXPORTING = "exporting"  # server says done; writing the JSON and moving into done/
    FAILING = "failing"  # decided to fail; writing the .error.json and moving into failed/
    DONE = "done"
    FAILED = "failed"
    RETRIED = "retried"  # was failed; ``konfuzio-watch retry`` put the file back into the inbox


ACTIVE = (State.CLAIMING, State.CLAIMED, State.UPLOADING, State.UPLOADED, State.EXPORTING, State.FAILING)
FINISHED = (State.DONE, State.FAILED)
TERMINAL = (State.DONE, State.FAILED, State.RETRIED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it names the file in processing/
    rel_path      BLOB NOT NULL,      -- path relative to the inbox, as bytes (names need not be UTF-8)
    state         TEXT NOT NULL,
    size          INTEGER,
    sha256        TEXT,
    upload_name   TEXT,               -- the safe name the server sees
    token_hash    TEXT UNIQUE,        -- sha256 of the callback token; the token itself is never stored
    document_id   INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_at       REAL,               -- when the row next needs attention (backoff, poll)
    callback_at   REAL,               -- when a callback for it last arrived
    uploaded_at   REAL,
    final_path    BLOB,               -- where it was moved (done/ or failed/), chosen before moving
    error         TEXT,
    stage         TEXT,
    project_id    INTEGER,
    detected_at   REAL NOT NULL,
    updated_at    REAL NOT NULL,
    finished_at   REAL
);
CREATE INDEX IF NOT EXISTS files_state_next ON files(state, next_at);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

COLUMNS = [
    "id", "rel_path", "state", "size", "sha256", "upload_name", "token_hash", "document_id", "attempts",
    "next_at", "callback_at", "uploaded_at", "final_path", "error", "stage", "project_id", "detected_at",
    "updated_at", "finished_at",
]
UPDATABLE = frozenset(COLUMNS) - {"id", "detected_at"}

NETWORK_FILESYSTEMS = frozenset([
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "fuse.sshfs", "fuse.rclone",
    "fuse.s3fs", "ceph", "glusterfs",
])


class JournalError(Exception):
    """The journal cannot be used (e.g. it would live on a network file system)."""


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


class Journal:
    """Thread-safe access to the journal; one connection guarded by a lock."""

    def __init__(self, path: Path, *, allow_network_fs: bool = False, mountinfo: str | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        if not allow_network_fs:
            fstype = filesystem_type(path.parent, mountinfo)
            if fstype in NETWORK_FILESYSTEMS:
                raise JournalError(
                    f"folders.state: {path.parent} is on a network file system ({fstype}); "
                    "SQLite WAL needs a local disk"
                )
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def bind_processing_dir(self, path: Path) -> None:
        """Remember where claimed files wait; refuse a config that moved it while files wait there."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            found = self._db.execute("SELECT value FROM meta WHERE key = 'processing_dir'").fetchone()
            if found and found[0] != str(path):
                waiting = [s.value for s in ACTIVE if s != State.CLAIMING]
                n = self._db.execute(f"SELECT COUNT(*) FROM files WHERE state IN ({_marks(waiting)})",
                                     waiting).fetchone()[0]
                if n:
                    raise JournalError(f"folders.processing: {n} unfinished file(s) wait in {found[0]}, but the "
                                       f"config now says {path}; move them there or restore the setting")
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('processing_dir', ?)", (str(path),))

    # -- writes: each one transaction -------------------------------------------------------

    def add_claims(self, rel_paths: Sequence[bytes], now: float) -> list[Row]:
        """Record files about to be claimed, in one transaction; returns their rows."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            ids = [
                self._db.execute(
                    "INSERT INTO files (rel_path, state, detected_at, updated_at, next_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (rel, State.CLAIMING.value, now, now, now),
                ).lastrowid
                for rel in rel_paths
            ]
        return [self.get(i) for i in ids]

    def update(self, row_id: int, now: float, **fields: object) -> Row:
        """Change some columns of a row (``state`` included) in one transaction."""
        return self.update_many([row_id], now, **fields)[0]

    def update_many(self, row_ids: Sequence[int], now: float, **fields: object) -> list[Row]:
        bad = set(fields) - UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        fields["updated_at"] = now
        if fields.get("state") in TERMINAL:
            fields.setdefault("finished_at", now)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = [v.value if isinstance(v, State) else v for v in fields.values()]
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                f"UPDATE files SET {assignments} WHERE id = ?", [(*values, row_id) for row_id in row_ids]
            )
        return [self.get(i) for i in row_ids]

    def mark_uploaded(self, row_id: int, document_id: int, now: float, poll_at: float) -> Row:
        """UPLOADING -> UPLOADED. If the callback already came (it can beat the upload's own
        response), the row is due at once; otherwise at ``poll_at``."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE files SET state = ?, document_id = ?, uploaded_at = ?, error = NULL, updated_at = ?,"
                " next_at = CASE WHEN callback_at IS NOT NULL THEN ? ELSE ? END WHERE id = ?",
                (State.UPLOADED.value, document_id, now, now, now, poll_at, row_id),
            )
        return self.get(row_id)

    def schedule_poll(self, row_id: int, checked_at: float, now: float, poll_at: float, stage: str) -> Row:
        """Look again at ``poll_at`` - or at once if a callback came in while we were checking."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE files SET stage = ?, updated_at = ?,"
                " next_at = CASE WHEN callback_at >= ? THEN ? ELSE ? END WHERE id = ?",
                (stage, now, checked_at, now, poll_at, row_id),
            )
        return self.get(row_id)

    def discard(self, row_id: int) -> None:
        """Forget a row whose file vanished from the inbox before we took it."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM files WHERE id = ? AND state = ?", (row_id, State.CLAIMING.value))

    def record_callback(self, token_hash: str, claimed_document_id: int | None, now: float) -> str:
        """Record that a callback arrived for a token; returns what happened.

        ``unknown``: no such token. ``mismatch``: the body names another document than the one
        this token was issued for. ``finished``: the file is already done/failed (replay).
        ``recorded``: fact stored; the pipeline will confirm the outcome with the API.
        """
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            found = self._db.execute(
                "SELECT id, token_hash, state, document_id FROM files WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            if found is None or not hmac.compare_digest(found[1], token_hash):
                return "unknown"
            row_id, _, state, document_id = found
            if claimed_document_id is not None and document_id is not None and claimed_document_id != document_id:
                return "mismatch"
            if state in TERMINAL:
                return "finished"
            next_at = now if state == State.UPLOADED else None
            self._db.execute(
                "UPDATE files SET callback_at = ?, next_at = COALESCE(?, next_at), updated_at = ? WHERE id = ?",
                (now, next_at, now, row_id),
            )
            return "recorded"

    # -- reads --------------------------------------------------------------------------------

    def get(self, row_id: int) -> Row:
        rows = self._select("SELECT * FROM files WHERE id = ?", (row_id,))
        if not rows:
            raise KeyError(row_id)
        return rows[0]

    def runnable(self, states: Iterable[State], now: float, exclude: Iterable[int], limit: int) -> list[Row]:
        """Rows in ``states`` whose ``next_at`` has come, oldest first, skipping ``exclude``."""
        states, exclude = [s.value for s in states], list(exclude)
        sql = (
            f"SELECT * FROM files WHERE state IN ({_marks(states)}) AND next_at <= ?"
            f" AND id NOT IN ({_marks(exclude)}) ORDER BY next_at, id LIMIT ?"
        )
        return self._select(sql, (*states, now, *exclude, limit))

    def next_due_at(self, states: Iterable[State], exclude: Iterable[int]) -> float | None:
        states, exclude = [s.value for s in states], list(exclude)
        sql = f"SELECT MIN(next_at) FROM files WHERE state IN ({_marks(states)}) AND id NOT IN ({_marks(exclude)})"
        with self._lock:
            return self._db.execute(sql, (*states, *exclude)).fetchone()[0]

    def rows(self, states: Iterable[State] = (), limit: int = 1000) -> list[Row]:
        states = [s.value for s in states]
        if states:
            return self._select(
                f"SELECT * FROM files WHERE state IN ({_marks(states)}) ORDER BY id LIMIT ?", (*states, limit)
            )
        return self._select("SELECT * FROM files ORDER BY id LIMIT ?", (limit,))

    def find_by_token_hash(self, token_hash: str) -> Row | None:
        rows = self._select("SELECT * FROM files WHERE token_hash = ?", (token_hash,))
        return rows[0] if rows else None

    def find_same_content(self, sha256: str, exclude_id: int) -> Row | None:
        """The earliest other file with this content that is done or on its way there."""
        states = [State.DONE.value, State.UPLOADING.value, State.UPLOADED.value, State.EXPORTING.value]
        rows = self._select(
            f"SELECT * FROM files WHERE sha256 = ? AND id != ? AND state IN ({_marks(states)}) ORDER BY id LIMIT 1",
            (sha256, exclude_id, *states),
        )
        return rows[0] if rows else None

    def counts(self) -> dict[State, int]:
        with self._lock:
            found = dict(self._db.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        return {state: found.get(state.value, 0) for state in State}

    def oldest_active_detected_at(self) -> float | None:
        states = [s.value for s in ACTIVE]
        with self._lock:
            return self._db.execute(
                f"SELECT MIN(detected_at) FROM files WHERE state IN ({_marks(states)})", states
            ).fetchone()[0]

    def integrity_check(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def _select(self, sql: str, params: Sequence[object]) -> list[Row]:
        with self._lock:
            cursor = self._db.execute(sql, params)
            return [_row(values) for values in cursor.fetchall()]


def _row(values: Sequence[object]) -> Row:
    data = dict(zip(COLUMNS, values, strict=True))
    data["state"] = State(data["state"])
    return Row(**data)


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


assert [f.name for f in dataclasses.fields(Row)] == COLUMNS


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The file system type of the mount holding ``path`` (Linux /proc/self/mountinfo)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    lines = mountinfo.splitlines()
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        before, _, after = line.partition(" - ")
        fields = before.split()
        if len(fields) < 5 or not after:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, after.split()[0]
    return best_type
