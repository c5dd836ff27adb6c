"""The SQLite journal: one row per file, its ``state`` is its place in the pipeline.

The only module with SQL. Every state change is one transaction, committed with
``synchronous=FULL`` in WAL mode, so a row read back after SIGKILL or power loss is a fact.
Moves between states are checked against the table in ``states.py`` and guarded by the state
the caller read (``WHERE state = ?``), so a row cannot be moved twice or sideways. A write that
SQLite cannot make (disk full, I/O error, read-only) raises ``JournalWriteError``.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .states import ACTIVE, FINISHED, TERMINAL, IllegalTransition, State, check_transition

__all__ = [
    "ACTIVE", "FINISHED", "TERMINAL", "IllegalTransition", "Journal", "JournalError", "JournalWriteError", "NewClaim",
    "Row", "State", "display_name", "filesystem_type",
]

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

# Schema version -> statements that bring the previous version to it. Version 1 is SCHEMA.
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE files ADD COLUMN failures INTEGER NOT NULL DEFAULT 0"],  # the retry policy's count
    3: [
        # A claim's identity: an unpredictable name in processing/ and the file's inode there.
        "ALTER TABLE files ADD COLUMN claim_name BLOB",
        "ALTER TABLE files ADD COLUMN file_dev INTEGER",
        "ALTER TABLE files ADD COLUMN file_ino INTEGER",
        "ALTER TABLE files ADD COLUMN mtime_ns INTEGER",  # of the content that was uploaded
        # Since when the server may hold an upload whose answer we never read.
        "ALTER TABLE files ADD COLUMN ambiguous_since REAL",
        # Every upload attempt's token, so a document that appears late for an earlier one is ours.
        "CREATE TABLE upload_tokens (token_hash TEXT PRIMARY KEY, row_id INTEGER NOT NULL, sent_at REAL NOT NULL)",
        "CREATE INDEX upload_tokens_row ON upload_tokens(row_id)",
        "INSERT INTO upload_tokens SELECT token_hash, id, updated_at FROM files WHERE token_hash IS NOT NULL",
        # Documents the server holds twice for one file (a late earlier attempt): to delete.
        "CREATE TABLE extra_documents (document_id INTEGER PRIMARY KEY, row_id INTEGER NOT NULL, project_id INTEGER,"
        " found_at REAL NOT NULL, deleted_at REAL, error TEXT)",
    ],
    4: [
        # Results can change after export (review, re-extraction): which revision done/ holds, a
        # fingerprint of its content, and when a re-sent callback asked to look again.
        "ALTER TABLE files ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE files ADD COLUMN fingerprint TEXT",
        "ALTER TABLE files ADD COLUMN refresh_at REAL",
        "CREATE INDEX files_refresh ON files(refresh_at) WHERE refresh_at IS NOT NULL",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)

COLUMNS = [
    "id", "rel_path", "state", "size", "sha256", "upload_name", "token_hash", "document_id", "attempts",
    "next_at", "callback_at", "uploaded_at", "final_path", "error", "stage", "project_id", "detected_at",
    "updated_at", "finished_at", "failures", "claim_name", "file_dev", "file_ino", "mtime_ns", "ambiguous_since",
    "revision", "fingerprint", "refresh_at",
]
UPDATABLE = frozenset(COLUMNS) - {"id", "detected_at", "state"}
# A done file is looked at again at most this often, however many callbacks arrive for it.
REFRESH_GAP_S = 2.0

NETWORK_FILESYSTEMS = frozenset([
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "fuse.sshfs", "fuse.rclone",
    "fuse.s3fs", "ceph", "glusterfs",
])


@dataclass(frozen=True)
class NewClaim:
    """A file about to be claimed: its inbox path, the unpredictable name it gets in processing/,
    and its identity (device, inode), so that a file found under that name can be checked."""

    rel_path: bytes
    claim_name: bytes
    dev: int | None = None
    ino: int | None = None
    detected_at: float | None = None


class JournalError(Exception):
    """The journal cannot be used (e.g. it would live on a network file system)."""


class JournalWriteError(Exception):
    """SQLite could not write (disk full, I/O error, read-only): nothing of the write happened."""


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
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._create()
        except (sqlite3.Error, JournalWriteError) as exc:
            raise JournalError(f"cannot read the journal {path}: {exc}") from None

    def _create(self) -> None:
        self._db.executescript(SCHEMA)
        with self._write():
            found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(found[0]) if found else 1
            if version > SCHEMA_VERSION:
                raise JournalError(f"{self.path}: written by a newer konfuzio-watch (schema {version}, this one "
                                   f"knows {SCHEMA_VERSION}); upgrade konfuzio-watch")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    self._db.execute(statement)
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
            # An identity that stays with this journal (and is lost with it): the inbox's marker names it.
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('journal_id', ?)",
                             (secrets.token_hex(8),))
        self.journal_id: str = self._db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite's own trouble becomes ``JournalWriteError``."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise JournalWriteError(str(exc)) from exc

    def bind_processing_dir(self, path: Path) -> None:
        """Remember where claimed files wait; refuse a config that moved it while files wait there."""
        with self._write() as db:
            found = db.execute("SELECT value FROM meta WHERE key = 'processing_dir'").fetchone()
            if found and found[0] != str(path):
                waiting = [s.value for s in ACTIVE if s != State.CLAIMING]
                n = db.execute(f"SELECT COUNT(*) FROM files WHERE state IN ({_marks(waiting)})", waiting).fetchone()[0]
                if n:
                    raise JournalError(f"folders.processing: {n} unfinished file(s) wait in {found[0]}, but the "
                                       f"config now says {path}; move them there or restore the setting")
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('processing_dir', ?)", (str(path),))

    def probe(self, now: float) -> None:
        """A small real write: does the journal take writes again (after a full disk)?"""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probed_at', ?)", (repr(now),))

    # -- writes: each one transaction -------------------------------------------------------

    def add_claims(self, claims: Sequence[bytes | NewClaim], now: float) -> list[Row]:
        """Record files about to be claimed, in one transaction; returns their rows."""
        claims = [c if isinstance(c, NewClaim) else NewClaim(c, secrets.token_hex(8).encode()) for c in claims]
        with self._write() as db:
            ids = [
                db.execute(
                    "INSERT INTO files (rel_path, state, detected_at, updated_at, next_at, claim_name, file_dev,"
                    " file_ino) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (c.rel_path, State.CLAIMING.value, c.detected_at or now, now, now, c.claim_name, c.dev, c.ino),
                ).lastrowid
                for c in claims
            ]
        return self.get_many(ids)

    def transition(self, row: Row, state: State, now: float, **fields: object) -> Row:
        """Move one row to ``state`` (a legal move from the state it is in), with other columns,
        in one transaction. A successful move clears the row's failure count unless given."""
        return self.transition_many([row], state, now, **fields)[0]

    def transition_many(self, rows: Sequence[Row], state: State, now: float, **fields: object) -> list[Row]:
        for row in rows:
            check_transition(row.state, state)
        fields.setdefault("failures", 0)
        if state not in (State.FAILING, State.FAILED):
            fields.setdefault("error", None)  # moving on: the last failure is history
        if state in TERMINAL:
            fields.setdefault("finished_at", now)
        return self._set(rows, now, {**fields, "state": state.value}, moving=True)

    def update(self, row: Row, now: float, **fields: object) -> Row:
        """Change some columns of a row that stays in its state."""
        return self._set([row], now, fields)[0]

    def update_many(self, rows: Sequence[Row], now: float, **fields: object) -> list[Row]:
        return self._set(rows, now, fields)

    def _set(self, rows: Sequence[Row], now: float, fields: dict[str, object], moving: bool = False) -> list[Row]:
        bad = set(fields) - UPDATABLE - ({"state"} if moving else set())
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        if not rows:
            return []
        fields["updated_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = list(fields.values())
        with self._write() as db:
            for row in rows:
                cursor = db.execute(f"UPDATE files SET {assignments} WHERE id = ? AND state = ?",
                                    (*values, row.id, row.state.value))
                if cursor.rowcount != 1:
                    raise IllegalTransition(f"{row.display_path}: no longer {row.state} (row {row.id})")
        return self.get_many([r.id for r in rows])

    def start_upload(self, row: Row, token_hash: str, now: float, **fields: object) -> Row:
        """CLAIMED -> UPLOADING with a new attempt's token, kept with every earlier one."""
        check_transition(row.state, State.UPLOADING)
        fields = {**fields, "token_hash": token_hash, "ambiguous_since": None}
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._write() as db:
            cursor = db.execute(f"UPDATE files SET state = ?, updated_at = ?, {assignments} WHERE id = ? AND state = ?",
                                (State.UPLOADING.value, now, *fields.values(), row.id, row.state.value))
            if cursor.rowcount != 1:
                raise IllegalTransition(f"{row.display_path}: no longer {row.state} (row {row.id})")
            db.execute("INSERT INTO upload_tokens (token_hash, row_id, sent_at) VALUES (?, ?, ?)",
                       (token_hash, row.id, now))
        return self.get(row.id)

    def tokens_of(self, row_ids: Iterable[int]) -> dict[str, int]:
        """Every upload attempt's token hash of these rows -> row id."""
        ids = list(row_ids)
        found: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            sql = f"SELECT token_hash, row_id FROM upload_tokens WHERE row_id IN ({_marks(chunk)})"
            with self._lock:
                found.update(self._db.execute(sql, chunk).fetchall())
        return found

    def first_sent_at(self, row_ids: Iterable[int]) -> float | None:
        """When the earliest upload attempt of these rows was sent."""
        ids = list(row_ids)
        earliest: float | None = None
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            with self._lock:
                found = self._db.execute(f"SELECT MIN(sent_at) FROM upload_tokens WHERE row_id IN ({_marks(chunk)})",
                                         chunk).fetchone()[0]
            if found is not None and (earliest is None or found < earliest):
                earliest = found
        return earliest

    def tokens_with_documents(self, since: float) -> dict[str, tuple[int, int]]:
        """Tokens sent since ``since`` by files that were uploaded more than once and have their
        document: token -> (row id, document id). A listed document carrying one of them but another
        id is a late copy of an earlier attempt."""
        with self._lock:
            rows = self._db.execute(
                "SELECT t.token_hash, f.id, f.document_id FROM upload_tokens t JOIN files f ON f.id = t.row_id"
                " WHERE t.sent_at >= ? AND f.document_id IS NOT NULL AND t.row_id IN"
                " (SELECT row_id FROM upload_tokens WHERE sent_at >= ? GROUP BY row_id HAVING COUNT(*) > 1)",
                (since, since)).fetchall()
        return {token: (row_id, document_id) for token, row_id, document_id in rows}

    def record_extra(self, document_id: int, row: Row, project_id: int | None, now: float) -> bool:
        """Remember a second document of one file, to delete; False if it was known."""
        with self._write() as db:
            return db.execute(
                "INSERT OR IGNORE INTO extra_documents (document_id, row_id, project_id, found_at) VALUES (?, ?, ?, ?)",
                (document_id, row.id, project_id, now)).rowcount == 1

    def pending_extras(self, limit: int = 100) -> list[tuple[int, int, int | None]]:
        """(document id, row id, project id) of extra documents not deleted yet."""
        with self._lock:
            return self._db.execute("SELECT document_id, row_id, project_id FROM extra_documents"
                                    " WHERE deleted_at IS NULL AND error IS NULL ORDER BY found_at LIMIT ?",
                                    (limit,)).fetchall()

    def settle_extra(self, document_id: int, now: float, error: str | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE extra_documents SET deleted_at = CASE WHEN ? IS NULL THEN ? END, error = ?"
                       " WHERE document_id = ?", (error, now, error, document_id))

    def mark_uploaded(self, row: Row, document_id: int, now: float, poll_at: float, **fields: object) -> Row:
        """UPLOADING -> UPLOADED. If the callback already came (it can beat the upload's own
        response), the row is due at once; otherwise at ``poll_at``."""
        check_transition(row.state, State.UPLOADED)
        extra = "".join(f", {name} = ?" for name in fields)
        with self._write() as db:
            cursor = db.execute(
                "UPDATE files SET state = ?, document_id = ?, uploaded_at = ?, error = NULL, failures = 0,"
                f" updated_at = ?, next_at = CASE WHEN callback_at IS NOT NULL THEN ? ELSE ? END{extra}"
                " WHERE id = ? AND state = ?",
                (State.UPLOADED.value, document_id, now, now, now, poll_at, *fields.values(), row.id,
                 row.state.value),
            )
            if cursor.rowcount != 1:
                raise IllegalTransition(f"{row.display_path}: no longer {row.state} (row {row.id})")
        return self.get(row.id)

    def schedule_poll(self, row: Row, checked_at: float, now: float, poll_at: float, stage: str) -> Row:
        """Look again at ``poll_at`` - or at once if a callback came in while we were checking."""
        with self._write() as db:
            db.execute(
                "UPDATE files SET stage = ?, updated_at = ?, failures = 0, error = NULL,"
                " next_at = CASE WHEN callback_at >= ? THEN ? ELSE ? END WHERE id = ? AND state = ?",
                (stage, now, checked_at, now, poll_at, row.id, row.state.value),
            )
        return self.get(row.id)

    def discard(self, row: Row) -> None:
        """Forget a row whose file vanished from the inbox before we took it."""
        with self._write() as db:
            db.execute("DELETE FROM files WHERE id = ? AND state = ?", (row.id, State.CLAIMING.value))

    def clamp_due(self, now: float, max_delay_s: float) -> int:
        """Due times further ahead than any delay could be come from a clock stepped back
        while the daemon was down: make them due now. Returns how many were clamped."""
        states = [s.value for s in ACTIVE]
        with self._write() as db:
            return db.execute(
                f"UPDATE files SET next_at = ? WHERE state IN ({_marks(states)}) AND next_at > ?",
                (now, *states, now + max_delay_s),
            ).rowcount + db.execute(  # a done file's look at a new revision, too
                "UPDATE files SET refresh_at = ? WHERE refresh_at > ? AND state = ?",
                (now, now + max_delay_s, State.DONE.value),
            ).rowcount

    def record_callback(self, token_hash: str, claimed_document_id: int | None, now: float) -> tuple[str, Row | None]:
        """Record that a callback arrived for a token; returns what happened and the row.

        ``unknown``: no such token. ``mismatch``: the body names another document than the one
        this token was issued for. ``extra``: the token is an earlier attempt's and the body names
        another document than the file's: a late copy, recorded for deletion (after checking).
        ``finished``: the file is already done/failed (a replay), and nothing more happens, except
        for a done file and its current token: Konfuzio calls again after a review or a
        re-extraction, so the pipeline is to look at the document again (``refresh_at``, at most
        once per ``REFRESH_GAP_S``); the row is returned then, else None. ``recorded``: fact stored;
        the pipeline will confirm the outcome with the API.
        """
        with self._write() as db:
            found = db.execute(
                "SELECT t.token_hash, f.id, f.state, f.document_id, f.token_hash, f.project_id FROM upload_tokens t"
                " JOIN files f ON f.id = t.row_id WHERE t.token_hash = ?", (token_hash,)
            ).fetchone()
            if found is None or not hmac.compare_digest(found[0], token_hash):
                return "unknown", None
            _, row_id, state, document_id, current_token, project_id = found
            if claimed_document_id is not None and document_id is not None and claimed_document_id != document_id:
                if current_token == token_hash:
                    return "mismatch", None
                db.execute("INSERT OR IGNORE INTO extra_documents (document_id, row_id, project_id, found_at)"
                           " VALUES (?, ?, ?, ?)", (claimed_document_id, row_id, project_id, now))
                return "extra", None
            if state == State.DONE and current_token == token_hash:
                db.execute(
                    "UPDATE files SET callback_at = ?, refresh_at = COALESCE(refresh_at, MAX(?, updated_at + ?))"
                    " WHERE id = ? AND state = ?", (now, now, REFRESH_GAP_S, row_id, State.DONE.value))
                refresh = True
            elif state in TERMINAL:
                return "finished", None
            else:
                refresh = False
                next_at = now if state == State.UPLOADED else None
                db.execute(
                    "UPDATE files SET callback_at = ?, next_at = COALESCE(?, next_at), updated_at = ? WHERE id = ?",
                    (now, next_at, now, row_id),
                )
        if refresh:
            return "finished", self.get(row_id)
        return "recorded", self.get(row_id)

    # -- done results that may have changed on the server ------------------------------------

    def arm_refresh(self, row: Row, since: float, now: float) -> Row:
        """After a row became done: if a callback came in since ``since`` (the details the export
        used were fetched then), a review may have beaten the export: look again at once."""
        with self._write() as db:
            db.execute("UPDATE files SET refresh_at = ? WHERE id = ? AND state = ? AND callback_at >= ?"
                       " AND refresh_at IS NULL", (now, row.id, State.DONE.value, since))
        return self.get(row.id)

    def finish_refresh(self, row: Row, checked_at: float, now: float, **fields: object) -> Row:
        """A refresh of a done row is over (``fields``: e.g. its new ``revision`` and ``fingerprint``),
        in one transaction: ``refresh_at`` is cleared, unless a callback came in since ``checked_at``
        (the document may have changed again after it was fetched)."""
        bad = set(fields) - UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        extra = "".join(f", {name} = ?" for name in fields)
        with self._write() as db:
            cursor = db.execute(
                "UPDATE files SET refresh_at = CASE WHEN callback_at >= ? THEN ? ELSE NULL END, failures = 0,"
                f" error = NULL, updated_at = ?{extra} WHERE id = ? AND state = ?",
                (checked_at, now + REFRESH_GAP_S, now, *fields.values(), row.id, State.DONE.value))
            if cursor.rowcount != 1:
                raise IllegalTransition(f"{row.display_path}: no longer {State.DONE} (row {row.id})")
        return self.get(row.id)

    def due_refreshes(self, now: float, exclude: Iterable[int], limit: int) -> list[Row]:
        """Done rows whose ``refresh_at`` has come, earliest first, skipping ``exclude``."""
        exclude = list(exclude)
        return self._select(f"SELECT * FROM files WHERE refresh_at <= ? AND state = ? AND id NOT IN ({_marks(exclude)})"
                            " ORDER BY refresh_at, id LIMIT ?", (now, State.DONE.value, *exclude, limit))

    def next_refresh_at(self, exclude: Iterable[int]) -> float | None:
        exclude = list(exclude)
        with self._lock:
            return self._db.execute(
                f"SELECT MIN(refresh_at) FROM files WHERE refresh_at IS NOT NULL AND state = ?"
                f" AND id NOT IN ({_marks(exclude)})", (State.DONE.value, *exclude)).fetchone()[0]

    # -- reads --------------------------------------------------------------------------------

    def get(self, row_id: int) -> Row:
        rows = self._select("SELECT * FROM files WHERE id = ?", (row_id,))
        if not rows:
            raise KeyError(row_id)
        return rows[0]

    def get_many(self, row_ids: Sequence[int]) -> list[Row]:
        found: dict[int, Row] = {}
        for start in range(0, len(row_ids), 500):
            chunk = list(row_ids[start : start + 500])
            for row in self._select(f"SELECT * FROM files WHERE id IN ({_marks(chunk)})", chunk):
                found[row.id] = row
        return [found[i] for i in row_ids if i in found]

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
        rows = self._select("SELECT f.* FROM upload_tokens t JOIN files f ON f.id = t.row_id WHERE t.token_hash = ?",
                            (token_hash,))
        return rows[0] if rows else None

    def claim_names(self, states: Iterable[State]) -> set[bytes]:
        """The processing/ names of rows in these states (legacy rows: their id)."""
        states = [s.value for s in states]
        with self._lock:
            found = self._db.execute(
                f"SELECT id, claim_name FROM files WHERE state IN ({_marks(states)})", states).fetchall()
        return {name if name is not None else str(row_id).encode() for row_id, name in found}

    def meta(self, key: str) -> str | None:
        with self._lock:
            found = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return found[0] if found else None

    def quick_check(self) -> str:
        with self._lock:
            return "; ".join(r[0] for r in self._db.execute("PRAGMA quick_check(5)").fetchall())

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

    def oldest_active(self) -> Row | None:
        states = [s.value for s in ACTIVE]
        rows = self._select(f"SELECT * FROM files WHERE state IN ({_marks(states)}) ORDER BY detected_at LIMIT 1",
                            states)
        return rows[0] if rows else None

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
