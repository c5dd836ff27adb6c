"""Group commit in the SQLite journal, on real SQLite files: a durable write returns only after an
fsync of the WAL that began after its commit; writes committed while one fsync runs share the next
one; ``durable=False`` writes wait for none and are covered by the next durable write; a failed
fsync fails every later write."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from konfuzio_watch.journal import JournalWriteError, NewClaim, Row, SqliteJournal, State

from .conftest import wait_until


class GatedSync:
    """Stands in for the fdatasync of the WAL: records which commits each sync covers (the commit
    count when it began) and, while ``gate`` is clear, holds the sync until the test opens it."""

    def __init__(self, journal: SqliteJournal):
        self.journal = journal
        self.real = journal._fdatasync_wal
        self.gate = threading.Event()
        self.gate.set()
        self.started: list[int] = []  # commits covered by each sync, in order
        self.in_sync = threading.Event()

    def __call__(self) -> None:
        self.started.append(self.journal._committed)
        self.in_sync.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.real()


def claim(journal: SqliteJournal, name: str) -> Row:
    return journal.add_claims([NewClaim(name.encode(), name.encode() + b"-c")], 1.0)[0]


@pytest.fixture
def journal(tmp_path: Path):
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    yield journal
    journal.close()


def test_writes_committed_during_a_sync_share_the_next_one(journal: SqliteJournal):
    rows = [claim(journal, f"f{i}.pdf") for i in range(4)]
    sync = GatedSync(journal)
    journal._fdatasync_wal = sync  # type: ignore[method-assign]
    sync.gate.clear()
    syncs_before = journal.syncs
    returned: dict[int, int] = {}  # row id -> the commit number its write had

    def write(row: Row) -> None:
        new = journal.update(row, 2.0, stage="x")
        returned[new.id] = journal._synced

    leader = threading.Thread(target=write, args=(rows[0],))
    leader.start()
    assert sync.in_sync.wait(10), "the first durable write never began its fsync"
    committed = journal._committed
    followers = [threading.Thread(target=write, args=(row,)) for row in rows[1:]]
    for t in followers:
        t.start()
    # The three commit (visible at once) while the leader's fsync runs, and wait for the next fsync.
    wait_until(lambda: journal._committed == committed + 3, 10, "three more commits")
    assert [r.stage for r in journal.get_many([r.id for r in rows])] == ["x"] * 4
    assert returned == {}, "a write returned before an fsync that began after its commit"
    sync.gate.set()
    for t in (leader, *followers):
        t.join(10)
        assert not t.is_alive()
    assert journal.syncs - syncs_before == 2, "the three followers should have shared one fsync"
    assert sync.started == [committed, committed + 3]
    assert all(synced >= committed for synced in returned.values())


def test_each_durable_write_is_covered_by_a_sync_that_began_after_its_commit(journal: SqliteJournal):
    sync = GatedSync(journal)
    journal._fdatasync_wal = sync  # type: ignore[method-assign]
    seen: list[tuple[int, int]] = []  # (its commit number, commits covered by the syncs so far)
    lock = threading.Lock()

    def work(i: int) -> None:
        for j in range(20):
            row = claim(journal, f"w{i}-{j}.pdf")
            with lock:
                seen.append((row.id, journal._synced))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(seen) == 80
    # Each claim was commit number row id + 1 (the schema's first commit is number 1): covered when it returned.
    assert all(synced >= row_id + 1 for row_id, synced in seen), [s for s in seen if s[1] < s[0] + 1]
    assert journal.syncs <= 81


def test_writes_that_need_not_be_durable_wait_for_no_fsync_and_the_next_durable_one_covers_them(journal: SqliteJournal):
    rows = [claim(journal, f"f{i}.pdf") for i in range(3)]
    before = journal.syncs
    now = 5.0
    journal.transition_many(rows, State.CLAIMED, now, durable=False, next_at=now)
    assert journal.syncs == before
    assert journal._synced < journal._committed, "not yet covered by an fsync"
    journal.probe(now)  # any durable write
    assert journal.syncs == before + 1
    assert journal._synced == journal._committed


def test_a_durable_write_that_changes_nothing_needs_no_fsync_when_all_is_durable(journal: SqliteJournal):
    claim(journal, "a.pdf")
    before = journal.syncs
    assert journal.make_due([State.UPLOADED], 1.0) == 0
    assert journal.syncs == before


def test_the_fsync_is_of_the_wal_file(journal: SqliteJournal, monkeypatch: pytest.MonkeyPatch):
    synced: list[str] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    claim(journal, "a.pdf")
    assert synced == [f"{journal.path}-wal"]


def test_a_failed_fsync_fails_that_write_and_every_later_one(journal: SqliteJournal):
    row = claim(journal, "a.pdf")

    def failing() -> None:
        raise OSError(errno.EIO, "Input/output error")

    journal._fdatasync_wal = failing  # type: ignore[method-assign]
    with pytest.raises(JournalWriteError, match="Input/output error"):
        journal.update(row, 2.0, stage="x")
    with pytest.raises(JournalWriteError, match="restart"):
        journal.update(journal.get(row.id), 3.0, stage="y", durable=False)
    with pytest.raises(JournalWriteError, match="restart"):
        journal.probe(4.0)


def test_counts_are_read_again_after_any_commit_of_this_or_another_connection(journal: SqliteJournal):
    row = claim(journal, "a.pdf")
    assert journal.counts()[State.CLAIMING] == 1 and journal.oldest_active_detected_at() == 1.0
    journal.transition(row, State.CLAIMED, 2.0, durable=False)
    assert (journal.counts()[State.CLAIMING], journal.counts()[State.CLAIMED]) == (0, 1)
    other = SqliteJournal(journal.path)  # e.g. `konfuzio-watch retry` while the daemon runs
    try:
        other.add_claims([NewClaim(b"b.pdf", b"b-c", detected_at=0.5)], 3.0)
    finally:
        other.close()
    assert journal.counts()[State.CLAIMING] == 1
    assert journal.oldest_active_detected_at() == 0.5


def test_a_done_move_that_arms_a_second_look_is_made_durable_and_one_that_does_not_is_not(journal: SqliteJournal):
    rows = []
    for name, called_back_at in (("plain.pdf", 2.0), ("reviewed.pdf", 5.0)):
        row = journal.start_upload(journal.transition(claim(journal, name), State.CLAIMED, 1.0), f"t-{name}", 1.0)
        row = journal.mark_uploaded(row, 10 + row.id, 1.5, poll_at=100.0)
        row = journal.update(row, 1.5, callback_at=called_back_at)
        rows.append(journal.transition(row, State.EXPORTING, 3.0))
    plain, reviewed = rows
    before = journal.syncs
    done = journal.transition(plain, State.DONE, 6.0, durable=False, refresh_if_called_back_since=4.0)
    assert done.refresh_at is None
    assert journal.syncs == before and journal._synced < journal._committed
    done = journal.transition(reviewed, State.DONE, 6.0, durable=False, refresh_if_called_back_since=4.0)
    assert done.refresh_at == 6.0
    assert journal.syncs == before + 1 and journal._synced == journal._committed


def test_a_one_statement_write_commits_on_its_own_and_refuses_a_second_statement(
    journal: SqliteJournal, tmp_path: Path
):
    import sqlite3

    row = claim(journal, "a.pdf")
    before = journal.syncs
    moved = journal.transition(row, State.CLAIMED, 2.0, durable=False, next_at=2.0)  # one UPDATE, autocommit
    assert not journal._db.in_transaction
    other = sqlite3.connect(journal.path)
    try:
        assert other.execute("SELECT state FROM files WHERE id = ?", (row.id,)).fetchone() == ("claimed",)
    finally:
        other.close()
    assert journal.syncs == before and journal._synced < journal._committed
    journal.update(moved, 3.0, next_at=4.0)  # durable: fsynced before it returns
    assert journal.syncs == before + 1 and journal._synced == journal._committed
    with pytest.raises(RuntimeError, match="second statement"), journal._one_statement(durable=False) as tx:
        tx.execute("UPDATE files SET next_at = 5.0 WHERE id = ?", (row.id,))
        tx.execute("UPDATE files SET next_at = 6.0 WHERE id = ?", (row.id,))
    assert journal.get(row.id).next_at == 5.0, "the first statement stands: the guard is for programming errors"
