"""The outbox: one row per delivery of a placed file to the next system (``delivery.py``), the same
SQL on every engine.

A delivery is written in the transaction of the move that causes it (``BaseJournal.transition`` to
done or failed, ``finish_refresh`` with a new revision: ``deliveries=``), so a crash between the
move and the send loses nothing. Per file only the lowest pending delivery is due (``DUE``): a later
revision never goes before an earlier one. Which node sends one is the coordination's
(``take_due_deliveries``: a lease in a cluster); the writes below are guarded by it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import Engine, _Tx
from .rows import in_list


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # finally: visible in status, an alert, ``redeliver``
    SUPERSEDED = "superseded"  # a newer revision replaced its body before it went


@dataclass(frozen=True)
class NewDelivery:
    """A delivery that a move causes: what the outbox row is made of."""

    event: str  # done | revision | failed
    key: str
    document_id: int | None
    revision: int | None
    json_path: bytes
    file_path: bytes
    sha256: str


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    row_id: int
    event: str
    key: str
    document_id: int | None
    revision: int | None
    json_path: bytes
    file_path: bytes
    sha256: str
    state: DeliveryState
    sent: str | None
    attempts: int
    failures: int
    next_at: float | None
    error: str | None
    created_at: float
    delivered_at: float | None
    updated_at: float

    @property
    def sent_by(self) -> set[str]:
        """The transports that have succeeded for it (a retry runs only the others)."""
        return set((self.sent or "").split(",")) - {""}


# The outbox's columns, in the order of ``DeliveryRow``'s fields (a row is built from them by position).
DELIVERY_COLUMNS = [f.name for f in dataclasses.fields(DeliveryRow)]
D_COLS = ", ".join(DELIVERY_COLUMNS)
DD_COLS = ", ".join(f"d.{name}" for name in DELIVERY_COLUMNS)


def to_delivery(values: Sequence[Any]) -> DeliveryRow:
    found = list(values)
    found[6], found[7] = bytes(found[6]), bytes(found[7])
    found[9] = DeliveryState(found[9])
    return DeliveryRow(*found)


#: A pending delivery that is its file's first pending one (per file, one at a time, in order).
FIRST_OF_FILE = (
    "d.state = 'pending' AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.row_id = d.row_id"
    " AND e.state = 'pending' AND e.id < d.id)"
)


class Outbox(Engine):
    """The deliveries' SQL, the same on every engine."""

    def _add_deliveries(self, tx: _Tx, row_id: int, deliveries: Sequence[NewDelivery], now: float) -> None:
        """In the caller's transaction: the deliveries a move of row ``row_id`` causes (one that exists,
        the same file's same key, is left as it is: the move was made again after a crash)."""
        for d in deliveries:
            tx.execute(
                "INSERT INTO deliveries (row_id, event, key, document_id, revision, json_path, file_path, sha256,"
                " state, next_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (row_id, d.event, d.key, d.document_id, d.revision, d.json_path, d.file_path, d.sha256, now, now, now),
            )

    # -- reads ---------------------------------------------------------------------------------

    def due_deliveries(self, now: float, limit: int) -> list[DeliveryRow]:
        """Deliveries that are due (each its file's first pending one), the oldest due first."""
        with self._read() as tx:
            found = tx.execute(
                f"SELECT {DD_COLS} FROM deliveries d WHERE {FIRST_OF_FILE} AND d.next_at <= ?"
                " ORDER BY d.next_at, d.id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [to_delivery(v) for v in found]

    def next_delivery_at(self) -> float | None:
        """When the next pending delivery is due (None: none waits)."""
        with self._read() as tx:
            found = tx.execute(f"SELECT MIN(d.next_at) FROM deliveries d WHERE {FIRST_OF_FILE}").fetchone()
        return None if found is None or found[0] is None else float(found[0])

    def delivery(self, delivery_id: int) -> DeliveryRow:
        with self._read() as tx:
            found = tx.execute(f"SELECT {D_COLS} FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        if found is None:
            raise KeyError(delivery_id)
        return to_delivery(found)

    def deliveries(
        self, states: Iterable[DeliveryState] = (), row_ids: Iterable[int] | None = None, limit: int = 10_000
    ) -> list[DeliveryRow]:
        """Deliveries in ``states`` (all: empty), of these files (all: None), in the order they were made."""
        where, values = ["1 = 1"], []
        wanted = [s.value for s in states]
        if wanted:
            clause, params = in_list("state", wanted)
            where.append(clause)
            values += list(params)
        if row_ids is not None:
            ids = list(row_ids)
            if not ids:
                return []
            clause, params = in_list("row_id", ids)
            where.append(clause)
            values += list(params)
        with self._read() as tx:
            found = tx.execute(
                f"SELECT {D_COLS} FROM deliveries WHERE {' AND '.join(where)} ORDER BY id LIMIT ?", (*values, limit)
            ).fetchall()
        return [to_delivery(v) for v in found]

    def has_later_delivery(self, d: DeliveryRow) -> bool:
        """Has the same file a delivery made after ``d`` (a newer revision's)?"""
        with self._read() as tx:
            found = tx.execute("SELECT 1 FROM deliveries WHERE row_id = ? AND id > ? LIMIT 1", (d.row_id, d.id))
            return found.fetchone() is not None

    def delivery_counts(self) -> dict[DeliveryState, int]:
        with self._read() as tx:
            found = dict(tx.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())
        return {s: int(found.get(s.value, 0)) for s in DeliveryState}

    def oldest_pending_delivery_at(self) -> float | None:
        """When the oldest pending delivery's move was made."""
        with self._read() as tx:
            found = tx.execute("SELECT MIN(created_at) FROM deliveries WHERE state = 'pending'").fetchone()
        return None if found is None or found[0] is None else float(found[0])

    # -- writes of the sender (guarded by its lease in a cluster) --------------------------------

    def _set_delivery(self, d: DeliveryRow, now: float, **fields: object) -> DeliveryRow | None:
        """Change a pending delivery; None if it is no longer pending, or another node holds it."""
        fields["updated_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._write() as tx:
            found = tx.execute(
                f"UPDATE deliveries SET {assignments} WHERE id = ? AND state = 'pending'{self._LEASE_GUARD}"
                f" RETURNING {D_COLS}",
                (*fields.values(), d.id, *self._guard),
            ).fetchone()
        return None if found is None else to_delivery(found)

    def delivery_sent(self, d: DeliveryRow, transport: str, now: float) -> DeliveryRow | None:
        """One transport of several succeeded: a retry runs only the others."""
        return self._set_delivery(d, now, sent=",".join(sorted(d.sent_by | {transport})))

    def delivery_done(self, d: DeliveryRow, now: float, *, sent_by: Iterable[str] = ()) -> DeliveryRow | None:
        """Delivered (``sent_by``: every transport, each succeeded)."""
        sent = ",".join(sorted(d.sent_by | set(sent_by)))
        return self._set_delivery(
            d, now, state=DeliveryState.DELIVERED.value, delivered_at=now, sent=sent or None, error=None, next_at=None
        )

    def delivery_waits(self, d: DeliveryRow, now: float, error: str, next_at: float) -> DeliveryRow | None:
        """A try that the receiver did not take (its gate is blocked): no failure charged."""
        return self._set_delivery(d, now, error=error, next_at=next_at, attempts=d.attempts + 1)

    def delivery_failed(self, d: DeliveryRow, now: float, error: str, *, tried: bool = True) -> DeliveryRow | None:
        return self._set_delivery(
            d,
            now,
            state=DeliveryState.FAILED.value,
            error=error,
            next_at=None,
            failures=d.failures + 1,
            attempts=d.attempts + (1 if tried else 0),
        )

    def delivery_superseded(self, d: DeliveryRow, now: float, why: str) -> DeliveryRow | None:
        return self._set_delivery(d, now, state=DeliveryState.SUPERSEDED.value, error=why, next_at=None)

    # -- redeliver ----------------------------------------------------------------------------

    def redeliver(self, delivery_ids: Iterable[int], now: float) -> list[DeliveryRow]:
        """These deliveries (failed or delivered) are pending again, due now, with the same key."""
        ids = list(delivery_ids)
        if not ids:
            return []
        where, values = in_list("id", ids)
        with self._write() as tx:
            found = tx.execute(
                f"UPDATE deliveries SET state = 'pending', next_at = ?, error = NULL, failures = 0, sent = NULL,"
                f" delivered_at = NULL, updated_at = ? WHERE {where} AND state IN ('failed', 'delivered')"
                f" RETURNING {D_COLS}",
                (now, now, *values),
            ).fetchall()
        return sorted((to_delivery(v) for v in found), key=lambda d: d.id)
