"""The SQLite journal, the embedded default: one file on a local disk, for one daemon.

Durability comes from the WAL and a group commit: a durable write returns after an fsync of the WAL
that began after its commit, several threads' commits sharing one fsync (``SqliteJournal``).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

from ..states import State
from .base import BaseJournal
from .coordination import LocalCoordination, default_node_id
from .errors import JournalError, JournalWriteError
from .schema import SQLITE, migrate, migrations

MIGRATIONS = migrations(SQLITE)
SCHEMA_VERSION = max(MIGRATIONS)

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


class SqliteJournal(LocalCoordination, BaseJournal):
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
    #: SQLite holds one node's journal: coordination is local (``coordination.LocalCoordination``).
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
            # behind the workers' transactions (with many uploads in flight it waited there much of its time).
            # Every statement here is its own transaction: it sees each commit made before it.
            self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._reader.execute("PRAGMA query_only=1")
            self._read_lock = threading.Lock()
        except (sqlite3.Error, JournalWriteError) as exc:
            raise JournalError(f"cannot read the journal {path}: {exc}") from None

    def _create(self) -> None:
        with self._write() as tx:
            migrate(tx, SQLITE, MIGRATIONS, SCHEMA_VERSION, self.location)
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
        it gives up the interpreter once instead of three times while it holds the lock (with many
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
        """Rows per state. The daemon asks every few seconds (status line, metrics); with a large journal
        the count was most of an idle daemon's CPU, so it is kept until a commit."""
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
            if tx.execute(SQLITE.table_exists, ("meta",)).fetchone() is None:
                return None
            found = tx.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(found[0]) if found else 1

    def quick_check(self) -> str:
        with self._lock:
            return "; ".join(r[0] for r in self._db.execute("PRAGMA quick_check(5)").fetchall())

    def integrity_check(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]


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
