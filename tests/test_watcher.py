"""The inbox watcher on real folders: a real watchdog observer, scans, and what is ignored."""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import time
from pathlib import Path

import pytest

from konfuzio_watch.samples import make_pdf
from konfuzio_watch.tracker import CandidateTracker
from konfuzio_watch.watcher import InboxFilter, InboxWatcher, ignored_files

from .conftest import wait_until
from .helpers import FakeClock

SETTLE, GRACE = 2.0, 30.0


def log_lines(caplog) -> list[str]:
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name.startswith("konfuzio_watch")]


@pytest.mark.slow
def test_a_file_made_readable_is_looked_at_again_on_its_chmod_event(tmp_path, caplog):
    """The daemon's readability, played by the file's mode (the tests run as root, who may read
    anything): "others" may not read it. Its owner's chmod is an attrib event, which the
    observer reports, so the file is taken in at once rather than at the next rescan."""
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    events: queue.SimpleQueue[str] = queue.SimpleQueue()
    watcher = InboxWatcher(InboxFilter(inbox, [], ()), lambda kind, path: events.put(path), probe_timeout_s=5)

    def can_read(path: str) -> OSError | None:
        readable = os.stat(path).st_mode & stat.S_IROTH
        return None if readable else OSError(errno.EACCES, os.strerror(errno.EACCES), path)

    clock = FakeClock()
    tracker = CandidateTracker(SETTLE, GRACE, watcher.scan, can_read=can_read, inbox=str(inbox))

    def drain() -> int:  # what the scheduling loop does with the observer's reports
        n = 0
        while True:
            try:
                tracker.seen(events.get_nowait(), clock.now())
            except queue.Empty:
                return n
            n += 1

    watcher.start()
    try:
        assert not watcher.polling
        path = inbox / "private.pdf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(make_pdf(label="private"))
        wait_until(lambda: drain() or str(path) in tracker.candidates, 10, "the new file reported")
        assert tracker.step(clock.advance(SETTLE + 1)) == []
        assert tracker.snapshot(clock.now())[0].state == "unreadable"

        path.chmod(0o644)
        wait_until(
            lambda: drain() and tracker.candidates[str(path)].unreadable is None,
            10,
            "the chmod reported and the file looked at again",
        )
        assert [r.path for r in tracker.step(clock.now())] == [str(path)]
    finally:
        watcher.stop()
    assert (
        log_lines(caplog).count(
            "WARNING private.pdf: cannot read it (Permission denied); it stays in the inbox until konfuzio-watch may "
            "read it"
        )
        == 1
    )
    assert "INFO private.pdf: konfuzio-watch may read it now; it is taken in as usual" in log_lines(caplog)


def test_a_folder_that_cannot_be_scanned_is_logged_once_not_at_every_rescan(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher = InboxWatcher(InboxFilter(inbox, [], ()), report=lambda kind, path: None)
    batch = inbox / "batch"
    batch.write_bytes(b"")  # a folder event, and by the time of the scan a file took the folder's place

    for _ in range(3):
        assert list(watcher.scan(str(batch))) == []
    assert [line for line in log_lines(caplog) if line.startswith("WARNING")] == [
        f"WARNING cannot scan {batch}: Not a directory"
    ]
    batch.unlink()
    batch.mkdir()
    (batch / "a.pdf").write_bytes(b"%PDF")
    assert list(watcher.scan(str(batch))) == [str(batch / "a.pdf")]
    assert log_lines(caplog)[-1] == f"INFO can scan {batch} again"
    assert len(log_lines(caplog)) == 2


def test_hidden_and_ignored_files_are_passed_over_without_a_word(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    inbox = tmp_path / "inbox"
    (inbox / ".git" / "objects").mkdir(parents=True)
    (inbox / ".git" / "objects" / "x.pdf").write_bytes(b"%PDF")
    (inbox / ".~lock.scan.pdf#").write_bytes(b"")
    (inbox / "scan.pdf.part").write_bytes(b"%PDF")
    (inbox / "scan.pdf").write_bytes(b"%PDF")
    watcher = InboxWatcher(InboxFilter(inbox, [], ()), report=lambda kind, path: None)
    assert list(watcher.scan()) == [str(inbox / "scan.pdf")]
    assert log_lines(caplog) == []


def test_ignored_files_lists_what_is_never_taken_in_and_why(tmp_path):
    inbox = tmp_path / "inbox"
    processing = inbox / ".konfuzio-watch" / "processing"
    processing.mkdir(parents=True)
    (processing / "17").write_bytes(b"%PDF")  # ours: not listed
    done = inbox / "done"
    done.mkdir()
    (done / "old.pdf").write_bytes(b"%PDF")
    for rel in (
        "scan.pdf",
        ".scan.pdf.swp",
        "2026/.Rechnung März.pdf",
        "2026/ok.pdf",
        "2026/x.bak",
        ".sync/a.pdf",
        ".sync/b.pdf",
        "Thumbs.db",
        "archive/2020/old.pdf",
        "sub/new\nline.pdf.tmp",
    ):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(b"%PDF")
    (inbox / "elsewhere").symlink_to(tmp_path, target_is_directory=True)  # a candidate (failed unread)

    found = ignored_files(inbox, [done, inbox / ".konfuzio-watch", processing], ("*.bak", "archive/*"))

    assert found == [
        (".scan.pdf.swp", "hidden (its name starts with '.')"),
        (".sync/", "hidden (its name starts with '.')"),
        ("2026/.Rechnung März.pdf", "hidden (its name starts with '.')"),
        ("2026/x.bak", "matches watch.ignore '*.bak'"),
        ("Thumbs.db", "a temporary or system file (built-in pattern 'Thumbs.db')"),
        ("archive/2020/", "matches watch.ignore 'archive/*'"),  # a folder: listed once, not its files
        ("sub/new\nline.pdf.tmp", "a temporary or system file (built-in pattern '*.tmp')"),
    ]
    assert not any(Path(rel).parts[0] in ("done", ".konfuzio-watch") for rel, _ in found)


@pytest.mark.slow
def test_a_file_written_right_after_a_claim_moved_another_out_is_reported_at_once(tmp_path):
    """A claim renames a file out of the inbox: inotify says IN_MOVED_FROM with no IN_MOVED_TO in the
    watched tree. watchdog holds such an event back to pair it with its IN_MOVED_TO, and every later
    event waits behind it (0.5 s by default): each file that arrived just after a claim started its
    settle time that much late. A rename inside the inbox is still reported under its new name."""
    inbox, processing = tmp_path / "inbox", tmp_path / "processing"
    inbox.mkdir()
    processing.mkdir()
    reported: queue.SimpleQueue[tuple[float, str]] = queue.SimpleQueue()
    watcher = InboxWatcher(
        InboxFilter(inbox, [], ()), lambda kind, path: reported.put((time.monotonic(), path)), probe_timeout_s=5
    )
    watcher.start()
    try:
        (inbox / "claimed.pdf").write_bytes(make_pdf(label="claimed"))
        wait_until(lambda: any(p.endswith("claimed.pdf") for _, p in drain(reported)), 10, "the first file reported")
        os.rename(inbox / "claimed.pdf", processing / "claimed.pdf")  # what a claim does
        written_at = time.monotonic()
        (inbox / "next.pdf").write_bytes(make_pdf(label="next"))
        seen = wait_until(lambda: [t for t, p in drain(reported) if p.endswith("next.pdf")], 10, "the next file")
        assert seen[0] - written_at < 0.4, f"reported {seen[0] - written_at:.2f} s after it was written"

        (inbox / "scan.tmp").write_bytes(make_pdf(label="renamed"))
        os.rename(inbox / "scan.tmp", inbox / "scan.pdf")  # a scanner's write-then-rename
        wait_until(lambda: any(p.endswith("scan.pdf") for _, p in drain(reported)), 10, "the renamed file")
    finally:
        watcher.stop()


def drain(reported: queue.SimpleQueue) -> list[tuple[float, str]]:
    out = []
    while True:
        try:
            out.append(reported.get_nowait())
        except queue.Empty:
            return out
