"""The schema description renders each dialect's history as it was written before it was one
description: every version's statements, and SQLite's version 1 (a journal of any version opens and
migrates as it always did)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from konfuzio_watch.journal import SqliteJournal
from konfuzio_watch.journal.schema import POSTGRES, SQLITE, created, migrations

SQLITE_HISTORY = {
    2: ["ALTER TABLE files ADD COLUMN failures INTEGER NOT NULL DEFAULT 0"],
    3: [
        "ALTER TABLE files ADD COLUMN claim_name BLOB",
        "ALTER TABLE files ADD COLUMN file_dev INTEGER",
        "ALTER TABLE files ADD COLUMN file_ino INTEGER",
        "ALTER TABLE files ADD COLUMN mtime_ns INTEGER",
        "ALTER TABLE files ADD COLUMN ambiguous_since REAL",
        "CREATE TABLE upload_tokens (token_hash TEXT PRIMARY KEY, row_id INTEGER NOT NULL, sent_at REAL NOT NULL)",
        "CREATE TABLE extra_documents (document_id INTEGER PRIMARY KEY, row_id INTEGER NOT NULL, project_id INTEGER,"
        " found_at REAL NOT NULL, deleted_at REAL, error TEXT)",
        "CREATE INDEX upload_tokens_row ON upload_tokens (row_id)",
        "INSERT INTO upload_tokens SELECT token_hash, id, updated_at FROM files WHERE token_hash IS NOT NULL",
    ],
    4: [
        "ALTER TABLE files ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE files ADD COLUMN fingerprint TEXT",
        "ALTER TABLE files ADD COLUMN refresh_at REAL",
        "CREATE INDEX files_refresh ON files (refresh_at) WHERE refresh_at IS NOT NULL",
    ],
    5: ["ALTER TABLE files ADD COLUMN ctime_ns INTEGER"],
    6: [
        "CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, row_id INTEGER NOT NULL, event TEXT NOT NULL,"
        " key TEXT NOT NULL, document_id INTEGER, revision INTEGER, json_path BLOB NOT NULL, file_path BLOB NOT NULL,"
        " sha256 TEXT NOT NULL, state TEXT NOT NULL, sent TEXT, attempts INTEGER NOT NULL DEFAULT 0,"
        " failures INTEGER NOT NULL DEFAULT 0, next_at REAL, error TEXT, created_at REAL NOT NULL, delivered_at REAL,"
        " updated_at REAL NOT NULL)",
        "CREATE INDEX deliveries_due ON deliveries (state, next_at)",
        "CREATE UNIQUE INDEX deliveries_file ON deliveries (row_id, key)",
    ],
    7: ["CREATE INDEX files_finished ON files (state, finished_at) WHERE finished_at IS NOT NULL"],
}
POSTGRES_HISTORY = {
    2: ["ALTER TABLE nodes ADD COLUMN inbox_marker TEXT"],
    3: ["ALTER TABLE files ADD COLUMN ctime_ns BIGINT"],
    4: ["ALTER TABLE nodes ADD COLUMN clock_offset_s DOUBLE PRECISION"],
    5: [
        "CREATE TABLE deliveries (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, row_id BIGINT NOT NULL,"
        " event TEXT NOT NULL CHECK (event IN ('done', 'revision', 'failed')), key TEXT NOT NULL, document_id BIGINT,"
        " revision INTEGER, json_path BYTEA NOT NULL, file_path BYTEA NOT NULL, sha256 TEXT NOT NULL,"
        " state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed', 'superseded')), sent TEXT,"
        " attempts INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, next_at DOUBLE PRECISION,"
        " error TEXT, created_at DOUBLE PRECISION NOT NULL, delivered_at DOUBLE PRECISION,"
        " updated_at DOUBLE PRECISION NOT NULL, lease_node TEXT, lease_until TIMESTAMPTZ)",
        "CREATE INDEX deliveries_due ON deliveries (state, next_at)",
        "CREATE UNIQUE INDEX deliveries_file ON deliveries (row_id, key)",
    ],
    6: ["CREATE INDEX files_finished ON files (state, finished_at) WHERE finished_at IS NOT NULL"],
}


def test_each_dialect_keeps_its_own_versions_and_statements():
    assert migrations(SQLITE) == SQLITE_HISTORY
    assert migrations(POSTGRES) == POSTGRES_HISTORY


def test_postgresql_version_1_has_what_sqlite_4_has_and_what_a_cluster_needs():
    statements = " ".join(created(POSTGRES))
    assert "nodes (id TEXT PRIMARY KEY" in statements and "lease_until TIMESTAMPTZ" in statements
    assert "CREATE UNIQUE INDEX IF NOT EXISTS files_active_claim" in statements
    assert "refresh_at DOUBLE PRECISION" in statements and "ctime_ns" not in statements
    assert "CHECK (state IN (" in statements and "CHECK" not in " ".join(created(SQLITE))


def test_a_journal_of_version_1_comes_up_to_the_same_tables_as_a_new_one(tmp_path: Path):
    old = sqlite3.connect(tmp_path / "old.sqlite3", isolation_level=None)
    for statement in created(SQLITE):
        old.execute(statement)
    old.execute(
        "INSERT INTO files (rel_path, state, detected_at, updated_at, token_hash) VALUES (?, 'uploaded', 1, 1, 't')",
        (b"a.pdf",),
    )
    old.close()
    with SqliteJournal(tmp_path / "old.sqlite3") as migrated, SqliteJournal(tmp_path / "new.sqlite3") as new:
        assert migrated.meta("schema_version") == new.meta("schema_version") == "7"
        assert migrated.tokens_of([1]) == {"t": 1} and migrated.get(1).ctime_ns is None

    def tables(name: str) -> dict[str, list[str]]:
        with sqlite3.connect(tmp_path / name) as db:
            names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")]
            return {n: sorted(c[1] for c in db.execute(f"PRAGMA table_info({n})")) for n in names}

    assert tables("old.sqlite3") == tables("new.sqlite3")


def test_a_journal_of_version_5_gets_the_outbox_and_keeps_its_files(tmp_path: Path):
    """SQLite's version 5 (before issue 25): the deliveries table comes, every file stays as it was."""
    with SqliteJournal(tmp_path / "j.sqlite3") as journal:
        (row,) = journal.add_claims([b"a.pdf"], 1.0)
    db = sqlite3.connect(tmp_path / "j.sqlite3", isolation_level=None)
    db.execute("DROP TABLE deliveries")
    db.execute("DROP INDEX files_finished")
    db.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    db.close()
    with SqliteJournal(tmp_path / "j.sqlite3") as journal:
        assert journal.meta("schema_version") == "7" and journal.get(row.id) == row
        assert journal.deliveries() == [] and journal.next_delivery_at() is None
