"""The journal's schema, described once and rendered in each dialect (SQLite, PostgreSQL), and the
one migration runner.

The two engines number their schemas apart (SQLite reached version 5 before PostgreSQL began; its
version 1 holds what SQLite's 4 does, plus what a cluster needs), and each keeps its numbers: every
table, column and index below says in which version of each dialect it came (``Since``), or that a
dialect lacks it (``None``). A dialect's version 1 is created as one; each later version is what came
in it, as ``ALTER TABLE ... ADD COLUMN``, ``CREATE TABLE``, ``CREATE INDEX`` and data statements. A new
journal is created at version 1 and brought up through all of them, so both paths are one path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..states import ACTIVE, State
from .errors import JournalError


@dataclass(frozen=True)
class Dialect:
    name: str
    #: logical type -> the dialect's type
    types: dict[str, str]
    #: whether columns carry their ``CHECK`` (PostgreSQL; SQLite's journal never had them)
    checks: bool
    #: a statement with one ``?``, the table's name, that returns a row if the table exists
    table_exists: str


SQLITE = Dialect(
    "sqlite",
    {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",  # never reused: it names the file in processing/
        "bytes": "BLOB",  # file names need not be UTF-8
        "text": "TEXT",
        "int": "INTEGER",
        "bigint": "INTEGER",
        "seconds": "REAL",  # since the epoch
    },
    checks=False,
    table_exists="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
)
POSTGRES = Dialect(
    "postgres",
    {
        "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "bytes": "BYTEA",
        "text": "TEXT",
        "int": "INTEGER",
        "bigint": "BIGINT",
        "seconds": "DOUBLE PRECISION",
        "moment": "TIMESTAMPTZ",  # by the database's clock (leases, heartbeats)
    },
    checks=True,
    table_exists="SELECT 1 WHERE to_regclass(?) IS NOT NULL",
)


@dataclass(frozen=True)
class Since:
    """The schema version that brought something, per dialect (None: not in that dialect)."""

    sqlite: int | None = 1
    postgres: int | None = 1

    def of(self, dialect: Dialect) -> int | None:
        return self.sqlite if dialect is SQLITE else self.postgres


FROM_START = Since()
POSTGRES_ONLY = Since(None, 1)  # what a cluster needs


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a logical type (``Dialect.types``)
    extra: str = ""  # NOT NULL, DEFAULT, UNIQUE, PRIMARY KEY
    since: Since = FROM_START
    check: str = ""  # a CHECK, where the dialect has them

    def render(self, dialect: Dialect) -> str:
        parts = [self.name, dialect.types[self.type], self.extra]
        if self.check and dialect.checks:
            parts.append(f"CHECK ({self.check})")
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    since: Since = FROM_START

    def column_since(self, column: Column, dialect: Dialect) -> int | None:
        """The version that brought a column: its own, or (a column of a later table) the table's."""
        born, version = self.since.of(dialect), column.since.of(dialect)
        return None if born is None or version is None else max(born, version)


@dataclass(frozen=True)
class Index:
    name: str
    table: str
    on: str  # the column list, and a partial index's WHERE
    since: Since = FROM_START
    unique: bool = False


@dataclass(frozen=True)
class Data:
    """A statement that moves data when its version comes (an existing journal's rows into a new table)."""

    sql: str
    since: Since


_STATES = ", ".join(f"'{s.value}'" for s in State)
_ACTIVE = ", ".join(f"'{s.value}'" for s in ACTIVE)

TABLES = (
    Table("meta", (Column("key", "text", "PRIMARY KEY"), Column("value", "text", "NOT NULL"))),
    Table(
        "files",
        (
            Column("id", "id"),
            Column("rel_path", "bytes", "NOT NULL"),  # relative to the inbox
            Column("state", "text", "NOT NULL", check=f"state IN ({_STATES})"),
            Column("size", "bigint"),
            Column("sha256", "text"),
            Column("upload_name", "text"),  # the safe name the server sees
            Column("token_hash", "text", "UNIQUE"),  # sha256 of the callback token; the token is never stored
            Column("document_id", "bigint"),
            Column("attempts", "int", "NOT NULL DEFAULT 0"),
            Column("next_at", "seconds"),  # when the row next needs attention (backoff, poll)
            Column("callback_at", "seconds"),  # when a callback for it last arrived
            Column("uploaded_at", "seconds"),
            Column("final_path", "bytes"),  # where it was moved (done/ or failed/), chosen before moving
            Column("error", "text"),
            Column("stage", "text"),
            Column("project_id", "bigint"),
            Column("detected_at", "seconds", "NOT NULL"),
            Column("updated_at", "seconds", "NOT NULL"),
            Column("finished_at", "seconds"),
            Column("failures", "int", "NOT NULL DEFAULT 0", Since(2, 1)),  # the retry policy's count
            # A claim's identity: an unpredictable name in processing/ and the file's inode there.
            Column("claim_name", "bytes", since=Since(3, 1)),
            Column("file_dev", "bigint", since=Since(3, 1)),
            Column("file_ino", "bigint", since=Since(3, 1)),
            Column("mtime_ns", "bigint", since=Since(3, 1)),  # of the content that was uploaded
            # Since when the server may hold an upload whose answer we never read.
            Column("ambiguous_since", "seconds", since=Since(3, 1)),
            # Results can change after export (review, re-extraction): which revision done/ holds, a
            # fingerprint of its content, and when a re-sent callback asked to look again.
            Column("revision", "int", "NOT NULL DEFAULT 0", Since(4, 1)),
            Column("fingerprint", "text", since=Since(4, 1)),
            Column("refresh_at", "seconds", since=Since(4, 1)),
            Column("lease_node", "text", since=POSTGRES_ONLY),  # the node working on the row ...
            Column("lease_until", "moment", since=POSTGRES_ONLY),  # ... until then, unless it renews
            # The inode change time of the content that was uploaded: a rewrite that keeps the size and
            # puts the mtime back still changes it (no user can set it).
            Column("ctime_ns", "bigint", since=Since(5, 3)),
        ),
    ),
    # Every upload attempt's token, so a document that appears late for an earlier one is ours.
    Table(
        "upload_tokens",
        (
            Column("token_hash", "text", "PRIMARY KEY"),
            Column("row_id", "bigint", "NOT NULL"),
            Column("sent_at", "seconds", "NOT NULL"),
        ),
        Since(3, 1),
    ),
    # Documents the server holds twice for one file (a late earlier attempt): to delete.
    Table(
        "extra_documents",
        (
            Column("document_id", "bigint", "PRIMARY KEY"),
            Column("row_id", "bigint", "NOT NULL"),
            Column("project_id", "bigint"),
            Column("found_at", "seconds", "NOT NULL"),
            Column("deleted_at", "seconds"),
            Column("error", "text"),
        ),
        Since(3, 1),
    ),
    # The nodes of a cluster, each as it last said.
    Table(
        "nodes",
        (
            Column("id", "text", "PRIMARY KEY"),
            Column("host", "text", "NOT NULL"),
            Column("pid", "int"),
            Column("started_at", "moment", "NOT NULL"),
            Column("heartbeat_at", "moment", "NOT NULL"),
            # What its marker file in the inbox says: another node reads the file to see that both watch
            # the same folder (``konfuzio-watch check``).
            Column("inbox_marker", "text", since=Since(None, 2)),
            # How far the database's clock is ahead of the node's own (``status`` shows one that is off).
            Column("clock_offset_s", "seconds", since=Since(None, 4)),
        ),
        POSTGRES_ONLY,
    ),
    # The outbox: one delivery of a placed file to the next system (``delivery.py``) per (file, event,
    # revision), written in the transaction of the move that causes it.
    Table(
        "deliveries",
        (
            Column("id", "id"),
            Column("row_id", "bigint", "NOT NULL"),  # the file's row
            Column("event", "text", "NOT NULL", check="event IN ('done', 'revision', 'failed')"),
            Column("key", "text", "NOT NULL"),  # the Idempotency-Key: <document id>:<revision>, failed:<row id>
            Column("document_id", "bigint"),
            Column("revision", "int"),
            Column("json_path", "bytes", "NOT NULL"),  # the placed JSON, whose bytes are the body
            Column("file_path", "bytes", "NOT NULL"),  # the placed file
            Column("sha256", "text", "NOT NULL"),  # of the JSON's bytes as written
            Column(
                "state",
                "text",
                "NOT NULL",
                check="state IN ('pending', 'delivered', 'failed', 'superseded')",
            ),
            Column("sent", "text"),  # the transports that succeeded so far (webhook, command)
            Column("attempts", "int", "NOT NULL DEFAULT 0"),  # tries that reached a transport
            Column("failures", "int", "NOT NULL DEFAULT 0"),
            Column("next_at", "seconds"),
            Column("error", "text"),  # the last one
            Column("created_at", "seconds", "NOT NULL"),  # when the move that caused it was made
            Column("delivered_at", "seconds"),
            Column("updated_at", "seconds", "NOT NULL"),
            Column("lease_node", "text", since=POSTGRES_ONLY),  # the node sending it ...
            Column("lease_until", "moment", since=POSTGRES_ONLY),  # ... until then
        ),
        Since(6, 5),
    ),
)

INDEXES = (
    Index("files_state_next", "files", "(state, next_at)"),
    Index("files_sha256", "files", "(sha256)"),
    Index("files_refresh", "files", "(refresh_at) WHERE refresh_at IS NOT NULL", Since(4, 1)),
    Index("files_lease", "files", "(lease_until) WHERE lease_node IS NOT NULL", POSTGRES_ONLY),
    # One active row per file: its inbox path and inode. A file at a path whose earlier file is still
    # on its way (another inode) is a new file; rows finish and the same path and inode can return.
    # Without an inode (NULL) a claim has no identity to compare, and nothing is refused.
    Index("files_active_claim", "files", f"(rel_path, file_ino) WHERE state IN ({_ACTIVE})", POSTGRES_ONLY, True),
    Index("upload_tokens_row", "upload_tokens", "(row_id)", Since(3, 1)),
    Index("deliveries_due", "deliveries", "(state, next_at)", Since(6, 5)),
    Index("deliveries_file", "deliveries", "(row_id, key)", Since(6, 5), True),
    # The status page's "finished in the last hour / 24 h": a range of finished_at per state, not a
    # read of every done row of a journal months old. Only finished rows have an entry.
    Index("files_finished", "files", "(state, finished_at) WHERE finished_at IS NOT NULL", Since(7, 6)),
)

DATA = (
    # An existing journal's tokens (one per file then) into the table of every attempt's.
    Data(
        "INSERT INTO upload_tokens SELECT token_hash, id, updated_at FROM files WHERE token_hash IS NOT NULL",
        Since(3, None),
    ),
)


def _index(index: Index, exists_ok: bool) -> str:
    unique = "UNIQUE " if index.unique else ""
    guard = "IF NOT EXISTS " if exists_ok else ""
    return f"CREATE {unique}INDEX {guard}{index.name} ON {index.table} {index.on}"


def _table(table: Table, dialect: Dialect, version: int, exists_ok: bool) -> str:
    columns = ", ".join(c.render(dialect) for c in table.columns if table.column_since(c, dialect) == version)
    return f"CREATE TABLE {'IF NOT EXISTS ' if exists_ok else ''}{table.name} ({columns})"


def created(dialect: Dialect) -> list[str]:
    """The statements that create a dialect's version 1 (each harmless where its object exists)."""
    tables = [_table(t, dialect, 1, True) for t in TABLES if t.since.of(dialect) == 1]
    return tables + [_index(i, True) for i in INDEXES if i.since.of(dialect) == 1]


def migrations(dialect: Dialect) -> dict[int, list[str]]:
    """Schema version -> the statements that bring the version before it to it: its new columns, then
    its new tables, indexes and data."""
    columns: dict[int, list[str]] = {}
    rest: dict[int, list[str]] = {}
    for table in TABLES:
        born = table.since.of(dialect)
        if born is None:
            continue
        if born > 1:
            rest.setdefault(born, []).append(_table(table, dialect, born, False))
        for column in table.columns:
            version = table.column_since(column, dialect)
            if version is not None and version != born:
                columns.setdefault(version, []).append(f"ALTER TABLE {table.name} ADD COLUMN {column.render(dialect)}")
    for version, statement in [(i.since.of(dialect), _index(i, False)) for i in INDEXES] + [
        (d.since.of(dialect), d.sql) for d in DATA
    ]:
        if version is not None and version > 1:
            rest.setdefault(version, []).append(statement)
    return {v: columns.get(v, []) + rest.get(v, []) for v in sorted({*columns, *rest})}


class _Tx(Protocol):
    def execute(self, sql: str, params: Sequence[object] = ()) -> object: ...


def newer_than_known(location: str, found: int, known: int) -> str:
    """The one message for a journal that a newer konfuzio-watch wrote."""
    return (
        f"{location}: written by a newer konfuzio-watch (schema {found}, this one knows {known}); "
        "upgrade konfuzio-watch"
    )


def migrate(tx: _Tx, dialect: Dialect, steps: dict[int, list[str]], version: int, location: str) -> None:
    """Create the journal (version 1) if there is none, bring it up to ``version`` through ``steps``
    (``migrations(dialect)``), and record the version; all in the caller's transaction ``tx``."""
    if tx.execute(dialect.table_exists, ("meta",)).fetchone() is None:  # type: ignore[attr-defined]
        for statement in created(dialect):
            tx.execute(statement)
        found = 1
    else:
        row = tx.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()  # type: ignore[attr-defined]
        found = int(row[0]) if row else 1
    if found > version:
        raise JournalError(newer_than_known(location, found, version))
    for target in range(found + 1, version + 1):
        for statement in steps[target]:
            tx.execute(statement)
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(version),),
    )
