"""What the PostgreSQL engine and its cluster coordination share: one transaction's statements in
psycopg's marks, the errors that mean the server cannot be reached, and the advisory lock keys."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from enum import Enum
from typing import Any

import psycopg

from ..states import ACTIVE
from .coordination import CHANNEL
from .errors import JournalUnavailable, JournalWriteError

ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in ACTIVE)


def lock_key(name: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of a named konfuzio-watch lock."""
    return int.from_bytes(hashlib.sha256(f"konfuzio-watch:{name}".encode()).digest()[:8], "big", signed=True)


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """The shared statements' ``?`` marks as psycopg's ``%s`` (no shared statement has a ``%``)."""
    assert "%" not in sql, sql
    return sql.replace("?", "%s")


def _adapt(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def _unavailable(exc: psycopg.Error) -> bool:
    """Whether an error means the server cannot be reached (rather than that it refused a write)."""
    state = getattr(exc, "sqlstate", None)
    return state is None or state.startswith(("08", "57P"))


MAPPED = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction)


def mapped(exc: psycopg.Error, location: str, reading: bool) -> JournalWriteError:
    text = str(exc).strip() or type(exc).__name__
    if reading or _unavailable(exc):
        return JournalUnavailable(f"the journal {location} cannot be reached: {text}")
    return JournalWriteError(text)


class PgTx:
    def __init__(self, conn: psycopg.Connection[Any]):
        self.conn = conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(pg_sql(sql), [_adapt(p) for p in params])

    def notify(self, payload: str) -> None:
        self.conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
