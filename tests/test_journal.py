"""The journal: the same behaviour on SQLite and on PostgreSQL; SQLite refuses network file systems;
PostgreSQL's cluster parts (leases, one claim per file, roles, notifications, a server restart).

Every test taking ``journal`` or ``backend`` runs once per backend (``[sqlite]``, ``[postgres]``);
the PostgreSQL runs use a throwaway server of the session and a database of their own (conftest).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from konfuzio_watch.config import ConfigError, parse_config
from konfuzio_watch.journal import (
    CHANNEL,
    BaseJournal,
    IllegalTransition,
    Journal,
    JournalError,
    JournalUnavailable,
    JournalWriteError,
    NewClaim,
    Row,
    SqliteJournal,
    State,
    filesystem_type,
    open_journal,
)

from .conftest import wait_until


def postgres(test: Callable[..., Any]) -> Callable[..., Any]:
    """A test on the session's throwaway PostgreSQL server: slow, like every test that starts a server."""
    return pytest.mark.slow(pytest.mark.postgres(test))


def mountinfo_with(mount_point: Path, fstype: str) -> str:
    return (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        f"97 22 0:55 / {mount_point} rw,relatime shared:50 - {fstype} //nas/scans rw,vers=3.0\n"
    )


class Backend:
    """Opens journals on one store (a SQLite file, a PostgreSQL database) and closes them after the test."""

    def __init__(self, name: str, tmp_path: Path, url: str | None):
        self.name, self.tmp_path, self.url = name, tmp_path, url
        self.opened: list[BaseJournal] = []

    def __call__(self, **kwargs: Any) -> BaseJournal:
        if self.url is None:
            journal: BaseJournal = SqliteJournal(self.tmp_path / "journal.sqlite3", **kwargs)
        else:
            from konfuzio_watch.journal.pg import PgJournal

            journal = PgJournal(self.url, **{"wait_s": 5.0, **kwargs})
        self.opened.append(journal)
        return journal

    def sql(self, statement: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """A statement on the store itself, past the journal (to plant what the journal would never write)."""
        if self.url is None:
            with sqlite3.connect(self.tmp_path / "journal.sqlite3", isolation_level=None) as db:
                return db.execute(statement, params).fetchall()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(statement.replace("?", "%s"), params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    made = Backend(request.param, tmp_path, url)
    yield made
    for journal in made.opened:
        journal.close()


@pytest.fixture
def journal(backend: Backend) -> BaseJournal:
    return backend()


def uploaded(
    journal: BaseJournal,
    path: bytes = b"a.pdf",
    token: str = "t1",
    document_id: int = 7,
    now: float = 1.0,
    callback_first: bool = False,
) -> Row:
    """A row that went claiming -> claimed -> uploading -> uploaded."""
    (row,) = journal.add_claims([path], now)
    row = journal.transition(row, State.CLAIMED, now, next_at=now)
    row = journal.start_upload(row, token, now, attempts=1)
    if callback_first:
        assert journal.record_callback(token, None, now)[0] == "recorded"
        row = journal.get(row.id)
    return journal.mark_uploaded(row, document_id, now, poll_at=now + 100)


# -- SQLite only: where the file may live ---------------------------------------------------------


@pytest.mark.parametrize("fstype", ["nfs4", "cifs", "smb3", "fuse.sshfs"])
def test_a_journal_on_a_network_file_system_is_refused(tmp_path: Path, fstype: str):
    info = mountinfo_with(tmp_path / "share", fstype)
    assert filesystem_type(tmp_path / "share" / "state", info) == fstype
    with pytest.raises(JournalError, match=rf"folders.state: .* network file system \({fstype}\)"):
        Journal(tmp_path / "share" / "state" / "journal.sqlite3", mountinfo=info)


def test_a_journal_on_a_local_disk_is_fine(tmp_path: Path):
    info = mountinfo_with(tmp_path / "share", "cifs")
    assert filesystem_type(tmp_path / "local", info) == "ext4"
    journal = Journal(tmp_path / "local" / "journal.sqlite3", mountinfo=info)
    try:
        (row,) = journal.add_claims([b"a\xff.pdf"], now=1.0)
        assert row.state == State.CLAIMING and row.rel_path == b"a\xff.pdf"
        assert journal.integrity_check() == "ok"
    finally:
        journal.close()


def test_the_real_mount_table_is_read(tmp_path: Path):
    assert filesystem_type(tmp_path) is not None


# -- both backends: the behaviour the daemon relies on ------------------------------------------------


def test_claims_are_rows_with_byte_names_identity_and_first_sighting(journal: BaseJournal):
    first, second = journal.add_claims([b"a\xff\n.pdf", NewClaim(b"sub/b.pdf", b"name-b", 2049, 2**40, 0.5)], 3.0)
    assert first.rel_path == b"a\xff\n.pdf" and first.display_path == "a\\xff\\n.pdf"
    assert first.state == State.CLAIMING and first.next_at == 3.0 and first.detected_at == 3.0
    assert len(first.claim_name or b"") == 16 and first.file_dev is None and first.file_ino is None
    assert (second.rel_path, second.claim_name, second.file_dev, second.file_ino) == (
        b"sub/b.pdf",
        b"name-b",
        2049,
        2**40,
    )
    assert second.detected_at == 0.5 and second.updated_at == 3.0
    assert journal.get(second.id) == second and journal.add_claims([], 4.0) == []


def test_moving_the_processing_folder_while_files_wait_there_is_refused(journal: BaseJournal, tmp_path: Path):
    journal.bind_processing_dir(tmp_path / "processing")
    journal.bind_processing_dir(tmp_path / "processing")  # same place: fine
    assert journal.meta("processing_dir") == str(tmp_path / "processing")
    (row,) = journal.add_claims([b"a.pdf"], now=1.0)
    journal.bind_processing_dir(tmp_path / "elsewhere")  # a claim still in the inbox waits nowhere
    journal.bind_processing_dir(tmp_path / "processing")
    row = journal.transition(row, State.CLAIMED, 2.0)
    with pytest.raises(JournalError, match=r"folders.processing: 1 unfinished file\(s\) wait in"):
        journal.bind_processing_dir(tmp_path / "elsewhere")
    row = journal.transition(row, State.FAILING, 3.0)
    journal.transition(row, State.FAILED, 3.0)
    journal.bind_processing_dir(tmp_path / "elsewhere")  # nothing waits: the new place is taken
    assert journal.meta("processing_dir") == str(tmp_path / "elsewhere")


def test_row_ids_are_never_reused(journal: BaseJournal):
    first, second = journal.add_claims([b"a.pdf", b"b.pdf"], now=1.0)
    journal.discard(second)  # the newest row goes away ...
    (third,) = journal.add_claims([b"c.pdf"], now=2.0)
    assert third.id > second.id > first.id  # ... and its id (the name of a processing file) is not handed out again


def test_moves_follow_the_state_table_and_the_state_the_caller_read(journal: BaseJournal):
    (row,) = journal.add_claims([b"a.pdf"], 1.0)
    with pytest.raises(IllegalTransition, match="claiming -> done is not a legal move"):
        journal.transition(row, State.DONE, 2.0)
    claimed = journal.transition(row, State.CLAIMED, 2.0, next_at=2.0, stage="queued")
    assert (claimed.state, claimed.next_at, claimed.stage, claimed.updated_at) == (State.CLAIMED, 2.0, "queued", 2.0)
    with pytest.raises(IllegalTransition, match=rf"a.pdf: no longer claiming \(row {row.id}\)"):
        journal.transition(row, State.CLAIMED, 3.0)  # the stale row: someone moved it first
    with pytest.raises(IllegalTransition, match="no longer claiming"):
        journal.update(row, 3.0, stage="x")
    assert journal.get(row.id) == claimed  # nothing of the refused writes happened


def test_a_move_clears_failures_and_error_and_stamps_the_end(journal: BaseJournal):
    (row,) = journal.add_claims([b"a.pdf"], 1.0)
    row = journal.transition(row, State.CLAIMED, 1.0)
    row = journal.update(row, 2.0, failures=3, error="boom")
    assert (row.failures, row.error) == (3, "boom")
    moved = journal.transition(row, State.UPLOADING, 3.0)
    assert (moved.failures, moved.error, moved.finished_at) == (0, None, None)
    failing = journal.transition(moved, State.FAILING, 4.0, error="gave up", failures=5)
    assert (failing.error, failing.failures) == ("gave up", 5)
    failed = journal.transition(failing, State.FAILED, 5.0)
    assert (failed.error, failed.finished_at) == ("gave up", 5.0)  # the reason stays with a failed file
    assert journal.transition(failed, State.RETRIED, 6.0, finished_at=1.5).finished_at == 1.5


def test_update_refuses_columns_that_are_not_updatable(journal: BaseJournal):
    (row,) = journal.add_claims([b"a.pdf"], 1.0)
    for column in ("id", "state", "detected_at", "nonsense"):
        with pytest.raises(ValueError, match="not updatable"):
            journal.update(row, 2.0, **{column: 1})
    assert journal.update_many([], 2.0, stage="x") == []


def test_update_many_and_transition_many_change_every_row_or_none(journal: BaseJournal):
    rows = journal.add_claims([b"a.pdf", b"b.pdf", b"c.pdf"], 1.0)
    claimed = journal.transition_many(rows, State.CLAIMED, 2.0, next_at=2.0)
    assert [r.id for r in claimed] == [r.id for r in rows] and {r.state for r in claimed} == {State.CLAIMED}
    updated = journal.update_many(claimed[::-1], 3.0, ambiguous_since=3.0)
    assert [r.id for r in updated] == [r.id for r in claimed[::-1]] and {r.ambiguous_since for r in updated} == {3.0}
    with pytest.raises(IllegalTransition):
        journal.update_many([updated[0], rows[1]], 4.0, stage="x")  # rows[1] is stale
    assert {r.stage for r in journal.rows()} == {None}  # the first row's change went with the refused one


def test_every_upload_attempt_keeps_its_token(journal: BaseJournal):
    (row,) = journal.add_claims([b"a.pdf"], 1.0)
    row = journal.transition(row, State.CLAIMED, 1.0)
    row = journal.update(row, 1.5, ambiguous_since=1.5)
    first = journal.start_upload(row, "hash-1", 2.0, attempts=1, upload_name="a.pdf")
    assert (first.state, first.token_hash, first.attempts, first.upload_name) == (State.UPLOADING, "hash-1", 1, "a.pdf")
    assert first.ambiguous_since is None
    with pytest.raises(IllegalTransition):
        journal.start_upload(first, "hash-x", 2.5)  # uploading -> uploading is no move
    again = journal.transition(first, State.CLAIMED, 3.0)
    second = journal.start_upload(again, "hash-2", 4.0, attempts=2)
    with pytest.raises(IllegalTransition, match="no longer claimed"):
        journal.start_upload(again, "hash-3", 4.0)
    assert journal.tokens_of([row.id]) == {"hash-1": row.id, "hash-2": row.id}
    assert journal.tokens_of([]) == {} and journal.tokens_of([row.id + 1]) == {}
    assert journal.find_by_token_hash("hash-1") == second == journal.find_by_token_hash("hash-2")
    assert journal.find_by_token_hash("hash-3") is None


def test_an_uploaded_row_is_due_at_its_poll_or_at_once_after_an_early_callback(journal: BaseJournal):
    late = uploaded(journal, b"late.pdf", "t-late", 7, now=10.0)
    assert (late.state, late.document_id, late.uploaded_at, late.next_at) == (State.UPLOADED, 7, 10.0, 110.0)
    early = uploaded(journal, b"early.pdf", "t-early", 8, now=10.0, callback_first=True)
    assert early.next_at == 10.0 and early.callback_at == 10.0
    (row,) = journal.add_claims([b"c.pdf"], 1.0)
    with pytest.raises(IllegalTransition):
        journal.mark_uploaded(row, 9, 2.0, poll_at=3.0)


def test_callbacks_are_recorded_refused_or_kept_as_extra_documents(journal: BaseJournal):
    assert journal.record_callback("nobody's", None, 1.0) == ("unknown", None)
    (row,) = journal.add_claims([b"a.pdf"], 1.0)
    row = journal.transition(row, State.CLAIMED, 1.0)
    row = journal.start_upload(row, "t1", 2.0)
    outcome, seen = journal.record_callback("t1", None, 3.0)  # before the upload's own answer
    assert outcome == "recorded" and seen and (seen.callback_at, seen.next_at) == (3.0, row.next_at)
    row = journal.mark_uploaded(seen, 7, 4.0, poll_at=100.0, project_id=5)
    assert row.next_at == 4.0 and row.project_id == 5
    row = journal.update(row, 5.0, next_at=50.0)
    outcome, seen = journal.record_callback("t1", 7, 6.0)
    assert outcome == "recorded" and seen and (seen.callback_at, seen.next_at, seen.updated_at) == (6.0, 6.0, 6.0)
    assert journal.record_callback("t1", 8, 7.0) == ("mismatch", None)  # this token was issued for document 7

    row = journal.transition(seen, State.EXPORTING, 8.0)
    row = journal.transition(row, State.CLAIMED, 8.0)  # changed after upload: uploaded again
    row = journal.start_upload(row, "t2", 9.0)
    row = journal.mark_uploaded(row, 9, 9.0, poll_at=20.0)
    assert journal.record_callback("t1", 7, 10.0) == ("extra", None)  # the first attempt's document is a copy
    assert journal.record_callback("t1", 7, 11.0) == ("extra", None)
    assert journal.pending_extras() == [(7, row.id, 5)]
    row = journal.transition(row, State.EXPORTING, 12.0)
    journal.transition(row, State.DONE, 12.0)
    outcome, done = journal.record_callback("t2", 9, 13.0)  # Konfuzio calls again after a review:
    assert outcome == "finished" and done is not None and done.refresh_at == 14.0  # look again, 2 s after done
    assert journal.record_callback("t2", None, 13.5)[1].refresh_at == 14.0, "callbacks in a row: one look"
    assert journal.record_callback("t1", None, 13.5) == ("finished", None), "an earlier token: a replay"


def test_extra_documents_are_recorded_once_and_settled(journal: BaseJournal):
    row = uploaded(journal)
    assert journal.record_extra(70, row, 5, 1.0) is True
    assert journal.record_extra(70, row, 5, 2.0) is False
    assert journal.record_extra(71, row, None, 0.5) is True
    assert journal.record_extra(72, row, None, 3.0) is True
    assert journal.pending_extras() == [(71, row.id, None), (70, row.id, 5), (72, row.id, None)]
    assert journal.pending_extras(limit=1) == [(71, row.id, None)]
    journal.settle_extra(71, 4.0)
    journal.settle_extra(70, 4.0, error="403 forbidden")
    assert journal.pending_extras() == [(72, row.id, None)]


def test_tokens_with_documents_name_files_uploaded_more_than_once(journal: BaseJournal):
    once = uploaded(journal, b"once.pdf", "o1", 1, now=10.0)
    (row,) = journal.add_claims([b"twice.pdf"], 10.0)
    row = journal.transition(row, State.CLAIMED, 10.0)
    row = journal.start_upload(row, "w1", 10.0)
    row = journal.transition(row, State.CLAIMED, 11.0)
    row = journal.start_upload(row, "w2", 12.0)
    assert journal.tokens_with_documents(0.0) == {}  # no document yet
    row = journal.mark_uploaded(row, 2, 13.0, poll_at=20.0)
    assert journal.tokens_with_documents(0.0) == {"w1": (row.id, 2), "w2": (row.id, 2)}
    assert journal.tokens_with_documents(11.5) == {}  # since then it was uploaded once
    assert once.document_id == 1


def test_a_poll_is_scheduled_unless_a_callback_came_while_checking(journal: BaseJournal):
    row = uploaded(journal, now=1.0)
    polled = journal.schedule_poll(row, checked_at=5.0, now=6.0, poll_at=36.0, stage="processing")
    assert (polled.next_at, polled.stage, polled.updated_at) == (36.0, "processing", 6.0)
    journal.record_callback("t1", 7, 7.0)
    row = journal.update(journal.get(row.id), 7.5, failures=2, error="x")
    polled = journal.schedule_poll(row, checked_at=6.5, now=8.0, poll_at=38.0, stage="ocr")
    assert (polled.next_at, polled.failures, polled.error) == (8.0, 0, None)  # the callback came after 6.5
    exporting = journal.transition(polled, State.EXPORTING, 9.0)
    stale = journal.schedule_poll(row, checked_at=9.0, now=9.0, poll_at=99.0, stage="x")  # moved on: nothing
    assert stale == exporting and stale.next_at == 8.0 and stale.stage == "ocr"


def test_only_a_claim_that_is_not_taken_yet_can_be_discarded(journal: BaseJournal):
    a, b = journal.add_claims([b"a.pdf", b"b.pdf"], 1.0)
    b = journal.transition(b, State.CLAIMED, 1.0)
    journal.discard(a)
    journal.discard(b)
    with pytest.raises(KeyError):
        journal.get(a.id)
    assert journal.get(b.id).state == State.CLAIMED


def test_due_times_from_a_clock_stepped_back_are_clamped(journal: BaseJournal):
    rows = journal.add_claims([b"a.pdf", b"b.pdf", b"c.pdf"], 1.0)
    near, far, done = journal.transition_many(rows, State.CLAIMED, 1.0, next_at=1.0)
    journal.update(near, 1.0, next_at=100.0)
    journal.update(far, 1.0, next_at=10_000.0)
    done = journal.transition(journal.transition(done, State.FAILING, 1.0), State.FAILED, 1.0, next_at=10_000.0)
    assert journal.clamp_due(now=50.0, max_delay_s=1000.0) == 1
    assert [journal.get(r.id).next_at for r in (near, far, done)] == [100.0, 50.0, 10_000.0]
    assert journal.clamp_due(now=50.0, max_delay_s=1000.0) == 0


def test_due_rows_come_oldest_first_within_states_exclusions_and_limits(journal: BaseJournal):
    rows = journal.add_claims([b"a", b"b", b"c", b"d"], 1.0)
    a, b, c, d = journal.transition_many(rows, State.CLAIMED, 1.0, next_at=5.0)
    journal.update(a, 1.0, next_at=3.0)
    journal.update(d, 1.0, next_at=9.0)
    assert [r.id for r in journal.runnable([State.CLAIMED], 5.0, [], 10)] == [a.id, b.id, c.id]
    assert [r.id for r in journal.runnable([State.CLAIMED], 5.0, [b.id], 2)] == [a.id, c.id]
    assert journal.runnable([State.CLAIMED], 2.0, [], 10) == []
    assert journal.runnable([], 100.0, [], 10) == [] and journal.runnable([State.UPLOADED], 100.0, [], 10) == []
    assert journal.next_due_at([State.CLAIMED], []) == 3.0
    assert journal.next_due_at([State.CLAIMED], [a.id, b.id]) == 5.0
    assert journal.next_due_at([State.UPLOADING], []) is None and journal.next_due_at([], []) is None
    failing = journal.transition(d, State.FAILING, 1.0, next_at=7.0)
    assert journal.next_due_by_state([State.CLAIMED, State.FAILING, State.UPLOADING], [a.id]) == {
        State.CLAIMED: 5.0,
        State.FAILING: 7.0,
    }
    assert journal.next_due_by_state([State.FAILING], [failing.id]) == {} == journal.next_due_by_state([], [])


def test_reads(journal: BaseJournal):
    assert journal.rows() == [] and journal.oldest_active_detected_at() is None
    assert journal.counts() == {state: 0 for state in State}
    claims = [NewClaim(b"a", b"na", detected_at=5.0), NewClaim(b"b", b"nb", detected_at=2.0), NewClaim(b"c", b"nc")]
    a, b, c = journal.add_claims(claims, 10.0)
    b = journal.transition(b, State.CLAIMED, 11.0, sha256="s1")
    c = journal.transition(c, State.CLAIMED, 11.0, sha256="s1", claim_name=None)
    b = journal.start_upload(b, "tb", 12.0)
    assert journal.counts()[State.CLAIMING] == 1 and journal.counts()[State.CLAIMED] == 1
    assert journal.counts()[State.UPLOADING] == 1 and sum(journal.counts().values()) == 3
    assert journal.oldest_active_detected_at() == 2.0
    assert [r.id for r in journal.rows()] == [a.id, b.id, c.id] and journal.rows(limit=1) == [a]
    assert journal.rows([State.CLAIMED, State.UPLOADING]) == [b, c]
    assert journal.claim_names([State.CLAIMED, State.UPLOADING]) == {b"nb", str(c.id).encode()}
    assert journal.claim_names([]) == set()
    assert journal.find_same_content("s1", exclude_id=c.id) == b  # uploading: on its way to done
    assert journal.find_same_content("s1", exclude_id=b.id) is None  # claimed is not on its way yet
    assert journal.meta("no such key") is None
    with pytest.raises(KeyError):
        journal.get(c.id + 100)
    assert journal.get_many([c.id, c.id + 100, a.id]) == [c, a]


def test_the_status_pages_reads(journal: BaseJournal):
    claims = [NewClaim(f"f{i}".encode(), f"n{i}".encode(), detected_at=100.0 - i) for i in range(6)]
    rows = journal.add_claims(claims, 100.0)
    rows = journal.transition_many(rows, State.CLAIMED, 101.0, next_at=101.0)
    for row, (state, at) in zip(
        rows[:4],
        [(State.DONE, 200.0), (State.DONE, 300.0), (State.FAILED, 250.0)] + [(State.FAILED, 310.0)],
        strict=True,
    ):
        row = journal.transition(
            row, State.FAILING if state == State.FAILED else State.UPLOADING, at - 1, token_hash=f"t{row.id}"
        )
        row = row if state == State.FAILED else journal.transition(row, State.UPLOADED, at - 1, document_id=row.id)
        row = row if state == State.FAILED else journal.transition(row, State.EXPORTING, at - 1)
        journal.transition(row, state, at)
    retried = journal.transition(journal.get(rows[3].id), State.RETRIED, 320.0)  # a retried file: not failed any more
    assert journal.finished_counts_since(250.0) == {State.DONE: 1, State.FAILED: 1}
    assert journal.finished_counts_since(0.0) == {State.DONE: 2, State.FAILED: 1}
    assert sorted(journal.finished_times_since(250.0)) == [(State.DONE, 300.0), (State.FAILED, 250.0)]
    assert [r.id for r in journal.oldest_active_rows(1)] == [rows[5].id]  # detected first
    assert [r.id for r in journal.oldest_active_rows(10)] == [rows[5].id, rows[4].id]
    assert [r.id for r in journal.latest_rows(State.DONE, 10)] == [rows[1].id, rows[0].id]
    assert journal.latest_rows(State.FAILED, 10) == [journal.get(rows[2].id)] and retried.state == State.RETRIED


def test_many_rows_in_one_call(journal: BaseJournal):
    rows = journal.add_claims([f"f{i:04}.pdf".encode() for i in range(1100)], 1.0)
    assert len(rows) == 1100 and len({r.id for r in rows}) == 1100
    ids = [r.id for r in rows][::-1]
    assert [r.id for r in journal.get_many(ids)] == ids  # in chunks, in the order asked
    claimed = journal.transition_many(rows, State.CLAIMED, 2.0, next_at=2.0)
    tokens = {}
    for row in claimed[:600]:
        journal.start_upload(row, f"t{row.id}", 3.0)
        tokens[f"t{row.id}"] = row.id
    assert journal.tokens_of(r.id for r in rows) == tokens
    assert len(journal.runnable([State.CLAIMED], 5.0, [r.id for r in claimed[600:1000]], 1000)) == 100


def test_times_and_large_numbers_come_back_exactly(journal: BaseJournal):
    now = 1795621922.123456789
    (row,) = journal.add_claims([NewClaim(b"a.pdf", b"n", dev=2**63 - 1, ino=2**62 + 1, detected_at=now)], now)
    row = journal.update(
        row,
        now + 1e-6,
        size=2**40,
        mtime_ns=1795621922123456789,
        next_at=now / 3,
        final_path=b"/done/\xff",
        fingerprint="f" * 64,
        revision=3,
    )
    again = journal.get(row.id)
    assert again == row and again.detected_at == now and again.updated_at == now + 1e-6 and again.next_at == now / 3
    assert (again.file_dev, again.file_ino, again.size, again.mtime_ns) == (
        2**63 - 1,
        2**62 + 1,
        2**40,
        1795621922123456789,
    )
    assert again.final_path == b"/done/\xff" and isinstance(again.final_path, bytes)


def test_identity_schema_and_checks_survive_reopening(backend: Backend):
    journal = backend()
    assert len(journal.journal_id) == 16 and journal.check() is None
    assert journal.quick_check() == "ok" and journal.integrity_check() == "ok"
    journal.probe(12.5)
    assert journal.meta("probed_at") == "12.5" and journal.meta("schema_version") == str(journal.schema_version)
    (row,) = journal.add_claims([b"a.pdf"], 1.0)
    journal.close()
    again = backend()
    assert again.journal_id == journal.journal_id and again.get(row.id) == row and again.check() is None


def test_a_journal_from_before_the_ctime_column_gains_it_and_keeps_its_rows(backend: Backend):
    journal = backend()
    (row,) = journal.add_claims([NewClaim(b"a.pdf", b"n", dev=1, ino=2)], 1.0)
    row = journal.update(row, 2.0, size=10, mtime_ns=1795621922123456789)
    journal.close()
    # As the version before it left the journal: SQLite's schema 4, PostgreSQL's 2 (3 added ctime_ns,
    # 4 the nodes' clock offsets).
    backend.sql("ALTER TABLE files DROP COLUMN ctime_ns")
    backend.sql("DROP TABLE deliveries")  # (the outbox came later still: SQLite's 6, PostgreSQL's 5)
    backend.sql("DROP INDEX files_finished")  # (and the finished files' index: SQLite's 7, PostgreSQL's 6)
    if backend.url is not None:
        backend.sql("ALTER TABLE nodes DROP COLUMN clock_offset_s")
    backend.sql("UPDATE meta SET value = ? WHERE key = 'schema_version'", ("2" if backend.url else "4",))

    again = backend()
    assert again.get(row.id) == row and row.ctime_ns is None
    assert again.meta("schema_version") == str(again.schema_version)
    again.update(row, 3.0, ctime_ns=1795621922987654321)
    assert again.get(row.id).ctime_ns == 1795621922987654321


def test_a_journal_written_by_a_newer_konfuzio_watch_is_refused(backend: Backend):
    journal = backend()
    newer = journal.schema_version + 1
    journal.close()
    backend.sql("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(newer),))
    with pytest.raises(JournalError, match=rf"newer konfuzio-watch \(schema {newer}, this one knows"):
        backend()


def test_listeners_hear_callbacks_and_due_rows_after_the_commit(journal: BaseJournal):
    heard: list[str] = []
    listener = journal.listen(heard.append)
    row = uploaded(journal, now=1.0)
    journal.record_callback("t1", 7, 2.0)
    journal.notify("hello")
    wait_until(lambda: heard[-1:] == ["hello"], 10, lambda: f"the notifications, heard {heard}")
    # In commit order: claimed, uploaded (due at its poll), the callback (due at once), the notice.
    assert in_order(["due:1.0", "due:101.0", f"callback:{row.id}", "hello"], heard), heard
    listener.close()
    later: list[str] = []
    other = journal.listen(later.append)  # hears what the closed one would have heard, by the same way
    journal.notify("after close")
    wait_until(lambda: "after close" in later, 10, "the notice heard by the open listener")
    other.close()
    assert "after close" not in heard


def in_order(expected: list[str], heard: list[str]) -> bool:
    """Whether ``expected`` is in ``heard``, in this order (others may come between)."""
    rest = iter(heard)
    return all(any(item == got for got in rest) for item in expected)


def test_one_node_has_every_row_and_role(journal: BaseJournal):
    """The cluster methods with one node: what the daemon gets from SQLite, and from PostgreSQL alone."""
    journal.join()
    journal.heartbeat()
    assert [n.id for n in journal.nodes()] == [journal.node_id]
    rows = journal.transition_many(journal.add_claims([b"a", b"b", b"c"], 1.0), State.CLAIMED, 1.0, next_at=1.0)
    due = journal.runnable([State.CLAIMED], 2.0, [rows[0].id], 10)
    assert journal.take_due([State.CLAIMED], 2.0, [rows[0].id], 10) == due == rows[1:]
    assert journal.renew_leases([r.id for r in due]) == {r.id for r in due}
    assert journal.take_over_expired() == []
    journal.release_leases([r.id for r in due])
    assert journal.lease_of(rows[1].id) is None
    role = journal.role("rescanner")
    assert role.acquire() and role.held() and role.acquire()
    role.release()
    assert not role.held()
    journal.leave()


def test_the_sqlite_journal_is_the_default_and_keeps_its_name(tmp_path: Path):
    assert Journal is SqliteJournal
    config = parse_config(_raw(tmp_path))
    journal = open_journal(config)
    try:
        assert isinstance(journal, SqliteJournal) and journal.path == config.folders.state / "journal.sqlite3"
        assert journal.node_id == config.node_id and journal.check() is None
        assert journal.lease_of(1) is None and journal.take_over_expired() == []
    finally:
        journal.close()


# -- configuration ------------------------------------------------------------------------------


def _raw(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "konfuzio": {"token": "x", "project_id": 1},
        "folders": {name: str(tmp_path / name) for name in ("inbox", "done", "failed", "state")},
    }
    raw.update(sections)
    return raw


def test_the_journal_section_takes_a_url_without_a_password(tmp_path: Path):
    import socket

    config = parse_config(_raw(tmp_path))
    assert config.journal.url is None and config.node_id == socket.gethostname()
    config = parse_config(
        _raw(tmp_path, journal={"url": "postgresql://kw@db:5432/kw", "password_file": "pw"}, node={"id": "scanner-1"}),
        base_dir=tmp_path,
    )
    assert config.journal.password_file == tmp_path / "pw" and config.node_id == "scanner-1"
    with pytest.raises(ConfigError, match="journal.password_file: cannot read"):
        config.journal_password()
    (tmp_path / "pw").write_text("s3cret\n")
    assert config.journal_password() == "s3cret"
    refused = {
        "journal.url: no password in the URL": {"journal": {"url": "postgresql://kw:s3cret@db/kw"}},
        "journal.url: no password in the URL; use": {"journal": {"url": "postgresql://db/kw?password=s3cret"}},
        "journal.url: expected postgresql://": {"journal": {"url": "mysql://db/kw"}},
        "journal.password_file: set journal.url too": {"journal": {"password_file": "pw"}},
        "node.id: letters, digits": {"node": {"id": "a b"}},
    }
    for message, sections in refused.items():
        with pytest.raises(ConfigError, match=message) as raised:
            parse_config(_raw(tmp_path, **sections))
        assert "s3cret" not in str(raised.value)


# -- PostgreSQL: the cluster ------------------------------------------------------------------------


@pytest.fixture
def nodes(pg_url: str) -> Iterator[Callable[..., Any]]:
    """Journals of several nodes on one database: ``nodes("a")``."""
    from konfuzio_watch.journal.pg import PgJournal

    opened: list[PgJournal] = []

    def make(node_id: str, **kwargs: Any) -> PgJournal:
        opened.append(PgJournal(pg_url, node_id=node_id, **{"wait_s": 5.0, **kwargs}))
        return opened[-1]

    yield make
    for journal in opened:
        journal.close()


def due_rows(journal: BaseJournal, n: int, now: float = 1.0) -> list[Row]:
    """Claimed rows, due, free for any node (as ``Pipeline.finish_claims`` leaves them)."""
    rows = journal.add_claims([f"f{i:03}.pdf".encode() for i in range(n)], now)
    rows = journal.transition_many(rows, State.CLAIMED, now, next_at=now)
    journal.release_leases([r.id for r in rows])
    return rows


@postgres
def test_two_nodes_take_disjoint_due_rows_and_skip_the_ones_being_taken(nodes: Callable[..., Any], pg_url: str):
    import psycopg

    a, b = nodes("a"), nodes("b")
    rows = due_rows(a, 10)
    taken_a = a.take_due([State.CLAIMED], 5.0, [], 4, lease_s=60)
    assert [r.id for r in taken_a] == [r.id for r in rows[:4]]
    assert a.lease_of(rows[0].id).node == "a" and 55 < a.lease_of(rows[0].id).remaining_s <= 60
    # A third party holds rows 4 and 5 locked (a node in the middle of taking them): b skips, never waits.
    with psycopg.connect(pg_url) as other:
        other.execute("SELECT id FROM files WHERE id = ANY(%s) FOR UPDATE", ([rows[4].id, rows[5].id],))
        started = time.monotonic()
        taken_b = b.take_due([State.CLAIMED], 5.0, [], 10, lease_s=60)
        assert time.monotonic() - started < 2
    assert [r.id for r in taken_b] == [r.id for r in rows[6:]]
    assert b.take_due([State.CLAIMED], 5.0, [r.id for r in taken_b], 10) == b.get_many([rows[4].id, rows[5].id])
    assert a.take_due([State.CLAIMED], 5.0, [r.id for r in taken_a], 10) == []  # a's own are excluded by a
    assert b.renew_leases([r.id for r in rows]) == {r.id for r in rows[4:]}


@postgres
def test_concurrent_takers_never_get_the_same_row(nodes: Callable[..., Any]):
    journals = [nodes(f"n{i}") for i in range(3)]
    rows = due_rows(journals[0], 60)
    got: dict[str, list[int]] = {j.node_id: [] for j in journals}
    barrier = threading.Barrier(len(journals))

    def take(journal: Any) -> None:
        barrier.wait()
        while batch := journal.take_due([State.CLAIMED], 5.0, got[journal.node_id], 3, lease_s=60):
            got[journal.node_id].extend(r.id for r in batch)

    threads = [threading.Thread(target=take, args=(j,)) for j in journals]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    taken = [i for ids in got.values() for i in ids]
    assert sorted(taken) == sorted(r.id for r in rows), "every row taken exactly once"


@postgres
def test_a_lease_fences_other_nodes_until_it_expires_and_is_taken_over(nodes: Callable[..., Any]):
    a, b = nodes("a"), nodes("b")
    (row,) = due_rows(a, 1)
    (row,) = a.take_due([State.CLAIMED], 5.0, [], 1, lease_s=0.5)
    assert b.take_due([State.CLAIMED], 5.0, [], 1) == [] and b.take_over_expired() == []
    with pytest.raises(IllegalTransition):
        b.start_upload(row, "tb", 6.0)  # a's row while a's lease lasts
    assert b.record_callback("nope", None, 6.0)[0] == "unknown"
    # a hangs; once its lease has expired (by the database's clock), b takes the row over
    (taken,) = wait_until(lambda: b.take_over_expired(lease_s=60), 10, "a's lease expired and taken over")
    assert taken == row and b.lease_of(row.id).node == "b"
    assert a.renew_leases([row.id]) == set()  # a wakes up: the row is no longer its
    with pytest.raises(IllegalTransition):
        a.start_upload(row, "ta", 7.0)
    row = b.start_upload(row, "tb", 7.0)
    assert row.token_hash == "tb" and b.renew_leases([row.id], lease_s=60) == {row.id}
    b.release_leases([row.id])
    assert b.lease_of(row.id) is None
    a.update(row, 8.0, stage="anyone may write a row nobody leases")


@postgres
def test_nodes_say_they_are_alive_and_leave_their_leases_behind_when_they_stop(nodes: Callable[..., Any]):
    a, b = nodes("a"), nodes("b")
    a.join()
    b.join()
    wait_until(lambda: {n.id: n for n in a.nodes()}["a"].silent_s > 0.05, 10, "a silent for a moment")
    b.heartbeat()
    listed = {n.id: n for n in a.nodes()}
    assert set(listed) == {"a", "b"} and listed["a"].silent_s > listed["b"].silent_s >= 0
    assert listed["a"].pid == os.getpid() and listed["a"].heartbeat_at >= listed["a"].started_at
    rows = due_rows(a, 3)
    assert len(a.take_due([State.CLAIMED], 5.0, [], 3)) == 3
    a.leave()
    assert [n.id for n in b.nodes()] == ["b"] and all(b.lease_of(r.id) is None for r in rows)
    assert len(b.take_due([State.CLAIMED], 5.0, [], 3)) == 3


@postgres
def test_a_file_is_claimed_by_one_node_however_many_claim_it_at_once(nodes: Callable[..., Any]):
    journals = [nodes(f"n{i}") for i in range(4)]
    claims = [NewClaim(f"scan-{i}.pdf".encode(), f"n{i}".encode(), dev=1, ino=1000 + i) for i in range(40)]
    got: list[list[Row]] = [[] for _ in journals]
    barrier = threading.Barrier(len(journals))

    def claim(k: int) -> None:
        barrier.wait()
        for start in range(0, len(claims), 5):
            got[k].extend(journals[k].add_claims(claims[start : start + 5], 1.0))

    threads = [threading.Thread(target=claim, args=(k,)) for k in range(len(journals))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    claimed = sorted(r.rel_path for rows in got for r in rows)
    assert claimed == sorted(c.rel_path for c in claims), "each file claimed exactly once"
    # Another file at the same path (another inode) while the first is on its way: a new file.
    (again,) = journals[0].add_claims([NewClaim(b"scan-0.pdf", b"x", dev=2, ino=5000)], 2.0)
    # The same file while its row is active: no; once that row finished, the same path and inode may return.
    k, first = next((k, r) for k, rows in enumerate(got) for r in rows if r.rel_path == b"scan-1.pdf")
    assert journals[1].add_claims([claims[1]], 2.0) == []
    claimer, other = journals[k], journals[(k + 1) % len(journals)]
    assert claimer.lease_of(first.id).node == claimer.node_id  # a claim is its claimer's until it is done
    with pytest.raises(IllegalTransition):
        other.transition(first, State.CLAIMED, 3.0)
    first = claimer.transition(claimer.get(first.id), State.CLAIMED, 3.0)
    first = claimer.transition(first, State.FAILING, 3.0)
    claimer.transition(first, State.FAILED, 3.0)
    assert len(journals[1].add_claims([claims[1]], 4.0)) == 1
    assert again.rel_path == b"scan-0.pdf"


@postgres
def test_a_role_is_held_by_one_node_and_passes_on_when_its_node_is_gone(nodes: Callable[..., Any], pg_url: str):
    import psycopg

    a, b = nodes("a"), nodes("b")
    ra, rb = a.role("rescanner"), b.role("rescanner")
    assert ra.acquire() and ra.held()
    assert not rb.acquire() and not rb.held()
    assert b.role("other").acquire()  # roles are independent
    ra.release()
    assert rb.acquire() and not ra.acquire()
    with psycopg.connect(pg_url, autocommit=True) as admin:  # b's connection dies (a crash, a cut cable)
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND pid <> pg_backend_pid()"
        )
    wait_until(lambda: not rb.held(), 5, "b to notice that it lost the role")
    assert ra.acquire() and not rb.acquire()


@postgres
def test_notifications_reach_every_node(nodes: Callable[..., Any]):
    a, b = nodes("a"), nodes("b")
    heard: list[str] = []
    listener = b.listen(heard.append)
    row = uploaded(a, now=1.0)
    a.record_callback("t1", 7, 2.0)
    a.notify("rescan")
    wait_until(lambda: "rescan" in heard, 10, lambda: f"b to hear a's notifications (heard {heard})")
    assert f"callback:{row.id}" in heard and "due:1.0" in heard
    listener.close()
    assert CHANNEL == "konfuzio_watch"


@postgres
def test_a_server_restart_fails_calls_while_it_is_down_and_costs_nothing_after(
    nodes: Callable[..., Any], pg_cluster: Any
):
    journal = nodes("a", wait_s=1.0)
    heard: list[str] = []
    listener = journal.listen(heard.append)
    role = journal.role("rescanner")
    assert role.acquire()
    (row,) = due_rows(journal, 1)
    pg_cluster.stop()
    try:
        started = time.monotonic()
        with pytest.raises(JournalWriteError):
            journal.probe(2.0)
        with pytest.raises(JournalUnavailable, match="cannot be reached"):
            journal.counts()
        with pytest.raises(JournalUnavailable):
            journal.transition(row, State.FAILING, 2.0)
        assert time.monotonic() - started < 10
        assert not role.held()
    finally:
        pg_cluster.start()
    wait_until(lambda: _works(journal), 20, "the journal to work again after the restart")
    assert journal.transition(row, State.FAILING, 3.0).state == State.FAILING
    wait_until(lambda: "reconnected" in heard, 20, "the listener to listen again")
    journal.notify("back")
    wait_until(lambda: "back" in heard, 10, "a notification after the restart")
    assert role.acquire()
    listener.close()


def _works(journal: BaseJournal) -> bool:
    try:
        journal.probe(3.0)
        return True
    except JournalWriteError:
        return False


@postgres
def test_a_database_that_refuses_writes_raises_journal_write_error(nodes: Callable[..., Any], pg_url: str):
    import psycopg

    journal = nodes("a")
    (row,) = journal.add_claims([b"a.pdf"], 1.0)
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {database} SET default_transaction_read_only = on")
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
    with pytest.raises(JournalWriteError, match="read-only") as raised:
        journal.transition(row, State.CLAIMED, 2.0)
    assert not isinstance(raised.value, JournalUnavailable)  # the server answered: it refuses
    assert journal.get(row.id) == row  # reads go on
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SET default_transaction_read_only = off")
        admin.execute(f"ALTER DATABASE {database} RESET default_transaction_read_only")
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
    journal.probe(3.0)
    assert journal.transition(row, State.CLAIMED, 3.0).state == State.CLAIMED


@postgres
def test_the_schema_is_created_once_by_nodes_starting_together(pg_url: str):
    from konfuzio_watch.journal.pg import PgJournal

    opened: list[PgJournal] = []
    barrier = threading.Barrier(4)

    def start(k: int) -> None:
        barrier.wait()
        opened.append(PgJournal(pg_url, node_id=f"n{k}", wait_s=5.0))

    threads = [threading.Thread(target=start, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(opened) == 4 and len({j.journal_id for j in opened}) == 1
    finally:
        for journal in opened:
            journal.close()


@postgres
def test_the_schema_is_checked_without_touching_it_and_upgraded_by_the_daemon(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
):
    from konfuzio_watch.journal import pg as journal_pg
    from konfuzio_watch.journal.pg import PgJournal

    with PgJournal(pg_url, migrate=False) as looking:
        assert looking.check() == f"{looking.location}: no journal yet (the daemon creates it when it starts)"
        assert looking.journal_id == ""
    with PgJournal(pg_url) as daemon:
        assert daemon.check() is None
        (row,) = daemon.add_claims([b"a.pdf"], 1.0)
    now = PgJournal.schema_version
    monkeypatch.setattr(
        journal_pg,
        "PG_MIGRATIONS",
        {**journal_pg.PG_MIGRATIONS, now + 1: ["ALTER TABLE files ADD COLUMN shiny INTEGER"]},
    )
    monkeypatch.setattr(PgJournal, "schema_version", now + 1)
    with PgJournal(pg_url, migrate=False) as looking:
        assert looking.check() == (
            f"{looking.location}: journal schema {now}, this konfuzio-watch writes {now + 1}: "
            "the daemon upgrades it when it starts"
        )
    with PgJournal(pg_url) as daemon:
        assert daemon.check() is None and daemon.get(row.id) == row and daemon.meta("schema_version") == str(now + 1)
        assert daemon.quick_check() == "ok"


@postgres
def test_the_integrity_check_reads_everything_and_checks_indexes_with_amcheck(
    nodes: Callable[..., Any], pg_url: str, tmp_path: Path
):
    journal = nodes("a")
    row = uploaded(journal)
    assert journal.integrity_check() == "ok"
    store = Backend("postgres", tmp_path, pg_url)
    store.sql("CREATE EXTENSION IF NOT EXISTS amcheck")
    assert journal.integrity_check() == "ok"
    store.sql("DELETE FROM files WHERE id = ?", (row.id,))
    assert journal.integrity_check() == "1 upload token(s) of rows that are gone"


@postgres
def test_the_password_comes_from_the_password_file(pg_cluster: Any, pg_url: str, tmp_path: Path):
    from .pg import PASSWORD_USER

    pg_cluster.admin(f"DROP ROLE IF EXISTS {PASSWORD_USER}")
    pg_cluster.admin(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD 'right horse battery'")
    database = pg_url.rsplit("/", 1)[1]
    pg_cluster.admin(f"GRANT ALL ON SCHEMA public TO {PASSWORD_USER}", database=database)
    url = pg_cluster.url(database, user=PASSWORD_USER)
    (tmp_path / "pw").write_text("wrong\n")
    config = parse_config(
        _raw(tmp_path, journal={"url": url, "password_file": str(tmp_path / "pw")}, node={"id": "node-1"})
    )
    with pytest.raises(JournalError, match="cannot open the journal .*password authentication failed") as raised:
        open_journal(config)
    assert "wrong" not in str(raised.value)
    (tmp_path / "pw").write_text("right horse battery\n")
    journal = open_journal(config, wait_s=5.0)
    try:
        assert journal.node_id == "node-1" and journal.location == url and journal.check() is None
        journal.add_claims([b"a.pdf"], 1.0)
    finally:
        journal.close()


@postgres
def test_a_server_that_is_not_there_is_one_clear_error(pg_cluster: Any):
    from konfuzio_watch.journal.pg import PgJournal

    from .pg import free_port

    started = time.monotonic()
    with pytest.raises(JournalError, match=r"cannot open the journal postgresql://kw@127.0.0.1:\d+/kw: .*"):
        PgJournal(f"postgresql://kw@127.0.0.1:{free_port()}/kw", connect_timeout_s=2)
    assert time.monotonic() - started < 10


@pytest.mark.slow
@pytest.mark.parametrize("ci", [False, True])
def test_without_postgresql_its_tests_skip_loudly_or_fail_in_ci(tmp_path: Path, ci: bool):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("CI", "KONFUZIO_WATCH_REQUIRE_POSTGRES")}
    env["PG_BINDIR"] = str(tmp_path / "no-postgresql-here")
    if ci:
        env["CI"] = "true"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-k",
            "test_row_ids_are_never_reused",
            str(Path(__file__)),
        ],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = done.stdout.strip().splitlines()[-1]
    if ci:
        assert done.returncode == 1, done.stdout
        assert "1 passed" in last and "1 error" in last and "PostgreSQL is required here (CI" in done.stdout
    else:
        assert done.returncode == 0, done.stdout
        assert "1 passed" in last and "1 skipped" in last
        assert "PostgreSQL journal tests SKIPPED" in done.stdout and "no PostgreSQL server binaries" in done.stdout


def test_becoming_done_arms_a_second_look_in_the_same_transaction_if_a_callback_came_since(journal: BaseJournal):
    """A review may beat the export: a callback that came in after the details were fetched
    (``since``) makes the done row due for a look again (``refresh_at``), in the transition itself."""
    a, b = journal.add_claims([b"a.pdf", b"b.pdf"], 1.0)
    exporting = []
    for row, called_back_at in ((a, 5.0), (b, 2.0)):
        row = journal.start_upload(journal.transition(row, State.CLAIMED, 1.0), f"t-{row.id}", 1.0)
        row = journal.mark_uploaded(row, 10 + row.id, 1.5, poll_at=100.0)
        row = journal.update(row, 1.5, callback_at=called_back_at)
        exporting.append(journal.transition(row, State.EXPORTING, 3.0))
    reviewed, plain = (
        journal.transition(r, State.DONE, 6.0, durable=False, refresh_if_called_back_since=4.0) for r in exporting
    )
    assert (reviewed.state, reviewed.refresh_at) == (State.DONE, 6.0)
    assert (plain.state, plain.refresh_at) == (State.DONE, None)
    assert journal.due_refreshes(6.0, [], 10) == [reviewed]


# -- the outbox (deliveries, issue 25) --------------------------------------------------------------


def done_with(journal: BaseJournal, deliveries: list[Any], path: bytes = b"a.pdf", document_id: int = 7) -> Row:
    """A row moved to done with ``deliveries`` (``NewDelivery``) in the same transaction."""
    row = uploaded(journal, path=path, token=f"t-{path.decode()}", document_id=document_id)
    row = journal.transition(row, State.EXPORTING, 2.0)
    return journal.transition(row, State.DONE, 3.0, final_path=b"/done/" + path, revision=1, deliveries=deliveries)


def new_delivery(key: str = "7:1", event: str = "done", revision: int | None = 1, sha: str = "s1") -> Any:
    from konfuzio_watch.journal.outbox import NewDelivery

    return NewDelivery(event, key, 7, revision, b"/done/a.pdf.json", b"/done/a.pdf", sha)


def test_a_move_writes_its_deliveries_in_its_own_transaction(journal: BaseJournal):
    from konfuzio_watch.journal.outbox import DeliveryState

    row = done_with(journal, [new_delivery()])
    (d,) = journal.deliveries()
    assert (d.row_id, d.key, d.event, d.state, d.created_at, d.next_at) == (row.id, "7:1", "done", "pending", 3.0, 3.0)
    assert journal.due_deliveries(3.0, 10) == [d] and journal.due_deliveries(2.9, 10) == []
    assert journal.next_delivery_at() == 3.0 and journal.oldest_pending_delivery_at() == 3.0
    # A move that is refused (the row moved meanwhile) writes no delivery either.
    stale = journal.transition(uploaded(journal, b"b.pdf", "tb"), State.EXPORTING, 2.0)
    journal.transition(stale, State.FAILING, 3.5)  # moved meanwhile
    with pytest.raises(IllegalTransition):
        journal.transition(stale, State.DONE, 4.0, deliveries=[new_delivery("8:1")])
    assert [x.key for x in journal.deliveries()] == ["7:1"]
    assert journal.delivery_counts()[DeliveryState.PENDING] == 1


def test_per_file_only_the_first_pending_delivery_is_due_and_refresh_writes_the_next(journal: BaseJournal):
    row = done_with(journal, [new_delivery()])
    journal.finish_refresh(row, 3.0, 4.0, revision=2, deliveries=[new_delivery("7:2", "revision", 2, "s2")])
    other = done_with(journal, [new_delivery("9:1")], path=b"b.pdf", document_id=9)
    first, second, third = journal.deliveries()
    assert [d.key for d in journal.due_deliveries(10.0, 10)] == ["7:1", "9:1"], "7:2 waits for 7:1"
    assert journal.take_due_deliveries(10.0, 1) == [first]
    assert journal.has_later_delivery(first) and not journal.has_later_delivery(second)
    assert journal.delivery_superseded(first, 11.0, "replaced").state == "superseded"
    assert [d.key for d in journal.due_deliveries(11.0, 10)] == ["9:1", "7:2"]
    done = journal.delivery_done(third, 12.0)
    assert done.state == "delivered" and done.delivered_at == 12.0 and other.id == third.row_id
    # Written again (a crash before the move was made durable, then the move again): one row per key.
    with journal._write() as tx:
        journal._add_deliveries(tx, row.id, [new_delivery("7:2", "revision", 2, "other")], 13.0)
    assert len(journal.deliveries()) == 3


def test_a_delivery_waits_fails_and_is_sent_again_with_the_same_key(journal: BaseJournal):
    done_with(journal, [new_delivery()])
    (d,) = journal.deliveries()
    d = journal.delivery_sent(d, "webhook", 4.0)
    assert d.sent_by == {"webhook"}
    d = journal.delivery_waits(d, 5.0, "HTTP 503", next_at=5.0)
    assert (d.attempts, d.failures, d.error, d.state) == (1, 0, "HTTP 503", "pending")
    d = journal.delivery_failed(d, 6.0, "HTTP 410")
    assert (d.state, d.failures, d.next_at) == ("failed", 1, None) and journal.due_deliveries(99.0, 10) == []
    assert journal.delivery_done(d, 7.0) is None, "only a pending delivery changes"
    (again,) = journal.redeliver([d.id], 8.0)
    assert (again.key, again.state, again.next_at, again.sent, again.error) == ("7:1", "pending", 8.0, None, None)
    assert journal.redeliver([d.id], 9.0) == [], "a pending one is left as it is"


def test_a_move_without_deliveries_is_one_statement_as_before(tmp_path: Path):
    """No ``deliver`` section: not one statement more per file (the move to done stays one UPDATE)."""
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    try:
        seen: list[str] = []
        row = journal.transition(uploaded(journal), State.EXPORTING, 2.0)
        journal._db.set_trace_callback(seen.append)
        journal.transition(row, State.DONE, 3.0, final_path=b"/done/a.pdf", revision=1)
        assert [s.split()[0] for s in seen] == ["UPDATE"]
        seen.clear()
        row = journal.transition(uploaded(journal, b"b.pdf", "tb"), State.EXPORTING, 2.0)
        seen.clear()
        journal.transition(row, State.DONE, 3.0, final_path=b"/done/b.pdf", revision=1, deliveries=[new_delivery()])
        assert [s.split()[0] for s in seen] == ["BEGIN", "UPDATE", "INSERT", "COMMIT"]
    finally:
        journal.close()


@postgres
def test_a_delivery_is_leased_to_one_node_until_it_is_sent_or_its_lease_expires(nodes: Callable[..., Any]):
    a, b = nodes("a"), nodes("b")
    done_with(a, [new_delivery()])
    done_with(a, [new_delivery("9:1")], path=b"b.pdf", document_id=9)
    (first,) = a.take_due_deliveries(10.0, 1, lease_s=0.5)
    (second,) = b.take_due_deliveries(10.0, 5, lease_s=60)
    assert (first.key, second.key) == ("7:1", "9:1"), "never the same delivery twice in parallel"
    assert b.delivery_done(first, 11.0) is None, "a's while its lease lasts"
    b.release_deliveries([second.id])
    taken = a.take_due_deliveries(10.0, 5, lease_s=0.5)
    assert [d.key for d in taken] == ["7:1", "9:1"], "its own again, and the one b gave up"
    assert b.take_due_deliveries(10.0, 5) == [] and b.delivery_done(second, 11.0) is None
    taken = wait_until(lambda: b.take_due_deliveries(10.0, 5, lease_s=60), 10, "a's leases expired")
    assert [d.key for d in taken] == ["7:1", "9:1"] and b.delivery_done(taken[0], 12.0).state == "delivered"
