"""Cluster coordination on PostgreSQL (``coordination.Coordination``): the nodes, the leases on rows,
the roles one node at a time holds, and LISTEN/NOTIFY between the nodes.

- One clock: the database's. Leases are timed by it in SQL (``lease_until``); every other time a node
  writes for the others to compare (due times, when an upload timed out, ...) is on it too: the node's
  clock is its own plus the offset to the database's, measured at ``join`` and at every ``heartbeat``
  (``clock_offset``; ``clock.DatabaseClock``), and each node's offset is in ``nodes``.
- Leases: ``take_due`` leases the due rows it returns to this node (``SELECT ... FOR UPDATE SKIP
  LOCKED``), the node renews them while it works; a node whose lease another node took over cannot
  write that row any more. A new claim is its claimer's from the start (``add_claims``).
  ``take_over_expired`` takes the rows of a node that died, which ``take_due`` leaves alone: they are
  recovered first.
- ``nodes`` with heartbeats, roles that one node at a time holds (``pg_try_advisory_lock`` on a
  connection of their own: a node that dies loses them), and ``LISTEN/NOTIFY`` on ``CHANNEL``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, suppress
from typing import Any

import psycopg

from ..clock import ClockOffset, measure_offset
from ..policy import Limits, backoff_s
from ..states import State
from .coordination import CHANNEL, Coordination, Lease, Node
from .errors import JournalUnavailable
from .outbox import DD_COLS, FIRST_OF_FILE, DeliveryRow, to_delivery
from .pg_sql import ACTIVE_SQL, MAPPED, PgTx, lock_key, mapped
from .rows import F_COLS, Row, to_row

log = logging.getLogger(__name__)

# Nodes silent this long are forgotten when another node joins (their leases long taken over).
FORGET_NODES_AFTER = "7 days"


class PgCoordination(Coordination):
    """The nodes of a cluster on one PostgreSQL journal (``PgJournal``, whose connections it uses)."""

    shared = True

    # what the engine provides
    location: str
    lease_s: float
    wait_s: float
    _write: Callable[[], AbstractContextManager[PgTx]]
    _read: Callable[[], AbstractContextManager[PgTx]]
    connect: Callable[[], psycopg.Connection[Any]]

    def __init__(self) -> None:
        super().__init__()
        self._roles: dict[str, _PgRole] = {}
        self._listeners_pg: list[_PgListener] = []

    def _close_coordination(self) -> None:
        for child in [*self._listeners_pg, *self._roles.values()]:
            child.close()

    def _lease_new(self, tx: PgTx, row_ids: Sequence[int]) -> None:
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
                f" FROM due WHERE f.id = due.id RETURNING {F_COLS}",
                ([s.value for s in states], now, list(exclude), self.node_id, limit, self.node_id, lease_s),
            ).fetchall()
        return sorted((to_row(values) for values in found), key=lambda r: (r.next_at, r.id))

    def take_due_refreshes(self, now: float, exclude: Iterable[int], limit: int, lease_s: float = 60.0) -> list[Row]:
        with self._write() as tx:
            found = tx.conn.execute(
                "WITH due AS (SELECT id FROM files WHERE refresh_at <= %s AND state = %s"
                " AND NOT (id = ANY(%s::bigint[])) AND (lease_node IS NULL OR lease_node = %s OR lease_until < now())"
                " ORDER BY refresh_at, id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE files f SET lease_node = %s, lease_until = now() + make_interval(secs => %s)"
                f" FROM due WHERE f.id = due.id RETURNING {F_COLS}",
                (now, State.DONE.value, list(exclude), self.node_id, limit, self.node_id, lease_s),
            ).fetchall()
        return sorted((to_row(values) for values in found), key=lambda r: (r.refresh_at, r.id))

    def take_due_deliveries(self, now: float, limit: int, lease_s: float = 60.0) -> list[DeliveryRow]:
        with self._write() as tx:
            found = tx.conn.execute(
                f"WITH due AS (SELECT d.id FROM deliveries d WHERE {FIRST_OF_FILE} AND d.next_at <= %s"
                " AND (d.lease_node IS NULL OR d.lease_node = %s OR d.lease_until < now())"
                " ORDER BY d.next_at, d.id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE deliveries d SET lease_node = %s, lease_until = now() + make_interval(secs => %s)"
                f" FROM due WHERE d.id = due.id RETURNING {DD_COLS}",
                (now, self.node_id, limit, self.node_id, lease_s),
            ).fetchall()
        return sorted((to_delivery(values) for values in found), key=lambda d: (d.next_at, d.id))

    def release_deliveries(self, delivery_ids: Iterable[int]) -> None:
        ids = list(delivery_ids)
        if not ids:
            return
        with self._write() as tx:
            tx.conn.execute(
                "UPDATE deliveries SET lease_node = NULL, lease_until = NULL"
                " WHERE id = ANY(%s::bigint[]) AND lease_node = %s",
                (ids, self.node_id),
            )

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
                f" AND state IN ({ACTIVE_SQL}) ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE files f SET lease_node = %s, lease_until = now() + make_interval(secs => %s)"
                f" FROM expired WHERE f.id = expired.id RETURNING {F_COLS}",
                (own, self.node_id, list(exclude), limit, self.node_id, lease_s),
            ).fetchall()
            # Finished rows need no recovery: a lease left on one (its node died after the last move) just goes.
            tx.conn.execute(
                "UPDATE files SET lease_node = NULL, lease_until = NULL WHERE id IN (SELECT id FROM files WHERE"
                f" lease_node IS NOT NULL AND lease_until < now() AND state NOT IN ({ACTIVE_SQL})"
                " AND refresh_at IS NULL FOR UPDATE SKIP LOCKED)"
            )
        return sorted((to_row(values) for values in found), key=lambda r: r.id)

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

    def __init__(self, journal: PgCoordination, name: str):
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
            except MAPPED as exc:
                raise mapped(exc, self._journal.location, reading=True) from exc
            try:
                if conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]:
                    self._conn = conn
                    return True
            except MAPPED as exc:
                raise mapped(exc, self._journal.location, reading=True) from exc
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
    lost connection is made again (with the policy's backoff, ``RECONNECT``); then the callback hears
    ``reconnected``, as notifications sent meanwhile are lost."""

    POLL_S = 0.2
    # A listener cut off is back within a couple of seconds of its server.
    RECONNECT = Limits(base_s=0.1, cap_s=2.0)

    def __init__(self, journal: PgCoordination, callback: Callable[[str], None]):
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
        failures, first, cut_off = 0, True, False
        while not self._stop.is_set():
            try:
                with self._journal.connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    failures = 0
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
                failures += 1
                self._stop.wait(backoff_s(failures, self.RECONNECT))

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
