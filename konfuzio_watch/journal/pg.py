"""The journal in PostgreSQL: one journal for several daemons ("nodes") on one shared inbox.

Every method of ``BaseJournal`` behaves as on SQLite (the statements they share are written once,
in ``reads.py`` and ``base.py``; ``tests/test_journal.py`` runs the same tests on both). What
PostgreSQL adds:

- Concurrency: SQLite serialises every write (``BEGIN IMMEDIATE``); here a row a write reads and
  then changes is locked (``FOR UPDATE``), and the guard ``WHERE id = ? AND state = ?`` does the
  rest: of two nodes moving one row, the second finds it moved (``IllegalTransition``).
- One claim per file: a unique index on the inbox path and inode of the active rows (the inode is
  the file's identity across the nodes' mounts: NFS and CIFS with ``serverino`` give the server's;
  the device number is each client's own). A second node's claim of a file gets no row.
- The cluster: nodes, leases, roles and notifications (``pg_cluster.PgCoordination``).

Connections: psycopg 3 with a small ``psycopg_pool.ConnectionPool``, each connection checked
before use (after a server restart the first call works again), autocommit, and one explicit
transaction per write. A server that cannot be reached makes every call raise ``JournalUnavailable``
(a ``JournalWriteError``) within ``wait_s``; it works again as soon as the server is back. Both ends
of every connection use TCP keepalives (and the client a ``tcp_user_timeout``), so a cut cable is
noticed in about half a minute: by the node (its calls fail instead of hanging) and by the server
(the roles a cut-off node held, e.g. the rescanner's, pass to another node).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg_pool

from .base import BaseJournal
from .coordination import default_node_id
from .errors import JournalError
from .pg_cluster import PgCoordination
from .pg_sql import MAPPED, PgTx, lock_key, mapped
from .schema import POSTGRES, migrate, migrations

# The pool says every failed connection attempt (a few a second while the server is away) and every
# broken connection it drops; the journal gate says an outage once, and its end (gates.py). The
# pool's own errors stay.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

# Schema version -> statements that bring the previous version to it (``schema.py``: PostgreSQL's
# numbering, its version 1 being SQLite's 4 and what a cluster needs).
PG_MIGRATIONS = migrations(POSTGRES)
PG_SCHEMA_VERSION = max(PG_MIGRATIONS, default=1)
SCHEMA_LOCK = lock_key("schema")


def without_password(url: str) -> str:
    """The URL for messages: a password in it (which the config refuses anyway) left out."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))


class PgJournal(PgCoordination, BaseJournal):
    """The journal in a PostgreSQL database, shared by the nodes of a cluster.

    ``url``: a libpq URL or connection string. ``password``: from the config's password file (else
    libpq's ``PGPASSWORD`` or ``~/.pgpass``). ``migrate``: create or upgrade the schema (the
    daemon); False leaves the database as it is (``check``). ``wait_s``: how long a call waits for a
    connection before it raises ``JournalUnavailable``.
    """

    schema_version = PG_SCHEMA_VERSION
    #: shared by the nodes of a cluster: coordination through the database (``pg_cluster.PgCoordination``)
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
            migrate(PgTx(conn), POSTGRES, PG_MIGRATIONS, self.schema_version, self.location)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('journal_id', %s) ON CONFLICT DO NOTHING",
                (secrets.token_hex(8),),
            )

    def close(self) -> None:
        self._close_coordination()
        self._pool.close()

    @contextmanager
    def _write(self) -> Iterator[PgTx]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield PgTx(conn)
        except MAPPED as exc:
            raise mapped(exc, self.location, reading=False) from exc

    @contextmanager
    def _read(self) -> Iterator[PgTx]:
        try:
            with self._pool.connection() as conn:
                yield PgTx(conn)
        except MAPPED as exc:
            raise mapped(exc, self.location, reading=True) from exc

    def _serialize(self, tx: PgTx, what: str) -> None:  # type: ignore[override]
        tx.conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(what),))

    def schema_found(self) -> int | None:
        with self._read() as tx:
            if tx.execute(POSTGRES.table_exists, ("meta",)).fetchone() is None:
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
