"""End to end: files dropped in the inbox -> real SDK -> emulator -> callback -> done/ with JSON."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest
import requests

from konfuzio_watch.emulator import FAIL_MARKER
from konfuzio_watch.journal import State
from konfuzio_watch.samples import make_pdf, make_png

from .conftest import drop, wait_until
from .helpers import assert_own_result, inbox_files


@pytest.mark.slow
def test_batch_of_mixed_documents_all_reach_done_with_their_own_text(start_daemon, emulator):
    running = start_daemon()
    files = {}
    for i in range(12):
        name = f"scan_{i:02d}.pdf" if i % 2 else f"photo_{i:02d}.png"
        data = make_pdf(pages=1 + i % 3, label=name) if i % 2 else make_png(label=name)
        files[name] = data
    for name, data in files.items():  # all at once
        drop(running.inbox / name, data)

    running.wait_finished(len(files))

    assert running.counts()[State.DONE] == len(files)
    results = [assert_own_result(running.done, name, data) for name, data in files.items()]
    assert len({r["document_id"] for r in results}) == len(files)
    assert sorted(u.data_file_name for u in emulator.uploads) == sorted(files), "exactly one upload per file"
    assert inbox_files(running) == []
    assert list(running.failed.rglob("*")) == []


@pytest.mark.slow
def test_file_written_slowly_in_chunks_is_uploaded_once_and_complete(start_daemon, emulator):
    running = start_daemon(watch={"settle_seconds": 0.5})
    data = make_pdf(pages=3, label="slow scanner")
    path = running.inbox / "slow.pdf"
    with open(path, "wb") as f:  # written over ~2 s, pausing less than the settle time
        for i in range(8):
            f.write(data[i * len(data) // 8 : (i + 1) * len(data) // 8])
            f.flush()
            time.sleep(0.25)

    running.wait_finished(1)

    assert len(emulator.uploads) == 1
    assert emulator.uploads[0].sha256 == hashlib.sha256(data).hexdigest()
    assert_own_result(running.done, "slow.pdf", data)


@pytest.mark.slow
def test_pdf_without_eof_marker_waits_until_the_scanner_finishes(start_daemon, emulator):
    running = start_daemon(watch={"settle_seconds": 0.2, "incomplete_grace_seconds": 30})
    data = make_pdf(pages=2, label="paused scanner")
    cut = data.rindex(b"%%EOF")
    path = running.inbox / "paused.pdf"
    path.write_bytes(data[:cut])  # the scanner pauses longer than settle_seconds mid-file
    tracker = running.daemon.scheduler.tracker
    wait_until(
        lambda: str(path) in tracker.candidates and not tracker.candidates[str(path)].looks_complete,
        10,
        "the settled file found incomplete (no %%EOF) and kept waiting",
    )
    assert emulator.uploads == []
    with open(path, "ab") as f:
        f.write(data[cut:])

    running.wait_finished(1)
    assert_own_result(running.done, "paused.pdf", data)


@pytest.mark.slow
def test_bad_files_fail_with_a_reason_and_good_ones_are_unaffected(start_daemon, emulator):
    running = start_daemon(watch={"settle_seconds": 0.2, "incomplete_grace_seconds": 0.5})
    good = make_pdf(label="good")
    drop(running.inbox / "good.pdf", good)
    drop(running.inbox / "notes.txt", b"just some text, not a document\n")
    drop(running.inbox / "empty.pdf", b"")
    drop(running.inbox / "server-fails.pdf", make_pdf(label="x") + FAIL_MARKER)

    running.wait_finished(4)

    assert_own_result(running.done, "good.pdf", good)
    reasons = {}
    for name in ("notes.txt", "empty.pdf", "server-fails.pdf"):
        assert (running.failed / name).exists(), f"{name} is not in failed/"
        report = json.loads((running.failed / (name + ".error.json")).read_text())
        assert {"error", "stage", "attempts", "failed_at", "source"} <= set(report)
        reasons[name] = report
    assert reasons["notes.txt"]["stage"] == "validate" and "support" in reasons["notes.txt"]["error"]
    assert reasons["empty.pdf"]["stage"] == "validate" and "empty" in reasons["empty.pdf"]["error"]
    assert reasons["server-fails.pdf"]["stage"] == "processing"
    assert isinstance(reasons["server-fails.pdf"]["document_id"], int)
    uploaded = {u.data_file_name for u in emulator.uploads}
    assert uploaded == {"good.pdf", "server-fails.pdf"}, "unsupported and empty files are never uploaded"
    health = requests.get(f"{running.daemon.monitor.url}/healthz", timeout=5)
    assert health.status_code == 200


@pytest.mark.slow
def test_callback_arriving_before_the_upload_response_still_matches(start_daemon, emulator):
    emulator.knobs.early_callback = True
    running = start_daemon(results={"callback_timeout": 60, "poll_interval": 60})
    files = {f"early_{i}.pdf": make_pdf(label=f"early {i}") for i in range(4)}
    for name, data in files.items():
        drop(running.inbox / name, data)

    running.wait_finished(4, timeout_s=20)  # long before the 60 s poll fallback

    for name, data in files.items():
        assert_own_result(running.done, name, data)
    assert len(emulator.uploads) == 4
    assert all(c.status_code in (200, 202) for c in emulator.callbacks)


@pytest.mark.slow
def test_nested_folders_and_awkward_names_keep_their_relative_paths(start_daemon, emulator):
    running = start_daemon()
    names = [
        "2026/Q1/invoice 2026-01.pdf",
        'scanner [3]/it\'s "quoted".pdf',
        "Überweisung März/Straße ñ 東京.png",
        "-leading dash.pdf",
        "a (1)/b {c}/d & e; f.pdf",
    ]
    files = {}
    for name in names:
        data = make_png(label=name) if name.endswith(".png") else make_pdf(label=name)
        files[name] = data
        drop(running.inbox / name, data)

    running.wait_finished(len(files))

    for name, data in files.items():
        assert_own_result(running.done, name, data)
    uploaded = sorted(u.data_file_name for u in emulator.uploads)
    # Only the base name travels, and under a safe name; the original path lives in the journal.
    assert uploaded == sorted(
        ["invoice 2026-01.pdf", "it's _quoted_.pdf", "Strasse n __.png", "leading dash.pdf", "d & e_ f.pdf"]
    )
    assert inbox_files(running) == []


@pytest.mark.slow
def test_never_overwrites_an_existing_file_in_done(start_daemon, emulator):
    running = start_daemon()
    running.done.mkdir(parents=True, exist_ok=True)
    (running.done / "report.pdf").write_bytes(b"an older report somebody left here")
    data = make_pdf(label="new report")
    drop(running.inbox / "report.pdf", data)

    running.wait_finished(1)

    assert (running.done / "report.pdf").read_bytes() == b"an older report somebody left here"
    assert_own_result(running.done, "report (2).pdf", data)


@pytest.mark.slow
def test_files_present_at_start_up_are_picked_up(tmp_path, emulator, start_daemon):
    inbox = tmp_path / "inbox"
    files = {f"old_{i}.pdf": make_pdf(label=f"old {i}") for i in range(5)}
    for name, data in files.items():
        drop(inbox / name, data)
    os.utime(inbox / "old_0.pdf", (0, 0))  # an ancient mtime proves nothing about completeness

    running = start_daemon()
    running.wait_finished(5)
    for name, data in files.items():
        assert_own_result(running.done, name, data)


@pytest.mark.slow
def test_hidden_temporary_and_nas_junk_files_are_ignored(start_daemon, emulator):
    running = start_daemon(watch={"ignore": ["*.bak", "drafts/*"]})
    junk = [
        ".hidden.pdf",
        "x.pdf.part",
        "y.tmp",
        "~$lock.docx",
        ".~lock.a.odt#",
        "z.crdownload",
        "@eaDir/thumb.png",
        ".DS_Store",
        "Thumbs.db",
        "._resource.pdf",
        "old.bak",
        "drafts/wip.pdf",
    ]
    for name in junk:
        drop(running.inbox / name, make_pdf(label=name))
    drop(running.inbox / "real.pdf", make_pdf(label="real"))

    running.wait_finished(1)
    threading.Event().wait(1.0)  # give the daemon ample time to (wrongly) take a junk file
    assert [u.data_file_name for u in emulator.uploads] == ["real.pdf"]
    for name in junk:
        assert (running.inbox / name).exists(), f"{name} was taken"


@pytest.mark.slow
def test_scanner_that_closes_and_reopens_the_file_between_pages(start_daemon, emulator):
    running = start_daemon(watch={"settle_seconds": 0.6})
    data = make_pdf(pages=3, label="reopening scanner")
    chunks = [data[i * len(data) // 5 : (i + 1) * len(data) // 5] for i in range(5)]
    path = running.inbox / "scanner.pdf"
    for chunk in chunks:  # one page at a time: open, append, close, pause (shorter than settle)
        with open(path, "ab") as f:
            f.write(chunk)
        time.sleep(0.4)  # the scanner's pace, not a wait for the daemon
        assert emulator.uploads == [], "taken while the scanner was still writing"

    running.wait_finished(1)
    assert len(emulator.uploads) == 1
    assert_own_result(running.done, "scanner.pdf", data)


def test_placing_locks_keep_one_path_at_a_time_and_let_other_paths_through():
    """Two files with the same path are placed one after the other (choosing a free name and taking
    it is one step); files with other paths do not wait for them."""
    from konfuzio_watch.placing import KeyedLocks

    locks = KeyedLocks()
    key = ("/done", "scan.pdf")
    held, release = threading.Event(), threading.Event()
    order: list[str] = []

    def holder() -> None:
        with locks.hold(key), locks.hold(key):  # re-entrant: failing a file while placing it
            order.append("first in")
            held.set()
            release.wait(10)
            order.append("first out")

    def same_path() -> None:
        with locks.hold(key):
            order.append("second in")

    first = threading.Thread(target=holder)
    first.start()
    assert held.wait(10)
    second = threading.Thread(target=same_path)
    second.start()
    other_done = threading.Event()

    def other_path() -> None:
        with locks.hold(("/done", "other.pdf")):
            other_done.set()

    threading.Thread(target=other_path).start()
    assert other_done.wait(10), "a file with another path waited for the first one"
    release.set()
    first.join(10)
    second.join(10)
    assert order == ["first in", "first out", "second in"]
    assert locks._locks == {}, "a lock nobody holds or waits for is dropped"
