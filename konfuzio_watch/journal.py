"""The journal: one row per file, its ``state`` is its place in the pipeline.

The only modules with SQL: this one (the interface ``BaseJournal``, the logic both backends share,
and the SQLite journal, the embedded default) and ``journal_pg.py`` (PostgreSQL, one journal for a
cluster of daemons on one inbox). ``Journal`` is the SQLite journal; ``open_journal(config)``
opens the one the config names.

Every state change is one transaction. A write returns once its transaction is durable: SQLite
(WAL mode) commits it and the journal fsyncs the WAL before the caller goes on, several threads'
commits sharing one fsync (group commit); so a row read back after SIGKILL or power loss is a fact.
A few writes are marked ``durable=False``: committed (visible at once, and kept by SIGKILL, which
leaves the page cache alone), made durable by the next durable write of any thread (the WAL is a
log: an fsync covers every commit before it). They are the steps whose loss in a power failure
start-up recovery redoes without any outside effect twice; each such call says why.

Moves between states are checked against the table in ``states.py`` and guarded by the state the
caller read (``WHERE state = ?``), so a row cannot be moved twice or sideways. A write that the
database cannot make (disk full, I/O error, read-only, the server gone) raises ``JournalWriteError``.

The statements the backends share are written once, here, in the SQL both understand (``?``
marks, ``ON CONFLICT``, ``RETURNING``); each backend runs them through its own transaction.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import secrets
import socket
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .clock import ClockOffset
from .states import ACTIVE, FINISHED, TERMINAL, IllegalTransition, State, check_transition

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "ACTIVE",
    "CHANNEL",
    "FINISHED",
    "TERMINAL",
    "BaseJournal",
    "IllegalTransition",
    "Journal",
    "JournalError",
    "JournalUnavailable",
    "JournalWriteError",
    "Lease",
    "Listener",
    "NewClaim",
    "Node",
    "Role",
    "Row",
    "SqliteJournal",
    "State",
    "display_name",
    "filesystem_type",
    "open_journal",
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
    # The inode change time of the content that was uploaded: a rewrite that keeps the size and puts
    # the mtime back still changes it (no user can set it).
    5: ["ALTER TABLE files ADD COLUMN ctime_ns INTEGER"],
}
SCHEMA_VERSION = max(MIGRATIONS)

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

_COLS = ", ".join(COLUMNS)
_F_COLS = ", ".join(f"f.{name}" for name in COLUMNS)

NETWORK_FILESYSTEMS = frozenset(
    [
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "9p",
        "fuse.sshfs",
        "fuse.rclone",
        "fuse.s3fs",
        "ceph",
        "glusterfs",
    ]
)


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
    """The database could not write (disk full, I/O error, read-only): nothing of the write happened;
    or (SQLite) its transaction is committed but the fsync that makes it durable failed: as after a
    crash right after the commit, which start-up recovery (run again when the journal takes writes)
    finishes. Nothing is acted on that is not known to be durable."""


class JournalUnavailable(JournalWriteError):
    """The database server cannot be reached (down, restarting, the network): nothing of the write
    happened, and a read could not be made either. A ``JournalWriteError``, so that whatever pauses
    on a journal that cannot write pauses on this too, and resumes when ``probe`` succeeds again."""


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


# -- a cluster of daemons ("nodes") on one journal ----------------------------------------------

#: The LISTEN/NOTIFY channel. Payloads: ``callback:<row id>`` (a callback was recorded for that
#: row) and ``due:<seconds since the epoch>`` (a row is due then, or earlier), ``reconnected``
#: (from a listener only: notifications may have been missed while it was cut off: look again).
CHANNEL = "konfuzio_watch"


@dataclass(frozen=True)
class Node:
    """A daemon that uses the journal: its id, host and process, and, by the database's clock,
    when it started and when it last said it is alive (``silent_s`` ago)."""

    id: str
    host: str
    pid: int | None
    started_at: float
    heartbeat_at: float
    silent_s: float
    inbox_marker: str | None = None  # what its marker file in the inbox says (``join``)
    clock_offset_s: float | None = None  # how far the database's clock was ahead of its own, at its last heartbeat


@dataclass(frozen=True)
class Lease:
    """Which node works on a row, and for how much longer (negative: expired), by the database's clock."""

    node: str
    remaining_s: float


class Listener(Protocol):
    def close(self) -> None: ...


class Role(Protocol):
    """A job that one node at a time does (e.g. rescanning the inbox)."""

    name: str

    def acquire(self) -> bool:
        """Take the role if no other node has it; True if this node has it now. Never waits."""
        ...

    def held(self) -> bool:
        """Whether this node still has the role (a lost database connection loses it)."""
        ...

    def release(self) -> None: ...


class _LocalRole:
    """One node: the only daemon has every role."""

    def __init__(self, name: str):
        self.name = name
        self._held = False

    def acquire(self) -> bool:
        self._held = True
        return True

    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        self._held = False


class _LocalListener:
    def __init__(self, journal: BaseJournal, callback: Callable[[str], None]):
        self._journal, self.callback = journal, callback

    def close(self) -> None:
        with suppress(ValueError):
            self._journal._listeners.remove(self)


class _Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Tx(Protocol):
    """One transaction (or, for reads, one connection) of a backend."""

    def execute(self, sql: str, params: Sequence[object] = ()) -> _Cursor: ...

    def notify(self, payload: str) -> None:
        """Tell the listeners ``payload`` once (and only if) this transaction commits."""
        ...


def default_node_id() -> str:
    return socket.gethostname() or "localhost"


class BaseJournal(ABC):
    """Thread-safe access to the journal, whichever database holds it.

    Every public method behaves the same on every backend (``tests/test_journal.py`` runs the same
    tests on each). The cluster methods (``take_due`` ... ``listen``) do what a single daemon
    needs on SQLite: there is no other node, so every row is this node's, every role is held, and
    notifications reach the listeners of this journal object only.
    """

    #: Where the journal lives, for messages: a path, or a URL without a password.
    location: str
    #: An identity that stays with this journal (and is lost with it): the inbox's marker names it.
    journal_id: str
    #: This daemon's name among the nodes that share the journal.
    node_id: str
    #: The schema version this konfuzio-watch writes.
    schema_version: int

    #: Whether several nodes may share this journal (PostgreSQL): the daemon then runs as a node of
    #: a cluster (leases, heartbeats, roles, notifications between nodes).
    shared = False
    #: How long a lease lasts unless renewed, for the leases the journal gives by itself (new claims).
    lease_s = 60.0

    #: Whether one writer at a time has the database (SQLite): a batch of rows may then be changed by
    #: one statement (several nodes keep one row per statement, locking rows in one order).
    _ONE_WRITER = False

    # SQL that differs between the backends, appended to shared statements:
    _LOCK_ROW = ""  # to a SELECT of a row the transaction then changes
    _LEASE_GUARD = ""  # to the WHERE of a write to one row: not leased to another node (one ? : node_id)
    _NOT_OTHERS = ""  # to the WHERE of a look for due rows: not leased to another node at all (one ? : node_id)

    def __init__(self) -> None:
        self._listeners: list[_LocalListener] = []
        self._started_at = _now()

    # -- what each backend provides -------------------------------------------------------------

    @abstractmethod
    def _write(self) -> AbstractContextManager[_Tx]:
        """One write transaction; the database's own trouble becomes ``JournalWriteError``."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[_Tx]:
        """A connection for reads."""

    def _write_soon(self) -> AbstractContextManager[_Tx]:
        """One write transaction that need not be durable when it returns (``durable=False``): the
        next durable write makes it so. By default a write like any other (PostgreSQL)."""
        return self._write()

    def _writer(self, durable: bool) -> AbstractContextManager[_Tx]:
        return self._write() if durable else self._write_soon()

    def _one_statement(self, durable: bool) -> AbstractContextManager[_Tx]:
        """A write of exactly one statement (``_writer`` by default)."""
        return self._writer(durable)

    def _make_durable(self) -> None:  # noqa: B027 - a hook: every write of a backend without _write_soon is
        """Make every write committed so far durable (after ``_write_soon``)."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def quick_check(self) -> str:
        """``ok``, or what is damaged (cheap: run at every start)."""

    @abstractmethod
    def integrity_check(self) -> str:
        """``ok``, or what is damaged (thorough)."""

    @abstractmethod
    def schema_found(self) -> int | None:
        """The schema version the database holds (None: no journal there yet)."""

    def _serialize(self, tx: _Tx, what: str) -> None:  # noqa: B027 - a hook, empty where writes are serial
        """Make concurrent transactions that read ``what`` and then write one after the other."""

    def __enter__(self) -> BaseJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> str | None:
        """None if the database holds the schema this konfuzio-watch writes; else what is wrong, in one
        line (for ``konfuzio-watch check``). Opening a journal the normal way creates or upgrades it."""
        found = self.schema_found()
        if found is None:
            return f"{self.location}: no journal yet (the daemon creates it when it starts)"
        if found < self.schema_version:
            return (
                f"{self.location}: journal schema {found}, this konfuzio-watch writes {self.schema_version}: "
                "the daemon upgrades it when it starts"
            )
        if found > self.schema_version:
            return (
                f"{self.location}: written by a newer konfuzio-watch (schema {found}, this one knows "
                f"{self.schema_version}); upgrade konfuzio-watch"
            )
        return None

    def _set_meta(self, tx: _Tx, key: str, value: str) -> None:
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @property
    def _guard(self) -> tuple[object, ...]:
        return (self.node_id,) if self._LEASE_GUARD else ()

    @property
    def _not_others(self) -> tuple[object, ...]:
        return (self.node_id,) if self._NOT_OTHERS else ()

    def _lease_new(self, tx: _Tx, row_ids: Sequence[int]) -> None:  # noqa: B027 - a hook: one node needs no leases
        """Lease rows this transaction created to this node (a claim is the claimer's until it is done)."""

    def bind_processing_dir(self, path: Path) -> None:
        """Remember where claimed files wait; refuse a config that moved it while files wait there."""
        with self._write() as tx:
            self._serialize(tx, "meta")
            found = tx.execute("SELECT value FROM meta WHERE key = 'processing_dir'").fetchone()
            if found and found[0] != str(path):
                where, waiting = _in("state", [s.value for s in ACTIVE if s != State.CLAIMING])
                n = tx.execute(f"SELECT COUNT(*) FROM files WHERE {where}", waiting).fetchone()[0]
                if n:
                    raise JournalError(
                        f"folders.processing: {n} unfinished file(s) wait in {found[0]}, but the "
                        f"config now says {path}; move them there or restore the setting"
                    )
            self._set_meta(tx, "processing_dir", str(path))

    def probe(self, now: float) -> None:
        """A small real write: does the journal take writes again (after a full disk, a lost server)?"""
        with self._write() as tx:
            self._set_meta(tx, "probed_at", repr(now))

    # -- writes: each one transaction -------------------------------------------------------

    def add_claims(self, claims: Sequence[bytes | NewClaim], now: float) -> list[Row]:
        """Record files about to be claimed, in one transaction; returns their rows.

        A file that another node has claimed already (an active row with the same inbox path and
        inode: PostgreSQL's unique index) gets no row: the rows returned are those of the claims
        this call made, in order (on SQLite, one per claim)."""
        claims = [c if isinstance(c, NewClaim) else NewClaim(c, secrets.token_hex(8).encode()) for c in claims]
        rows: list[Row] = []
        with self._write() as tx:  # durable: the claim is on disk before the file leaves the inbox
            for c in claims:
                found = tx.execute(
                    "INSERT INTO files (rel_path, state, detected_at, updated_at, next_at, claim_name, file_dev,"
                    " file_ino) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                    (c.rel_path, State.CLAIMING.value, c.detected_at or now, now, now, c.claim_name, c.dev, c.ino),
                ).fetchone()
                if found is not None:  # the row as inserted (every other column at its default)
                    rows.append(
                        Row(
                            found[0],
                            c.rel_path,
                            State.CLAIMING,
                            None,
                            None,
                            None,
                            None,
                            None,
                            0,
                            now,
                            None,
                            None,
                            None,
                            None,
                            None,
                            None,
                            c.detected_at or now,
                            now,
                            None,
                            0,
                            c.claim_name,
                            c.dev,
                            c.ino,
                        )
                    )
            if rows:
                self._lease_new(tx, [r.id for r in rows])
                tx.notify(f"due:{now!r}")
        return rows

    def transition(
        self,
        row: Row,
        state: State,
        now: float,
        *,
        durable: bool = True,
        refresh_if_called_back_since: float | None = None,
        **fields: object,
    ) -> Row:
        """Move one row to ``state`` (a legal move from the state it is in), with other columns,
        in one transaction. A successful move clears the row's failure count unless given.
        ``durable=False``: see the module's docstring. ``refresh_if_called_back_since`` (a move to
        done): if a callback came in since then (the details the export used were fetched then), a
        review may have beaten the export: the row is due for a look again at once (``refresh_at``),
        and the move is made durable."""
        return self.transition_many(
            [row], state, now, durable=durable, refresh_if_called_back_since=refresh_if_called_back_since, **fields
        )[0]

    def transition_many(
        self,
        rows: Sequence[Row],
        state: State,
        now: float,
        *,
        durable: bool = True,
        refresh_if_called_back_since: float | None = None,
        **fields: object,
    ) -> list[Row]:
        for row in rows:
            check_transition(row.state, state)
        fields.setdefault("failures", 0)
        if state not in (State.FAILING, State.FAILED):
            fields.setdefault("error", None)  # moving on: the last failure is history
        if state in TERMINAL:
            fields.setdefault("finished_at", now)
        return self._set(
            rows,
            now,
            {**fields, "state": state.value},
            moving=True,
            durable=durable,
            refresh_since=refresh_if_called_back_since,
        )

    def update(self, row: Row, now: float, *, durable: bool = True, **fields: object) -> Row:
        """Change some columns of a row that stays in its state."""
        return self._set([row], now, fields, durable=durable)[0]

    def update_many(self, rows: Sequence[Row], now: float, **fields: object) -> list[Row]:
        return self._set(rows, now, fields)

    def _set(
        self,
        rows: Sequence[Row],
        now: float,
        fields: dict[str, object],
        moving: bool = False,
        durable: bool = True,
        refresh_since: float | None = None,
    ) -> list[Row]:
        bad = set(fields) - UPDATABLE - ({"state"} if moving else set())
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        if not rows:
            return []
        fields["updated_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = list(fields.values())
        if refresh_since is not None:  # (SET sees the row as it was)
            assignments += ", refresh_at = CASE WHEN callback_at >= ? AND refresh_at IS NULL THEN ? ELSE refresh_at END"
            values += [refresh_since, now]
        found: dict[int, Row] = {}
        with self._writer(durable) if len(rows) > 1 else self._one_statement(durable) as tx:
            if self._ONE_WRITER and len(rows) > 1:  # a batch (claims): one statement per 500 rows
                by_state: dict[State, list[int]] = {}
                for row in rows:
                    by_state.setdefault(row.state, []).append(row.id)
                for was, ids in by_state.items():
                    for start in range(0, len(ids), 500):
                        chunk = ids[start : start + 500]
                        for new in tx.execute(
                            f"UPDATE files SET {assignments} WHERE state = ? AND id IN"
                            f" ({_marks(chunk)}){self._LEASE_GUARD} RETURNING {_COLS}",
                            (*values, was.value, *chunk, *self._guard),
                        ).fetchall():
                            found[new[0]] = _row(new)
            else:  # one row per statement, in one order for every writer: no deadlocks between nodes
                for row in sorted(rows, key=lambda r: r.id):
                    new = tx.execute(
                        f"UPDATE files SET {assignments} WHERE id = ? AND state = ?{self._LEASE_GUARD}"
                        f" RETURNING {_COLS}",
                        (*values, row.id, row.state.value, *self._guard),
                    ).fetchone()
                    if new is not None:
                        found[row.id] = _row(new)
            for row in rows:
                if row.id not in found:  # the transaction rolls back: none of them moved
                    raise IllegalTransition(f"{row.display_path}: no longer {row.state} (row {row.id})")
            if fields.get("next_at") is not None:
                tx.notify(f"due:{fields['next_at']!r}")
        if (
            not durable
            and refresh_since is not None
            and any(found[r.id].refresh_at is not None and r.refresh_at is None for r in rows)
        ):
            self._make_durable()  # a second look armed: not to be lost
        return [found[r.id] for r in rows]

    def start_upload(self, row: Row, token_hash: str, now: float, **fields: object) -> Row:
        """CLAIMED -> UPLOADING with a new attempt's token, kept with every earlier one."""
        check_transition(row.state, State.UPLOADING)
        fields = {**fields, "token_hash": token_hash, "ambiguous_since": None}
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._write() as tx:  # durable: the token is on disk before the POST that carries it
            new = tx.execute(
                f"UPDATE files SET state = ?, updated_at = ?, {assignments} WHERE id = ? AND state = ?"
                f"{self._LEASE_GUARD} RETURNING {_COLS}",
                (State.UPLOADING.value, now, *fields.values(), row.id, row.state.value, *self._guard),
            ).fetchone()
            if new is None:
                raise IllegalTransition(f"{row.display_path}: no longer {row.state} (row {row.id})")
            tx.execute(
                "INSERT INTO upload_tokens (token_hash, row_id, sent_at) VALUES (?, ?, ?)", (token_hash, row.id, now)
            )
        return _row(new)

    def tokens_of(self, row_ids: Iterable[int]) -> dict[str, int]:
        """Every upload attempt's token hash of these rows -> row id."""
        ids = list(row_ids)
        found: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            with self._read() as tx:
                found.update(
                    tx.execute(
                        f"SELECT token_hash, row_id FROM upload_tokens WHERE row_id IN ({_marks(chunk)})", chunk
                    ).fetchall()
                )
        return found

    def first_sent_at(self, row_ids: Iterable[int]) -> float | None:
        """When the earliest upload attempt of these rows was sent."""
        ids = list(row_ids)
        earliest: float | None = None
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            with self._read() as tx:
                found = tx.execute(
                    f"SELECT MIN(sent_at) FROM upload_tokens WHERE row_id IN ({_marks(chunk)})", chunk
                ).fetchone()[0]
            if found is not None and (earliest is None or found < earliest):
                earliest = found
        return earliest

    def tokens_with_documents(self, since: float) -> dict[str, tuple[int, int]]:
        """Tokens sent since ``since`` by files that were uploaded more than once and have their
        document: token -> (row id, document id). A listed document carrying one of them but another
        id is a late copy of an earlier attempt."""
        with self._read() as tx:
            rows = tx.execute(
                "SELECT t.token_hash, f.id, f.document_id FROM upload_tokens t JOIN files f ON f.id = t.row_id"
                " WHERE t.sent_at >= ? AND f.document_id IS NOT NULL AND t.row_id IN"
                " (SELECT row_id FROM upload_tokens WHERE sent_at >= ? GROUP BY row_id HAVING COUNT(*) > 1)",
                (since, since),
            ).fetchall()
        return {token: (row_id, document_id) for token, row_id, document_id in rows}

    def record_extra(self, document_id: int, row: Row, project_id: int | None, now: float) -> bool:
        """Remember a second document of one file, to delete; False if it was known."""
        with self._write() as tx:
            return (
                tx.execute(
                    "INSERT INTO extra_documents (document_id, row_id, project_id, found_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (document_id, row.id, project_id, now),
                ).rowcount
                == 1
            )

    def pending_extras(self, limit: int = 100) -> list[tuple[int, int, int | None]]:
        """(document id, row id, project id) of extra documents not deleted yet."""
        with self._read() as tx:
            return [
                tuple(found)
                for found in tx.execute(
                    "SELECT document_id, row_id, project_id FROM extra_documents WHERE deleted_at IS NULL AND"
                    " error IS NULL ORDER BY found_at, document_id LIMIT ?",
                    (limit,),
                ).fetchall()
            ]

    def settle_extra(self, document_id: int, now: float, error: str | None = None) -> None:
        """An extra document was deleted (or could not be: ``error``)."""
        with self._write() as tx:
            tx.execute(
                "UPDATE extra_documents SET deleted_at = ?, error = ? WHERE document_id = ?",
                (now if error is None else None, error, document_id),
            )

    def mark_uploaded(
        self, row: Row, document_id: int, now: float, poll_at: float, *, durable: bool = True, **fields: object
    ) -> Row:
        """UPLOADING -> UPLOADED. If the callback already came (it can beat the upload's own
        response), the row is due at once; otherwise at ``poll_at``."""
        check_transition(row.state, State.UPLOADED)
        extra = "".join(f", {name} = ?" for name in fields)
        with self._one_statement(durable) as tx:
            found = tx.execute(
                "UPDATE files SET state = ?, document_id = ?, uploaded_at = ?, error = NULL, failures = 0,"
                f" updated_at = ?, next_at = CASE WHEN callback_at IS NOT NULL THEN ? ELSE ? END{extra}"
                f" WHERE id = ? AND state = ?{self._LEASE_GUARD} RETURNING {_COLS}",
                (
                    State.UPLOADED.value,
                    document_id,
                    now,
                    now,
                    now,
                    poll_at,
                    *fields.values(),
                    row.id,
                    row.state.value,
                    *self._guard,
                ),
            ).fetchone()
            if found is None:
                raise IllegalTransition(f"{row.display_path}: no longer {row.state} (row {row.id})")
            new = _row(found)
            if new.next_at is not None:
                tx.notify(f"due:{float(new.next_at)!r}")
        return new

    def schedule_poll(self, row: Row, checked_at: float, now: float, poll_at: float, stage: str) -> Row:
        """Look again at ``poll_at`` - or at once if a callback came in while we were checking.
        Not durable (``durable=False``): lost in a power failure, the row is looked at again at
        start-up (every uploaded row is), which is all this write asks for."""
        with self._write_soon() as tx:
            found = tx.execute(
                "UPDATE files SET stage = ?, updated_at = ?, failures = 0, error = NULL,"
                " next_at = CASE WHEN callback_at >= ? THEN ? ELSE ? END"
                f" WHERE id = ? AND state = ?{self._LEASE_GUARD} RETURNING {_COLS}",
                (stage, now, checked_at, now, poll_at, row.id, row.state.value, *self._guard),
            ).fetchone()
            if found is not None and found[COLUMNS.index("next_at")] is not None:
                tx.notify(f"due:{float(found[COLUMNS.index('next_at')])!r}")
        return _row(found) if found is not None else self.get(row.id)

    def discard(self, row: Row) -> None:
        """Forget a row whose file vanished from the inbox before we took it."""
        with self._write() as tx:
            tx.execute(
                f"DELETE FROM files WHERE id = ? AND state = ?{self._LEASE_GUARD}",
                (row.id, State.CLAIMING.value, *self._guard),
            )

    def clamp_due(self, now: float, max_delay_s: float) -> int:
        """Due times further ahead than any delay could be come from a clock stepped back
        while the daemon was down: make them due now. Returns how many were clamped."""
        where, states = _in("state", [s.value for s in ACTIVE])
        with self._write() as tx:
            n = tx.execute(
                f"UPDATE files SET next_at = ? WHERE {where} AND next_at > ?", (now, *states, now + max_delay_s)
            ).rowcount
            n += tx.execute(
                "UPDATE files SET refresh_at = ? WHERE refresh_at > ? AND state = ?",  # a done file's
                (now, now + max_delay_s, State.DONE.value),
            ).rowcount  # look at a new revision, too
            if n:
                tx.notify(f"due:{now!r}")
        return n

    def record_callback(self, token_hash: str, claimed_document_id: int | None, now: float) -> tuple[str, Row | None]:
        """Record that a callback arrived for a token; returns what happened and the row.

        ``unknown``: no such token. ``mismatch``: the body names another document than the one
        this token was issued for. ``extra``: the token is an earlier attempt's and the body names
        another document than the file's: a late copy, recorded for deletion (after checking).
        ``finished``: the file is already done/failed (a replay), and nothing more happens, except
        for a done file and its current token: Konfuzio calls again after a review or a
        re-extraction, so the pipeline is to look at the document again (``refresh_at``, at most
        once per ``REFRESH_GAP_S``); the row is returned then, else None. ``recorded``: fact stored;
        the pipeline will confirm the outcome with the API. The listeners hear ``callback:<row id>``.

        ``recorded`` is not durable when this returns (``durable=False``): lost in a power failure, it
        is a lost callback, and start-up looks at every uploaded file once (an uploading one is
        reconciled first). The other outcomes that write are durable before the answer.
        """
        refresh = False
        new: Row | None = None
        with self._write_soon() as tx:
            found = tx.execute(
                "SELECT t.token_hash, f.id, f.state, f.document_id, f.token_hash, f.project_id FROM upload_tokens t"
                f" JOIN files f ON f.id = t.row_id WHERE t.token_hash = ?{self._LOCK_ROW}",
                (token_hash,),
            ).fetchone()
            if found is None or not hmac.compare_digest(found[0], token_hash):
                return "unknown", None
            _, row_id, state, document_id, current_token, project_id = found
            if claimed_document_id is not None and document_id is not None and claimed_document_id != document_id:
                if current_token == token_hash:
                    return "mismatch", None
                extra = tx.execute(
                    "INSERT INTO extra_documents (document_id, row_id, project_id, found_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (claimed_document_id, row_id, project_id, now),
                ).rowcount
                refresh = extra == 1
            elif state == State.DONE and current_token == token_hash:
                new = _row(
                    tx.execute(
                        "UPDATE files SET callback_at = ?, refresh_at = COALESCE(refresh_at,"
                        " CASE WHEN updated_at + ? > ? THEN updated_at + ? ELSE ? END)"
                        f" WHERE id = ? AND state = ? RETURNING {_COLS}",
                        (now, REFRESH_GAP_S, now, REFRESH_GAP_S, now, row_id, State.DONE.value),
                    ).fetchone()
                )
                tx.notify(f"callback:{row_id}")
                refresh = True
            elif state in TERMINAL:
                return "finished", None
            else:
                next_at = now if state == State.UPLOADED else None
                new = _row(
                    tx.execute(
                        "UPDATE files SET callback_at = ?, next_at = COALESCE(?, next_at), updated_at = ? WHERE id = ?"
                        f" RETURNING {_COLS}",
                        (now, next_at, now, row_id),
                    ).fetchone()
                )
                tx.notify(f"callback:{row_id}")
        if refresh:  # a second copy to delete, a done file's next revision: nothing else would find them again
            self._make_durable()
        if new is None:
            return "extra", None
        return ("finished" if new.state == State.DONE else "recorded"), new

    # -- done results that may have changed on the server ------------------------------------

    def finish_refresh(self, row: Row, checked_at: float, now: float, **fields: object) -> Row:
        """A refresh of a done row is over (``fields``: e.g. its new ``revision`` and ``fingerprint``),
        in one transaction: ``refresh_at`` is cleared, unless a callback came in since ``checked_at``
        (the document may have changed again after it was fetched)."""
        bad = set(fields) - UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        extra = "".join(f", {name} = ?" for name in fields)
        with self._write() as tx:
            found = tx.execute(
                "UPDATE files SET refresh_at = CASE WHEN callback_at >= ? THEN ? ELSE NULL END, failures = 0,"
                f" error = NULL, updated_at = ?{extra} WHERE id = ? AND state = ?{self._LEASE_GUARD}"
                f" RETURNING {_COLS}",
                (checked_at, now + REFRESH_GAP_S, now, *fields.values(), row.id, State.DONE.value, *self._guard),
            ).fetchone()
            if found is None:
                raise IllegalTransition(f"{row.display_path}: no longer {State.DONE} (row {row.id})")
        return _row(found)

    def due_refreshes(self, now: float, exclude: Iterable[int], limit: int) -> list[Row]:
        """Done rows whose ``refresh_at`` has come, earliest first, skipping ``exclude``."""
        not_excluded, exclude_ = _in("id", list(exclude), negate=True)
        return self._select(
            f"SELECT {_COLS} FROM files WHERE refresh_at <= ? AND state = ? AND {not_excluded}"
            " ORDER BY refresh_at, id LIMIT ?",
            (now, State.DONE.value, *exclude_, limit),
        )

    def next_refresh_at(self, exclude: Iterable[int]) -> float | None:
        not_excluded, exclude_ = _in("id", list(exclude), negate=True)
        with self._read() as tx:
            return tx.execute(
                f"SELECT MIN(refresh_at) FROM files WHERE refresh_at IS NOT NULL AND state = ?"
                f" AND {not_excluded}{self._LEASE_GUARD}",
                (State.DONE.value, *exclude_, *self._guard),
            ).fetchone()[0]

    # -- reads --------------------------------------------------------------------------------

    def get(self, row_id: int) -> Row:
        rows = self._select(f"SELECT {_COLS} FROM files WHERE id = ?", (row_id,))
        if not rows:
            raise KeyError(row_id)
        return rows[0]

    def get_many(self, row_ids: Sequence[int]) -> list[Row]:
        found: dict[int, Row] = {}
        for start in range(0, len(row_ids), 500):
            chunk = list(row_ids[start : start + 500])
            for row in self._select(f"SELECT {_COLS} FROM files WHERE id IN ({_marks(chunk)})", chunk):
                found[row.id] = row
        return [found[i] for i in row_ids if i in found]

    def runnable(self, states: Iterable[State], now: float, exclude: Iterable[int], limit: int) -> list[Row]:
        """Rows in ``states`` whose ``next_at`` has come, oldest first, skipping ``exclude``."""
        in_states, states_ = _in("state", [s.value for s in states])
        not_excluded, exclude_ = _in("id", list(exclude), negate=True)
        sql = (
            f"SELECT {_COLS} FROM files WHERE {in_states} AND next_at <= ? AND {not_excluded}"
            " ORDER BY next_at, id LIMIT ?"
        )
        return self._select(sql, (*states_, now, *exclude_, limit))

    def next_due_at(self, states: Iterable[State], exclude: Iterable[int]) -> float | None:
        """The earliest ``next_at`` of rows in ``states``, skipping ``exclude`` and rows another node
        holds (in hand there; or, expired, waiting to be taken over with ``take_over_expired``)."""
        return min(self.next_due_by_state(states, exclude).values(), default=None)

    def next_due_by_state(self, states: Iterable[State], exclude: Iterable[int]) -> dict[State, float]:
        """``next_due_at`` of each of ``states`` in one query (the scheduling loop asks after every
        event); a state without rows is left out."""
        # Per state, the first row in (state, next_at) index order that is not excluded: a walk over
        # at most the rows in hand. MIN(next_at) with the exclusion visited every row of the states
        # (0.24 ms with 1,000 rows against 0.03, after every event of the loop; a backlog has 100,000).
        wanted = list(dict.fromkeys(states))
        if not wanted:
            return {}
        not_excluded, exclude_ = _in("id", list(exclude), negate=True)
        first = (
            f"(SELECT next_at FROM files WHERE state = ? AND next_at IS NOT NULL AND {not_excluded}"
            f"{self._NOT_OTHERS} ORDER BY next_at LIMIT 1)"
        )
        params = [p for state in wanted for p in (state.value, *exclude_, *self._not_others)]
        with self._read() as tx:
            found = tx.execute("SELECT " + ", ".join([first] * len(wanted)), params).fetchone()
        return {state: due for state, due in zip(wanted, found, strict=True) if due is not None}

    def rows(self, states: Iterable[State] = (), limit: int = 1000) -> list[Row]:
        values = [s.value for s in states]
        if values:
            where, values = _in("state", values)
            return self._select(f"SELECT {_COLS} FROM files WHERE {where} ORDER BY id LIMIT ?", (*values, limit))
        return self._select(f"SELECT {_COLS} FROM files ORDER BY id LIMIT ?", (limit,))

    def find_by_token_hash(self, token_hash: str) -> Row | None:
        rows = self._select(
            f"SELECT {_F_COLS} FROM upload_tokens t JOIN files f ON f.id = t.row_id WHERE t.token_hash = ?",
            (token_hash,),
        )
        return rows[0] if rows else None

    def claim_names(self, states: Iterable[State]) -> set[bytes]:
        """The processing/ names of rows in these states (legacy rows: their id)."""
        where, values = _in("state", [s.value for s in states])
        with self._read() as tx:
            found = tx.execute(f"SELECT id, claim_name FROM files WHERE {where}", values).fetchall()
        return {bytes(name) if name is not None else str(row_id).encode() for row_id, name in found}

    def finished_claims(self, names: Iterable[bytes]) -> dict[bytes, Row]:
        """Done or failed rows whose processing/ name is one of ``names``: claim name -> row."""
        wanted = list(names)
        found: dict[bytes, Row] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            where, states = _in("state", [s.value for s in TERMINAL])
            for row in self._select(
                f"SELECT {_COLS} FROM files WHERE claim_name IN ({_marks(chunk)}) AND {where}", (*chunk, *states)
            ):
                assert row.claim_name is not None
                found[bytes(row.claim_name)] = row
        return found

    def meta(self, key: str) -> str | None:
        with self._read() as tx:
            found = tx.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return found[0] if found else None

    def find_same_content(self, sha256: str, exclude_id: int) -> Row | None:
        """The earliest other file with this content that is done or on its way there."""
        where, states = _in(
            "state", [State.DONE.value, State.UPLOADING.value, State.UPLOADED.value, State.EXPORTING.value]
        )
        rows = self._select(
            f"SELECT {_COLS} FROM files WHERE sha256 = ? AND id != ? AND {where} ORDER BY id LIMIT 1",
            (sha256, exclude_id, *states),
        )
        return rows[0] if rows else None

    def counts(self) -> dict[State, int]:
        with self._read() as tx:
            found = dict(tx.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        return {state: found.get(state.value, 0) for state in State}

    def oldest_active(self) -> Row | None:
        where, states = _in("state", [s.value for s in ACTIVE])
        rows = self._select(f"SELECT {_COLS} FROM files WHERE {where} ORDER BY detected_at LIMIT 1", states)
        return rows[0] if rows else None

    def oldest_active_detected_at(self) -> float | None:
        where, states = _in("state", [s.value for s in ACTIVE])
        with self._read() as tx:
            return tx.execute(f"SELECT MIN(detected_at) FROM files WHERE {where}", states).fetchone()[0]

    def _select(self, sql: str, params: Sequence[object]) -> list[Row]:
        with self._read() as tx:
            return [_row(values) for values in tx.execute(sql, params).fetchall()]

    # -- a cluster of nodes: here what one node needs; journal_pg.PgJournal does the rest ------

    def join(self, inbox_marker: str | None = None, clock_offset_s: float | None = None) -> None:  # noqa: B027
        """This node starts (the daemon, once): it is listed in ``nodes``, with what its marker file in
        the inbox says (``check`` compares what each node sees) and how far the journal's clock is ahead
        of its own (``status`` shows a node whose clock is off). Single node: nothing to do."""

    def heartbeat(self, clock_offset_s: float | None = None) -> None:  # noqa: B027 - one node: nobody to tell
        """Say that this node is alive (every few seconds), and its clock's offset now. Single node:
        nothing to do."""

    def clock_offset(self, local: Callable[[], float] = time.time) -> ClockOffset:
        """How far the journal's clock is ahead of ``local`` (every time the nodes of a cluster compare is
        on it). Single node: the journal has no clock of its own; the daemon's is the one: 0."""
        return ClockOffset(0.0, 0.0)

    def leave(self, keep: Iterable[int] = ()) -> None:  # noqa: B027 - one node: nobody to tell
        """This node stops (the daemon, once): its leases go at once, except on the rows in ``keep``
        (steps cut off at shutdown: those expire, and are taken over like a dead node's). Single node:
        nothing to do."""

    def nodes(self) -> list[Node]:
        """The nodes that use this journal, as they last said. Single node: this one."""
        return [Node(self.node_id, socket.gethostname(), os.getpid(), self._started_at, _now(), 0.0)]

    def take_due(
        self, states: Iterable[State], now: float, exclude: Iterable[int], limit: int, lease_s: float = 60.0
    ) -> list[Row]:
        """Like ``runnable``, and lease the rows to this node for ``lease_s`` seconds, skipping rows that
        another node holds (even with its lease expired: ``take_over_expired`` takes those, to be
        recovered first) or is taking right now. Single node: ``runnable``."""
        return self.runnable(states, now, exclude, limit)

    def take_due_refreshes(self, now: float, exclude: Iterable[int], limit: int, lease_s: float = 60.0) -> list[Row]:
        """Like ``due_refreshes``, and lease the rows to this node (an expired lease of another node's
        may be taken: a refresh needs no recovery). Single node: ``due_refreshes``."""
        return self.due_refreshes(now, exclude, limit)

    def renew_leases(self, row_ids: Iterable[int], lease_s: float = 60.0) -> set[int]:
        """Extend this node's leases on these rows; returns the ids it still holds (a row whose lease
        another node took over is no longer this node's to work on). Single node: all of them."""
        return set(row_ids)

    def release_leases(self, row_ids: Iterable[int]) -> None:  # noqa: B027 - one node: no leases
        """Give up this node's leases on these rows (the step is done). Single node: nothing to do."""

    def take_over_expired(
        self, lease_s: float = 60.0, limit: int = 100, *, own: bool = False, exclude: Iterable[int] = ()
    ) -> list[Row]:
        """Lease to this node the active rows whose lease expired (their node died or hung), to be
        recovered as after a crash; with ``own``, also the rows this node holds itself (a previous run
        of it, or writes lost with the connection) except those in ``exclude`` (in hand). Single node:
        none (a restart recovers every row)."""
        return []

    def make_due(self, states: Iterable[State], now: float) -> int:
        """Make every row in ``states`` that no other node holds due at ``now``; returns how many."""
        where, values = _in("state", [s.value for s in states])
        with self._write() as tx:
            n = tx.execute(
                f"UPDATE files SET next_at = ? WHERE {where}{self._NOT_OTHERS}", (now, *values, *self._not_others)
            ).rowcount
            if n:
                tx.notify(f"due:{now!r}")
        return n

    def lease_of(self, row_id: int) -> Lease | None:
        """Who works on a row, and for how long. Single node: nobody else; None."""
        return None

    def lease_holders(self, row_ids: Iterable[int]) -> dict[int, str]:
        """Row id -> the node holding it, for those of these rows that are leased. Single node: {}."""
        return {}

    def leases_by_node(self) -> dict[str, int]:
        """Node id -> how many rows it holds. Single node: {}."""
        return {}

    def role(self, name: str) -> Role:
        """A job that one node at a time does, e.g. ``role("rescanner")``. Single node: always this one."""
        return _LocalRole(name)

    def listen(self, callback: Callable[[str], None]) -> Listener:
        """Call ``callback(payload)`` for every notification on ``CHANNEL`` (see there). Close the
        returned listener to stop. Single node: the notifications of this journal object, called in
        the thread that wrote, after the commit."""
        listener = _LocalListener(self, callback)
        self._listeners.append(listener)
        return listener

    def notify(self, payload: str) -> None:
        """Send ``payload`` to every listener (every node's)."""
        self._deliver([payload])

    def _deliver(self, payloads: Sequence[str]) -> None:
        for payload in dict.fromkeys(payloads):  # like NOTIFY: one of equal payloads per transaction
            for listener in list(self._listeners):
                listener.callback(payload)


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection, single: bool = False):
        self.db = db
        self.notices: list[str] = []
        self.seq = 0  # the commit's number (group commit)
        self.single = single
        self.statements = 0

    def execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        if not self.single:
            return self.db.execute(sql, params)
        self.statements += 1
        if self.statements > 1:
            raise RuntimeError("a one-statement write ran a second statement")
        cursor = self.db.execute(sql, params)
        return _Stepped(cursor.fetchall(), cursor.rowcount)  # stepped to the end: committed, or raised

    def notify(self, payload: str) -> None:
        self.notices.append(payload)


class _Stepped:
    """The rows of a statement run to its end (autocommit: it has committed when this exists)."""

    def __init__(self, rows: list[Any], rowcount: int):
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows


class SqliteJournal(BaseJournal):
    """The journal in one SQLite file on a local disk: one connection writes, under a lock; a second,
    query-only one reads, under its own.

    Durability: the connection runs WAL with ``synchronous=NORMAL`` (SQLite syncs the WAL before a
    checkpoint, the database file after it and the WAL header when the WAL is reused, so the file is
    never damaged), and a durable write (``_write``) returns only after an fdatasync of the WAL that
    began after its COMMIT: what ``synchronous=FULL`` guarantees. The fsync runs outside the
    connection's lock, so other threads commit meanwhile; the next fsync then covers all of them at
    once (group commit: one leader syncs, the others wait for it, each released only by an fsync
    that started after its own commit). A failed fsync is final for this process: the kernel may
    have dropped the pages it could not write, so no later write is reported durable; the daemon
    pauses until it is restarted. A write of one statement (most moves of one row) runs without
    BEGIN and COMMIT (``_one_statement``): SQLite commits it as it completes, under the same lock
    and the same rules.
    """

    schema_version = SCHEMA_VERSION
    _ONE_WRITER = True

    def __init__(
        self, path: Path, *, allow_network_fs: bool = False, mountinfo: str | None = None, node_id: str | None = None
    ):
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not allow_network_fs:
            fstype = filesystem_type(path.parent, mountinfo)
            if fstype in NETWORK_FILESYSTEMS:
                raise JournalError(
                    f"folders.state: {path.parent} is on a network file system ({fstype}); "
                    "SQLite WAL needs a local disk"
                )
        self.path = path
        self.location = str(path)
        self.node_id = node_id or default_node_id()
        self._lock = threading.Lock()
        # Group commit: ``_committed`` counts commits that wrote something, ``_synced`` how many of
        # them an fsync of the WAL covers; one thread at a time (``_syncing``) runs the fsync.
        self._committed = 0
        self._synced = 0
        self._syncing = False
        self._sync_failed: str | None = None
        self._sync_done = threading.Condition(threading.Lock())
        self._wal_fd: int | None = None
        self.syncs = 0  # fsyncs of the WAL so far (tests, benchmarks)
        self._cached: dict[str, tuple[tuple[int, int], Any]] = {}  # counts() and oldest_active_detected_at()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._create()
            # Reads go through a second connection with its own lock: WAL lets it read what is
            # committed while a write is under way, so the scheduling loop's queries never wait
            # behind the workers' transactions (the loop waited ~40 % of its time at 32 uploads).
            # Every statement here is its own transaction: it sees each commit made before it.
            self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._reader.execute("PRAGMA query_only=1")
            self._read_lock = threading.Lock()
        except (sqlite3.Error, JournalWriteError) as exc:
            raise JournalError(f"cannot read the journal {path}: {exc}") from None

    def _create(self) -> None:
        self._db.executescript(SCHEMA)
        with self._write() as tx:
            found = tx.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(found[0]) if found else 1
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"{self.path}: written by a newer konfuzio-watch (schema {version}, this one "
                    f"knows {SCHEMA_VERSION}); upgrade konfuzio-watch"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    tx.execute(statement)
            self._set_meta(tx, "schema_version", str(SCHEMA_VERSION))
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('journal_id', ?) ON CONFLICT DO NOTHING", (secrets.token_hex(8),)
            )
        self.journal_id: str = self._db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()
        with self._sync_done:
            while self._syncing:  # a leader's fsync in progress: its descriptor stays open until it ends
                self._sync_done.wait()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None

    def _write(self) -> AbstractContextManager[_SqliteTx]:
        """A durable write: committed, and the WAL fsynced since, before the caller goes on."""
        return self._writing(durable=True)

    def _write_soon(self) -> AbstractContextManager[_SqliteTx]:
        """A write committed (visible, kept by SIGKILL) but not synced: the next durable write syncs it."""
        return self._writing(durable=False)

    def _one_statement(self, durable: bool) -> AbstractContextManager[_SqliteTx]:
        """One statement in SQLite's autocommit mode: atomic on its own, and without BEGIN and COMMIT
        it gives up the interpreter once instead of three times while it holds the lock (at 32
        uploads in flight, the waits for the interpreter inside the lock were most of its hold time)."""
        return self._writing(durable, single=True)

    def _make_durable(self) -> None:
        self._sync_through(self._committed)

    @contextmanager
    def _writing(self, durable: bool, single: bool = False) -> Iterator[_SqliteTx]:
        with self._commit(single=single) as tx:
            yield tx
        if durable:
            self._sync_through(tx.seq)
        self._deliver(tx.notices)

    @contextmanager
    def _commit(self, single: bool = False) -> Iterator[_SqliteTx]:
        tx = _SqliteTx(self._db, single=single)
        with self._lock:
            if self._sync_failed is not None:
                raise JournalWriteError(
                    f"an earlier fsync of the journal failed ({self._sync_failed}); restart konfuzio-watch"
                )
            try:
                changes = self._db.total_changes
                if single:
                    yield tx
                else:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        yield tx
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                    self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise JournalWriteError(str(exc)) from exc
            if self._db.total_changes != changes:  # a transaction that changed nothing needs no fsync
                self._committed += 1
            tx.seq = self._committed

    def _sync_through(self, seq: int) -> None:
        """Return once an fsync of the WAL that began after commit number ``seq`` has finished."""
        with self._sync_done:
            while True:
                if self._sync_failed is not None:
                    raise JournalWriteError(
                        f"an earlier fsync of the journal failed ({self._sync_failed}); restart konfuzio-watch"
                    )
                if self._synced >= seq:
                    return
                if not self._syncing:
                    break
                self._sync_done.wait()
            self._syncing = True
            target = self._committed  # every commit counted so far is in the WAL file
        try:
            self._fdatasync_wal()
        except OSError as exc:
            with self._sync_done:
                self._syncing = False
                self._sync_failed = exc.strerror or str(exc)
                self._sync_done.notify_all()
            raise JournalWriteError(f"cannot fsync the journal: {self._sync_failed}") from exc
        with self._sync_done:
            self._syncing = False
            self._synced = max(self._synced, target)
            self.syncs += 1
            self._sync_done.notify_all()

    def _fdatasync_wal(self) -> None:
        wal = f"{self.path}-wal"
        if self._wal_fd is not None:
            try:
                same = os.path.samestat(os.fstat(self._wal_fd), os.stat(wal))
            except FileNotFoundError:
                same = False
            if not same:  # SQLite made a new WAL file (e.g. the last other connection removed it)
                os.close(self._wal_fd)
                self._wal_fd = None
        if self._wal_fd is None:
            self._wal_fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
        os.fdatasync(self._wal_fd)

    @contextmanager
    def _read(self) -> Iterator[_SqliteTx]:
        with self._read_lock:
            yield _SqliteTx(self._reader)

    # -- the status line's figures, read again only when the journal changed ---------------------

    def _version(self) -> tuple[int, int]:
        """Changes as (this connection's commits that wrote something, SQLite's data_version: other
        connections' commits, e.g. ``konfuzio-watch retry``)."""
        with self._lock:
            return self._committed, self._db.execute("PRAGMA data_version").fetchone()[0]

    def counts(self) -> dict[State, int]:
        """Rows per state. The daemon asks every few seconds (status line, metrics); with tens of
        thousands of rows the count was most of an idle daemon's CPU, so it is kept until a commit."""
        version = self._version()
        cached = self._cached.get("counts")
        if cached is None or cached[0] != version:
            cached = self._cached["counts"] = (version, super().counts())
        return dict(cached[1])

    def oldest_active_detected_at(self) -> float | None:
        version = self._version()
        cached = self._cached.get("oldest")
        if cached is None or cached[0] != version:
            cached = self._cached["oldest"] = (version, super().oldest_active_detected_at())
        return cached[1]

    def schema_found(self) -> int | None:
        with self._read() as tx:
            if tx.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
                return None
            found = tx.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(found[0]) if found else 1

    def quick_check(self) -> str:
        with self._lock:
            return "; ".join(r[0] for r in self._db.execute("PRAGMA quick_check(5)").fetchall())

    def integrity_check(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]


#: The name existing callers use: the SQLite journal.
Journal = SqliteJournal


def open_journal(config: Config, **kwargs: Any) -> BaseJournal:
    """The journal the config names: PostgreSQL with a ``journal.url``, else SQLite in ``folders.state``.
    Keyword arguments go to the journal's class (e.g. ``migrate=False`` for PostgreSQL)."""
    url = config.journal.url
    if url is None:
        return SqliteJournal(config.journal_path, node_id=config.node_id, **kwargs)
    try:
        from .journal_pg import PgJournal
    except ImportError as exc:
        raise JournalError(f"journal.url: PostgreSQL needs psycopg ({exc}); install konfuzio-watch[postgres]") from None
    kwargs.setdefault("lease_s", config.node.lease_seconds)
    return PgJournal(url, password=config.journal_password(), node_id=config.node_id, **kwargs)


def _now() -> float:
    return time.time()


def _row(values: Sequence[object]) -> Row:
    data = dict(zip(COLUMNS, values, strict=True))
    data["state"] = State(data["state"])
    return Row(**data)


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


def _in(column: str, values: Sequence[object], *, negate: bool = False) -> tuple[str, list[object]]:
    """``column IN (?, ...)`` and its values; an empty list matches nothing (NOT IN: everything)."""
    if not values:
        return ("1 = 1" if negate else "1 = 0"), []
    return f"{column} {'NOT IN' if negate else 'IN'} ({_marks(values)})", list(values)


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
