"""The journal in PostgreSQL: one journal for several daemons ("nodes") on one shared inbox.

Every method of ``BaseJournal`` behaves as on SQLite (the statements they share are written once,
in ``journal.py``; ``tests/test_journal.py`` runs the same tests on both). What PostgreSQL adds:

- Concurrency: SQLite serialises every write (``BEGIN IMMEDIATE``); here a row a write reads and
  then changes is locked (``FOR UPDATE``), and the guard ``WHERE id = ? AND state = ?`` does the
  rest: of two nodes moving one row, the second finds it moved (``IllegalTransition``).
- One claim per file: a unique index on the inbox path and inode of the active rows (the inode is
  the file's identity across the nodes' mounts: NFS and CIFS with ``serverino`` give the server's;
  the device number is each client's own). A second node's claim of a file gets no row.
- One clock: the database's. Leases are timed by it in SQL (``lease_until``); every other time a node
  writes for the others to compare (due times, when an upload timed out, ...) is on it too: the node's
  clock is its own plus the offset to the database's, measured at ``join`` and at every ``heartbeat``
  (``clock_offset``; ``clock.DatabaseClock``), and each node's offset is in ``nodes``.
- Leases: ``take_due`` leases the due rows it returns to this node (``SELECT ... FOR UPDATE SKIP
  LOCKED``), the node renews them while it works; a node whose lease another node took over cannot write that row any
  more. A new claim is its claimer's from the start (``add_claims``). ``take_over_expired`` takes
  the rows of a node that died, which ``take_due`` leaves alone: they are recovered first.
- ``nodes`` with heartbeats, roles that one node at a time holds (``pg_try_advisory_lock`` on a
  connection of their own: a node that dies loses them), and ``LISTEN/NOTIFY`` on ``CHANNEL``.

Connections: psycopg 3 with a small ``psycopg_pool.ConnectionPool``, each connection checked
before use (after a server restart the first call works again), autocommit, and one explicit
transaction per write. A server that cannot be reached makes every call raise ``JournalUnavailable``
(a ``JournalWriteError``) within ``wait_s``; it works again as soon as the server is back. Both ends
of every connection use TCP keepalives (and the client a ``tcp_user_timeout``), so a cut cable is
noticed in about half a minute: by the node (its calls fail instead of hanging) and by the server
(the roles a cut-off node held, e.g. the rescanner's, pass to another node).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from enum import Enum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg_pool

from .clock import ClockOffset, measure_offset
from .journal import (
    _F_COLS,
    ACTIVE,
    CHANNEL,
    BaseJournal,
    JournalError,
    JournalUnavailable,
    JournalWriteError,
    Lease,
    Node,
    Row,
    State,
    _row,
    default_node_id,
)

log = logging.getLogger(__name__)
# The pool says every failed connection attempt (a few a second while the server is away) and every
# broken connection it drops; the journal gate says an outage once, and its end (gates.py). The
# pool's own errors stay.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

_ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in ACTIVE)
_STATES_SQL = ", ".join(f"'{s.value}'" for s in State)

# Version 1: the SQLite journal's schema 4 in PostgreSQL's types (BYTEA for names, which need not be
# UTF-8; DOUBLE PRECISION for times in seconds since the epoch), and what a cluster needs.
PG_SCHEMA = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"""CREATE TABLE files (
        id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- never reused: names processing/ files
        rel_path        BYTEA NOT NULL,
        state           TEXT NOT NULL CHECK (state IN ({_STATES_SQL})),
        size            BIGINT,
        sha256          TEXT,
        upload_name     TEXT,
        token_hash      TEXT UNIQUE,
        document_id     BIGINT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_at         DOUBLE PRECISION,
        callback_at     DOUBLE PRECISION,
        uploaded_at     DOUBLE PRECISION,
        final_path      BYTEA,
        error           TEXT,
        stage           TEXT,
        project_id      BIGINT,
        detected_at     DOUBLE PRECISION NOT NULL,
        updated_at      DOUBLE PRECISION NOT NULL,
        finished_at     DOUBLE PRECISION,
        failures        INTEGER NOT NULL DEFAULT 0,
        claim_name      BYTEA,
        file_dev        BIGINT,
        file_ino        BIGINT,
        mtime_ns        BIGINT,
        ambiguous_since DOUBLE PRECISION,
        revision        INTEGER NOT NULL DEFAULT 0,
        fingerprint     TEXT,
        refresh_at      DOUBLE PRECISION,
        lease_node      TEXT,             -- the node working on the row ...
        lease_until     TIMESTAMPTZ       -- ... until then (the database's clock), unless it renews
    )""",
    "CREATE INDEX files_state_next ON files (state, next_at)",
    "CREATE INDEX files_sha256 ON files (sha256)",
    "CREATE INDEX files_refresh ON files (refresh_at) WHERE refresh_at IS NOT NULL",
    "CREATE INDEX files_lease ON files (lease_until) WHERE lease_node IS NOT NULL",
    # One active row per file: its inbox path and inode. A file at a path whose earlier file is still
    # on its way (another inode) is a new file; rows finish and the same path and inode can return.
    # Without an inode (NULL) a claim has no identity to compare, and nothing is refused.
    f"CREATE UNIQUE INDEX files_active_claim ON files (rel_path, file_ino) WHERE state IN ({_ACTIVE_SQL})",
    "CREATE TABLE upload_tokens (token_hash TEXT PRIMARY KEY, row_id BIGINT NOT NULL,"
    " sent_at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX upload_tokens_row ON upload_tokens (row_id)",
    "CREATE TABLE extra_documents (document_id BIGINT PRIMARY KEY, row_id BIGINT NOT NULL, project_id BIGINT,"
    " found_at DOUBLE PRECISION NOT NULL, deleted_at DOUBLE PRECISION, error TEXT)",
    "CREATE TABLE nodes (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER, started_at TIMESTAMPTZ NOT NULL,"
    " heartbeat_at TIMESTAMPTZ NOT NULL)",
]
# Schema version -> statements that bring the previous version to it (as journal.MIGRATIONS). A new
# journal is created at version 1 and brought up through all of them, so both paths are one path.
PG_MIGRATIONS: dict[int, list[str]] = {
    # What each node's marker file in the inbox says: another node reads the file to see that both
    # watch the same folder (``konfuzio-watch check``).
    2: ["ALTER TABLE nodes ADD COLUMN inbox_marker TEXT"],
    3: ["ALTER TABLE files ADD COLUMN ctime_ns BIGINT"],  # as the SQLite journal's schema 5
    # How far the database's clock is ahead of each node's own (``status`` shows a node whose clock is off).
    4: ["ALTER TABLE nodes ADD COLUMN clock_offset_s DOUBLE PRECISION"],
}
PG_SCHEMA_VERSION = max(PG_MIGRATIONS, default=1)
# Nodes silent this long are forgotten when another node joins (their leases long taken over).
FORGET_NODES_AFTER = "7 days"


def lock_key(name: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of a named konfuzio-watch lock."""
    return int.from_bytes(hashlib.sha256(f"konfuzio-watch:{name}".encode()).digest()[:8], "big", signed=True)


SCHEMA_LOCK = lock_key("schema")


@functools.lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """The shared statements' ``?`` marks as psycopg's ``%s`` (no shared statement has a ``%``)."""
    assert "%" not in sql, sql
    return sql.replace("?", "%s")


def _adapt(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def _unavailable(exc: psycopg.Error) -> bool:
    """Whether an error means the server cannot be reached (rather than that it refused a write)."""
    state = getattr(exc, "sqlstate", None)
    return state is None or state.startswith(("08", "57P"))


_MAPPED = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction)


def _mapped(exc: psycopg.Error, location: str, reading: bool) -> JournalWriteError:
    text = str(exc).strip() or type(exc).__name__
    if reading or _unavailable(exc):
        return JournalUnavailable(f"the journal {location} cannot be reached: {text}")
    return JournalWriteError(text)


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Any]):
        self.conn = conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(_pg(sql), [_adapt(p) for p in params])

    def notify(self, payload: str) -> None:
        self.conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def without_password(url: str) -> str:
    """The URL for messages: a password in it (which the config refuses anyway) left out."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))


class PgJournal(BaseJournal):
    """The journal in a PostgreSQL database, shared by the nodes of a cluster.

    ``url``: a libpq URL or connection string. ``password``: from the config's password file (else
    libpq's ``PGPASSWORD`` or ``~/.pgpass``). ``migrate``: create or upgrade the schema (the
    daemon); False leaves the database as it is (``check``). ``wait_s``: how long a call waits for a
    connection before it raises ``JournalUnavailable``.
    """

    schema_version = PG_SCHEMA_VERSION
    shared = True
    _LOCK_ROW = " FOR UPDATE OF f"
    _LEASE_GUARD = " AND (lease_node IS NULL OR lease_node = ? OR lease_until < now())"
    _NOT_OTHERS = " AND (lease_node IS NULL OR lease_node = ?)"

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        node_id: str | None = None,
        migrate: bool = True,
        pool_size: int = 6,
        wait_s: float = 10.0,
        connect_timeout_s: int = 5,
        lock_timeout_s: float = 10.0,
        lease_s: float = 60.0,
    ):
        super().__init__()
        self.url = url
        self.location = without_password(url)
        self.node_id = node_id or default_node_id()
        self.wait_s = wait_s
        self.lease_s = lease_s
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, int(connect_timeout_s)),
            "application_name": f"konfuzio-watch {self.node_id}"[:63],
            # A node cut off without a word (a dead peer, a pulled cable) is noticed in about half a
            # minute: keepalives on an idle connection, and data unacknowledged for 20 s on a busy one.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 20_000,
        }
        if password is not None:
            self._kwargs["password"] = password
        self._lock_timeout_ms = int(lock_timeout_s * 1000)
        self._roles: dict[str, _PgRole] = {}
        self._listeners_pg: list[_PgListener] = []
        self.journal_id = ""
        try:
            with self.connect() as conn:
                if migrate:
                    self._create(conn)
                if conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()[0]:
                    found = conn.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
                    self.journal_id = found[0] if found else ""
        except psycopg.Error as exc:
            raise JournalError(f"cannot open the journal {self.location}: {str(exc).strip()}") from None
        self._pool = psycopg_pool.ConnectionPool(
            url,
            kwargs=self._kwargs,
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            configure=self._configure,
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=wait_s,
            name=f"journal-{self.node_id}",
            # Reconnection attempts back off (1 s, 2 s, 4 s ...) only this long; then the next call starts
            # them afresh: a server back after a long outage is used again within seconds, not minutes.
            reconnect_timeout=max(wait_s, 2.0),
            num_workers=1,
        )
        try:
            self._pool.open(wait=True, timeout=max(wait_s, connect_timeout_s))
        except psycopg.Error as exc:
            self._pool.close()
            raise JournalError(f"cannot open the journal {self.location}: {str(exc).strip()}") from None

    def connect(self) -> psycopg.Connection[Any]:
        """A connection of its own (not from the pool), autocommit, configured like the pool's."""
        conn = psycopg.connect(self.url, **self._kwargs)
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        # A row another node keeps locked makes a write fail (and be retried) rather than hang.
        conn.execute(f"SET lock_timeout = {self._lock_timeout_ms}")
        conn.execute("SET idle_in_transaction_session_timeout = 60000")
        # The server's end notices a node that vanished (power off, cut cable) in about 25 s and ends
        # its session, releasing what it held (a role's advisory lock). Ignored on a Unix socket.
        conn.execute("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3")

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))  # nodes starting together: one creates
            if conn.execute("SELECT to_regclass('meta') IS NULL").fetchone()[0]:
                for statement in PG_SCHEMA:
                    conn.execute(statement)
                version = 1
            else:
                found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(found[0]) if found else 1
            if version > self.schema_version:
                raise JournalError(
                    f"{self.location}: written by a newer konfuzio-watch (schema {version}, this one "
                    f"knows {self.schema_version}); upgrade konfuzio-watch"
                )
            for target in range(version + 1, self.schema_version + 1):
                for statement in PG_MIGRATIONS[target]:
                    conn.execute(statement)
            self._set_meta(_PgTx(conn), "schema_version", str(self.schema_version))
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('journal_id', %s) ON CONFLICT DO NOTHING",
                (secrets.token_hex(8),),
            )

    def close(self) -> None:
        for child in [*self._listeners_pg, *self._roles.values()]:
            child.close()
        self._pool.close()

    @contextmanager
    def _write(self) -> Iterator[_PgTx]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield _PgTx(conn)
        except _MAPPED as exc:
            raise _mapped(exc, self.location, reading=False) from exc

    @contextmanager
    def _read(self) -> Iterator[_PgTx]:
        try:
            with self._pool.connection() as conn:
                yield _PgTx(conn)
        except _MAPPED as exc:
            raise _mapped(exc, self.location, reading=True) from exc

    def _serialize(self, tx: _PgTx, what: str) -> None:  # type: ignore[override]
        tx.conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(what),))

    def schema_found(self) -> int | None:
        with self._read() as tx:
            if tx.execute("SELECT to_regclass('meta') IS NULL").fetchone()[0]:
                return None
            found = tx.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(found[0]) if found else 1

    def quick_check(self) -> str:
        """``ok`` if the server answers and holds this konfuzio-watch's schema."""
        return self.check() or "ok"

    def integrity_check(self) -> str:
        """``ok``, or what is wrong: the schema, every table read through, upload tokens of rows that are
        gone, and (where the ``amcheck`` extension is installed) every index of the journal verified."""
        problem = self.check()
        if problem:
            return problem
        problems = []
        with self._read() as tx:
            for table in ("meta", "files", "upload_tokens", "extra_documents", "nodes"):
                tx.execute(f"SELECT COUNT(*) FROM {table}").fetchone()  # reads every page of the table
            orphans = tx.execute(
                "SELECT COUNT(*) FROM upload_tokens t WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.id = t.row_id)"
            ).fetchone()[0]
            if orphans:
                problems.append(f"{orphans} upload token(s) of rows that are gone")
            if tx.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone():
                indexes = tx.execute(
                    "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON"
                    " a.oid = c.relam WHERE a.amname = 'btree' AND i.indrelid IN ('meta'::regclass,"
                    " 'files'::regclass, 'upload_tokens'::regclass, 'extra_documents'::regclass,"
                    " 'nodes'::regclass) ORDER BY 1"
                ).fetchall()
                for (index,) in indexes:
                    try:
                        tx.execute("SELECT bt_index_check(?::regclass, true)", (index,))
                    except psycopg.errors.DataCorrupted as exc:
                        problems.append(f"index {index}: {str(exc).strip()}")
        return "; ".join(problems) or "ok"

    # -- the cluster ------------------------------------------------------------------------------

    def _lease_new(self, tx: _PgTx, row_ids: Sequence[int]) -> None:  # type: ignore[override]
        tx.conn.execute(
            "UPDATE files SET lease_node = %s, lease_until = now() + make_interval(secs => %s)"
            " WHERE id = ANY(%s::bigint[])",
            (self.node_id, self.lease_s, list(row_ids)),
        )

    def join(self, inbox_marker: str | None = None, clock_offset_s: float | None = None) -> None:
        """This node starts: (re)register it in ``nodes`` (started now, alive now, its inbox marker, its
        clock's offset); nodes silent for ``FORGET_NODES_AFTER`` are forgotten."""
        with self._write() as tx:
            tx.execute(
                "INSERT INTO nodes (id, host, pid, started_at, heartbeat_at, inbox_marker, clock_offset_s)"
                " VALUES (?, ?, ?, now(), now(), ?, ?) ON CONFLICT (id) DO UPDATE SET host = excluded.host,"
                " pid = excluded.pid, started_at = now(), heartbeat_at = now(),"
                " inbox_marker = excluded.inbox_marker, clock_offset_s = excluded.clock_offset_s",
                (self.node_id, socket.gethostname(), os.getpid(), inbox_marker, clock_offset_s),
            )
            tx.conn.execute(
                "DELETE FROM nodes n WHERE heartbeat_at < now() - %s::interval AND NOT EXISTS"
                " (SELECT 1 FROM files f WHERE f.lease_node = n.id)",
                (FORGET_NODES_AFTER,),
            )

    def heartbeat(self, clock_offset_s: float | None = None) -> None:
        """This node is alive (registers it if it is not in ``nodes``); its clock's offset now, if given."""
        with self._write() as tx:
            tx.execute(
                "INSERT INTO nodes (id, host, pid, started_at, heartbeat_at, clock_offset_s)"
                " VALUES (?, ?, ?, now(), now(), ?) ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(),"
                " clock_offset_s = COALESCE(excluded.clock_offset_s, nodes.clock_offset_s)",
                (self.node_id, socket.gethostname(), os.getpid(), clock_offset_s),
            )

    def clock_offset(self, local: Callable[[], float] = time.time) -> ClockOffset:
        """How far the database's clock is ahead of ``local``: its ``clock_timestamp()`` read on one
        connection between two readings of ``local`` (the best of three)."""
        with self._read() as tx:
            return measure_offset(
                local, lambda: tx.conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8").fetchone()[0]
            )

    def leave(self, keep: Iterable[int] = ()) -> None:
        """This node stops: its leases are released at once (no one waits for them to expire), except
        on the rows in ``keep``, and it leaves ``nodes``."""
        with self._write() as tx:
            tx.conn.execute(
                "UPDATE files SET lease_node = NULL, lease_until = NULL WHERE lease_node = %s"
                " AND NOT (id = ANY(%s::bigint[]))",
                (self.node_id, list(keep)),
            )
            tx.execute("DELETE FROM nodes WHERE id = ?", (self.node_id,))
            tx.notify("due:0.0")

    def nodes(self) -> list[Node]:
        with self._read() as tx:
            found = tx.execute(
                "SELECT id, host, pid, EXTRACT(EPOCH FROM started_at)::float8,"
                " EXTRACT(EPOCH FROM heartbeat_at)::float8, EXTRACT(EPOCH FROM now() - heartbeat_at)::float8,"
                " inbox_marker, clock_offset_s FROM nodes ORDER BY id"
            ).fetchall()
        return [Node(*values) for values in found]

    def take_due(
        self, states: Iterable[State], now: float, exclude: Iterable[int], limit: int, lease_s: float = 60.0
    ) -> list[Row]:
        with self._write() as tx:
            found = tx.conn.execute(
                "WITH due AS (SELECT id FROM files WHERE state = ANY(%s::text[]) AND next_at <= %s"
                " AND NOT (id = ANY(%s::bigint[])) AND (lease_node IS NULL OR lease_node = %s)"
                " ORDER BY next_at, id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE files f SET lease_node = %s, lease_until = now() + make_interval(secs => %s)"
                f" FROM due WHERE f.id = due.id RETURNING {_F_COLS}",
                ([s.value for s in states], now, list(exclude), self.node_id, limit, self.node_id, lease_s),
            ).fetchall()
        return sorted((_row(values) for values in found), key=lambda r: (r.next_at, r.id))

    def take_due_refreshes(self, now: float, exclude: Iterable[int], limit: int, lease_s: float = 60.0) -> list[Row]:
        with self._write() as tx:
            found = tx.conn.execute(
                "WITH due AS (SELECT id FROM files WHERE refresh_at <= %s AND state = %s"
                " AND NOT (id = ANY(%s::bigint[])) AND (lease_node IS NULL OR lease_node = %s OR lease_until < now())"
                " ORDER BY refresh_at, id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE files f SET lease_node = %s, lease_until = now() + make_interval(secs => %s)"
                f" FROM due WHERE f.id = due.id RETURNING {_F_COLS}",
                (now, State.DONE.value, list(exclude), self.node_id, limit, self.node_id, lease_s),
            ).fetchall()
        return sorted((_row(values) for values in found), key=lambda r: (r.refresh_at, r.id))

    def renew_leases(self, row_ids: Iterable[int], lease_s: float = 60.0) -> set[int]:
        ids = list(row_ids)
        if not ids:
            return set()
        with self._write() as tx:
            found = tx.conn.execute(
                "UPDATE files SET lease_until = now() + make_interval(secs => %s)"
                " WHERE id = ANY(%s::bigint[]) AND lease_node = %s RETURNING id",
                (lease_s, ids, self.node_id),
            ).fetchall()
        return {row_id for (row_id,) in found}

    def release_leases(self, row_ids: Iterable[int]) -> None:
        ids = list(row_ids)
        if not ids:
            return
        with self._write() as tx:
            tx.conn.execute(
                "UPDATE files SET lease_node = NULL, lease_until = NULL"
                " WHERE id = ANY(%s::bigint[]) AND lease_node = %s",
                (ids, self.node_id),
            )

    def take_over_expired(
        self, lease_s: float = 60.0, limit: int = 100, *, own: bool = False, exclude: Iterable[int] = ()
    ) -> list[Row]:
        with self._write() as tx:
            found = tx.conn.execute(
                "WITH expired AS (SELECT id FROM files WHERE lease_node IS NOT NULL"
                " AND (lease_until < now() OR (%s AND lease_node = %s AND NOT (id = ANY(%s::bigint[]))))"
                f" AND state IN ({_ACTIVE_SQL}) ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE files f SET lease_node = %s, lease_until = now() + make_interval(secs => %s)"
                f" FROM expired WHERE f.id = expired.id RETURNING {_F_COLS}",
                (own, self.node_id, list(exclude), limit, self.node_id, lease_s),
            ).fetchall()
            # Finished rows need no recovery: a lease left on one (its node died after the last move) just goes.
            tx.conn.execute(
                "UPDATE files SET lease_node = NULL, lease_until = NULL WHERE id IN (SELECT id FROM files WHERE"
                f" lease_node IS NOT NULL AND lease_until < now() AND state NOT IN ({_ACTIVE_SQL})"
                " AND refresh_at IS NULL FOR UPDATE SKIP LOCKED)"
            )
        return sorted((_row(values) for values in found), key=lambda r: r.id)

    def lease_of(self, row_id: int) -> Lease | None:
        with self._read() as tx:
            found = tx.execute(
                "SELECT lease_node, EXTRACT(EPOCH FROM lease_until - now())::float8 FROM files"
                " WHERE id = ? AND lease_node IS NOT NULL",
                (row_id,),
            ).fetchone()
        return Lease(*found) if found else None

    def lease_holders(self, row_ids: Iterable[int]) -> dict[int, str]:
        with self._read() as tx:
            found = tx.conn.execute(
                "SELECT id, lease_node FROM files WHERE id = ANY(%s::bigint[]) AND lease_node IS NOT NULL",
                (list(row_ids),),
            ).fetchall()
        return dict(found)

    def leases_by_node(self) -> dict[str, int]:
        with self._read() as tx:
            return dict(
                tx.execute(
                    "SELECT lease_node, COUNT(*) FROM files WHERE lease_node IS NOT NULL GROUP BY lease_node"
                ).fetchall()
            )

    def role(self, name: str) -> _PgRole:
        """One role object per name and journal; ``close`` releases every role."""
        if name not in self._roles:
            self._roles[name] = _PgRole(self, name)
        return self._roles[name]

    def listen(self, callback: Callable[[str], None]) -> _PgListener:
        listener = _PgListener(self, callback)
        self._listeners_pg.append(listener)
        return listener

    def notify(self, payload: str) -> None:
        with self._write() as tx:
            tx.notify(payload)


class _PgRole:
    """A role held with a session-level advisory lock on a connection of its own: it is held as long
    as that connection lives, and a node that dies (or is cut off) loses it to the next that asks."""

    def __init__(self, journal: PgJournal, name: str):
        self.name = name
        self.key = lock_key(f"role:{name}")
        self._journal = journal
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self._alive():
                return True
            try:
                conn = self._journal.connect()
            except _MAPPED as exc:
                raise _mapped(exc, self._journal.location, reading=True) from exc
            try:
                if conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]:
                    self._conn = conn
                    return True
            except _MAPPED as exc:
                raise _mapped(exc, self._journal.location, reading=True) from exc
            finally:
                if self._conn is not conn:
                    conn.close()
            return False

    def held(self) -> bool:
        with self._lock:
            return self._alive()

    def _alive(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            with suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
            return False

    def release(self) -> None:
        with self._lock:
            if self._conn is not None:
                with suppress(psycopg.Error):
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
                with suppress(psycopg.Error):
                    self._conn.close()
                self._conn = None

    close = release


class _PgListener:
    """LISTEN on a connection of its own, in a thread that calls the callback with each payload. A
    lost connection is made again (with backoff); then the callback hears ``reconnected``, as
    notifications sent meanwhile are lost."""

    POLL_S = 0.2
    MAX_BACKOFF_S = 2.0

    def __init__(self, journal: PgJournal, callback: Callable[[str], None]):
        self._journal, self.callback = journal, callback
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"journal-listen-{journal.node_id}", daemon=True)
        self._thread.start()
        self._listening.wait(journal.wait_s + 5)
        if self._error is not None or not self._listening.is_set():
            self.close()
            error = self._error or TimeoutError("no LISTEN in time")
            raise JournalUnavailable(f"the journal {journal.location} cannot be reached: {error}")

    def _run(self) -> None:
        backoff, first, cut_off = 0.1, True, False
        while not self._stop.is_set():
            try:
                with self._journal.connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    backoff = 0.1
                    if not first:
                        log.info("journal listener: listening again")
                        self._call("reconnected")
                    first, cut_off = False, False
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=self.POLL_S):
                            self._call(notice.payload)
            except psycopg.Error as exc:
                if first:
                    self._error = exc
                    self._listening.set()
                    return
                if not cut_off:  # once per outage, not at every attempt
                    log.warning("journal listener: %s; trying again every few seconds", str(exc).strip())
                    cut_off = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.MAX_BACKOFF_S)

    def _call(self, payload: str) -> None:
        try:
            self.callback(payload)
        except Exception:
            log.exception("journal listener: the callback failed on %r", payload)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(self._journal.wait_s + 10)
        with suppress(ValueError):
            self._journal._listeners_pg.remove(self)
