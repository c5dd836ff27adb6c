"""The engine below the shared row SQL: transactions, checks and the SQL that differs per database.

The statements the engines share are written once (``reads.py``, ``base.py``) in the SQL both
understand (``?`` marks, ``ON CONFLICT``, ``RETURNING``); each engine runs them through its own
transactions. Every state change is one transaction.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, Self

from ..states import ACTIVE, State
from .coordination import Coordination
from .errors import JournalError
from .rows import Row, in_list, to_row
from .schema import newer_than_known


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


class Engine(Coordination):
    """What each engine (SQLite, PostgreSQL) provides to the shared row SQL above it: transactions
    (``_write``, ``_read`` ...), the checks of its database, and the SQL fragments that differ; with
    the few things every engine does alike on top (the schema check, ``meta``, ``probe``).

    An engine is also a ``Coordination`` (``coordination.py``): the implementation comes with its
    class (``LocalCoordination`` for SQLite, ``PgCoordination`` for PostgreSQL).
    """

    #: Where the journal lives, for messages: a path, or a URL without a password.
    location: str
    #: An identity that stays with this journal (and is lost with it): the inbox's marker names it.
    journal_id: str
    #: The schema version this konfuzio-watch writes.
    schema_version: int

    #: How long a lease lasts unless renewed, for the leases the journal gives by itself (new claims).
    lease_s = 60.0

    #: Whether one writer at a time has the database (SQLite): a batch of rows may then be changed by
    #: one statement (several nodes keep one row per statement, locking rows in one order).
    _ONE_WRITER = False

    # SQL that differs between the backends, appended to shared statements:
    _LOCK_ROW = ""  # to a SELECT of a row the transaction then changes
    _LEASE_GUARD = ""  # to the WHERE of a write to one row: not leased to another node (one ? : node_id)
    _NOT_OTHERS = ""  # to the WHERE of a look for due rows: not leased to another node at all (one ? : node_id)

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

    def __enter__(self) -> Self:
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
            return newer_than_known(self.location, found, self.schema_version)
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

    def bind_processing_dir(self, path: Path) -> None:
        """Remember where claimed files wait; refuse a config that moved it while files wait there."""
        with self._write() as tx:
            self._serialize(tx, "meta")
            found = tx.execute("SELECT value FROM meta WHERE key = 'processing_dir'").fetchone()
            if found and found[0] != str(path):
                where, waiting = in_list("state", [s.value for s in ACTIVE if s != State.CLAIMING])
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

    def meta(self, key: str) -> str | None:
        with self._read() as tx:
            found = tx.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return found[0] if found else None

    def _select(self, sql: str, params: Sequence[object]) -> list[Row]:
        with self._read() as tx:
            return [to_row(values) for values in tx.execute(sql, params).fetchall()]
