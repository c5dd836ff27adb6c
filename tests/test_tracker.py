"""The candidate tracker (seen -> settled), driven by a fake clock on the test's thread, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from konfuzio_watch import readiness
from konfuzio_watch.samples import make_pdf
from konfuzio_watch.tracker import CandidateTracker

from .helpers import FakeClock

SETTLE, GRACE = 2.0, 30.0


def scan(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if not p.is_dir())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker() -> CandidateTracker:
    return CandidateTracker(SETTLE, GRACE, scan)


def test_a_stable_file_is_handed_out_after_settle_and_not_before(tmp_path, clock, tracker):
    path = tmp_path / "a.pdf"
    path.write_bytes(make_pdf(label="a"))
    tracker.seen(str(path), clock.now())

    assert tracker.step(clock.advance(SETTLE - 0.01)) == []
    assert tracker.next_due() == pytest.approx(clock.now() + 0.01)
    assert tracker.step(clock.advance(0.01)) == [str(path)]


def test_a_change_restarts_the_settle_clock(tmp_path, clock, tracker):
    path = tmp_path / "growing.png"
    path.write_bytes(b"\x89PNG" + b"x" * 10)
    tracker.seen(str(path), clock.now())
    clock.advance(1.5)
    with open(path, "ab") as f:
        f.write(b"more")
    tracker.seen(str(path), clock.now())  # the watcher's modified event

    assert tracker.step(clock.advance(1.0)) == [], "2.5 s after the first sight but only 1 s since the change"
    assert tracker.step(clock.advance(1.0)) == [str(path)]


def test_a_change_seen_only_at_claim_time_restarts_the_clock(tmp_path, clock, tracker):
    path = tmp_path / "silent.png"
    path.write_bytes(b"\x89PNG" + b"x" * 10)
    tracker.seen(str(path), clock.now())
    with open(path, "ab") as f:  # no event for this write (a network share)
        f.write(b"more")
        os.utime(f.fileno(), ns=(1, 1))

    assert tracker.step(clock.advance(SETTLE)) == []
    assert tracker.step(clock.advance(SETTLE)) == [str(path)]


def test_a_pdf_without_its_eof_marker_waits_for_the_scanner(tmp_path, clock, tracker):
    data = make_pdf(pages=2, label="paused scanner")
    cut = data.rindex(b"%%EOF")
    path = tmp_path / "paused.pdf"
    path.write_bytes(data[:cut])
    tracker.seen(str(path), clock.now())

    assert tracker.step(clock.advance(SETTLE)) == [], "a PDF without %%EOF is not taken after settle"
    assert tracker.candidates[str(path)].looks_complete is False
    assert tracker.step(clock.advance(10.0)) == []
    with open(path, "ab") as f:  # the scanner finishes the file
        f.write(data[cut:])
    tracker.seen(str(path), clock.now())
    assert tracker.step(clock.advance(SETTLE)) == [str(path)]


def test_an_incomplete_or_empty_file_is_handed_out_after_the_grace(tmp_path, clock, tracker):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 never finished")
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    for path in (broken, empty):
        tracker.seen(str(path), clock.now())

    assert tracker.step(clock.advance(GRACE - 1)) == []
    assert sorted(tracker.step(clock.advance(1))) == [str(broken), str(empty)]


def test_special_files_are_handed_out_at_once_unread(tmp_path, clock, tracker):
    fifo = tmp_path / "pipe.pdf"
    os.mkfifo(fifo)
    tracker.seen(str(fifo), clock.now())
    assert tracker.step(clock.now()) == [str(fifo)]


def test_a_folder_moved_in_brings_its_files(tmp_path, clock, tracker):
    folder = tmp_path / "batch"
    for i in range(3):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        (folder / "sub" / f"{i}.pdf").write_bytes(make_pdf(label=str(i)))
    tracker.seen(str(folder), clock.now())
    assert len(tracker) == 3
    assert len(tracker.step(clock.advance(SETTLE))) == 3


def test_files_whose_claim_was_not_recorded_are_kept_and_handed_out_again(tmp_path, clock, tracker):
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.pdf"
        path.write_bytes(make_pdf(label=str(i)))
        tracker.seen(str(path), clock.now())
        paths.append(str(path))
    ready = tracker.step(clock.advance(SETTLE))
    assert sorted(ready) == paths

    tracker.keep(ready, clock.now())  # the journal's disk was full
    assert tracker.step(clock.advance(0.1)) == ready, "kept candidates are due at once, not at the next rescan"
    tracker.claimed(ready)
    assert len(tracker) == 0 and tracker.step(clock.advance(100)) == []


def test_a_vanished_file_is_forgotten(tmp_path, clock, tracker):
    path = tmp_path / "gone.pdf"
    path.write_bytes(make_pdf(label="gone"))
    tracker.seen(str(path), clock.now())
    path.unlink()
    assert tracker.step(clock.advance(SETTLE)) == []
    assert len(tracker) == 0


def test_claims_come_in_batches(tmp_path, clock):
    tracker = CandidateTracker(SETTLE, GRACE, scan, batch=4)
    for i in range(10):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"\x89PNG" + bytes([i]))
        tracker.seen(str(path), clock.now())
    clock.advance(SETTLE)
    sizes = []
    while batch := tracker.step(clock.now()):
        sizes.append(len(batch))
        tracker.claimed(batch)
    assert sizes == [4, 4, 2]


@pytest.mark.parametrize(("head", "tail", "complete"), [
    (b"%PDF-1.7", b"...\n%%EOF\n", True),
    (b"%PDF-1.7", b"...\n%%EOF", True),
    (b"%PDF-1.7", b"...\nstartxref\n123\n", False),
    (b"\x89PNG\r\n", b"anything", True),  # only PDFs carry an end marker
    (b"", b"", True),
])
def test_content_looks_complete(head, tail, complete):
    assert readiness.content_looks_complete(head, tail) is complete
