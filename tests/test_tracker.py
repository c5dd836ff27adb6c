"""The candidate tracker (seen -> settled), driven by a fake clock on the test's thread, on real files."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

import pytest

import konfuzio_watch
from konfuzio_watch import readiness, writers
from konfuzio_watch.samples import make_pdf
from konfuzio_watch.tracker import CandidateTracker, ReadyFile

from .helpers import FakeClock

SETTLE, GRACE = 2.0, 30.0


def scan(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if not p.is_dir())


def find_writers_unhurried(files: Collection[writers.FileId]) -> writers.Look:
    """The look through /proc without its time budget: on a loaded machine a look cut short would hand
    out a file that a test holds open (the budget has its own test in test_writers.py)."""
    return writers.find_writers(files, budget_s=60.0)


def paths(ready: Iterable[ReadyFile]) -> list[str]:
    return [r.path for r in ready]


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
    assert paths(tracker.step(clock.advance(0.01))) == [str(path)]


def test_a_change_restarts_the_settle_clock(tmp_path, clock, tracker):
    path = tmp_path / "growing.png"
    path.write_bytes(b"\x89PNG" + b"x" * 10)
    tracker.seen(str(path), clock.now())
    clock.advance(1.5)
    with open(path, "ab") as f:
        f.write(b"more")
    tracker.seen(str(path), clock.now())  # the watcher's modified event

    assert tracker.step(clock.advance(1.0)) == [], "2.5 s after the first sight but only 1 s since the change"
    assert paths(tracker.step(clock.advance(1.0))) == [str(path)]


def test_a_change_seen_only_at_claim_time_restarts_the_clock(tmp_path, clock, tracker):
    path = tmp_path / "silent.png"
    path.write_bytes(b"\x89PNG" + b"x" * 10)
    tracker.seen(str(path), clock.now())
    with open(path, "ab") as f:  # no event for this write (a network share)
        f.write(b"more")
        os.utime(f.fileno(), ns=(1, 1))

    assert tracker.step(clock.advance(SETTLE)) == []
    assert paths(tracker.step(clock.advance(SETTLE))) == [str(path)]


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
    assert paths(tracker.step(clock.advance(SETTLE))) == [str(path)]


def test_an_incomplete_or_empty_file_is_handed_out_after_the_grace(tmp_path, clock, tracker):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 never finished")
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    for path in (broken, empty):
        tracker.seen(str(path), clock.now())

    assert tracker.step(clock.advance(GRACE - 1)) == []
    ready = {r.path: r for r in tracker.step(clock.advance(1))}
    assert sorted(ready) == [str(broken), str(empty)]
    assert not ready[str(broken)].complete and not ready[str(empty)].complete, "the pipeline fails them"
    assert ready[str(broken)].reason == "no %%EOF at its end: an incomplete PDF after 30 s without a change"
    assert ready[str(empty)].reason == "empty (0 bytes) after 30 s without a change"


def test_special_files_are_handed_out_at_once_unread(tmp_path, clock, tracker):
    fifo = tmp_path / "pipe.pdf"
    os.mkfifo(fifo)
    tracker.seen(str(fifo), clock.now())
    assert tracker.step(clock.now()) == [ReadyFile(str(fifo), clock.now())], (
        "handed out complete: it is never read, validation reports it"
    )


def test_a_folder_moved_in_brings_its_files(tmp_path, clock, tracker):
    folder = tmp_path / "batch"
    for i in range(3):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        (folder / "sub" / f"{i}.pdf").write_bytes(make_pdf(label=str(i)))
    tracker.seen(str(folder), clock.now())
    assert len(tracker) == 3
    assert len(tracker.step(clock.advance(SETTLE))) == 3


def test_files_whose_claim_was_not_recorded_are_kept_and_handed_out_again(tmp_path, clock, tracker):
    names = []
    for i in range(3):
        path = tmp_path / f"{i}.pdf"
        path.write_bytes(make_pdf(label=str(i)))
        tracker.seen(str(path), clock.now())
        names.append(str(path))
    ready = tracker.step(clock.advance(SETTLE))
    assert sorted(r.path for r in ready) == names

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


def test_detected_at_is_the_first_sighting_not_the_last_change(tmp_path, clock, tracker):
    path = tmp_path / "slow.png"
    path.write_bytes(b"\x89PNG" + b"x" * 10)
    first = clock.now()
    tracker.seen(str(path), first)
    for _ in range(3):  # written in chunks: each one restarts the settle clock
        clock.advance(1.5)
        with open(path, "ab") as f:
            f.write(b"more")
        tracker.seen(str(path), clock.now())

    [ready] = tracker.step(clock.advance(SETTLE))
    assert ready == ReadyFile(str(path), detected_at=first, complete=True, reason=None)


def second_revision(pdf: bytes, padding: int = 0) -> bytes:
    """An incremental update, as an editor saves it: new objects, a new xref section, a second %%EOF."""
    prev = int(pdf[pdf.rindex(b"startxref") :].split()[1])
    update = bytearray(b"\n" * 1)
    obj_at = len(pdf) + len(update)
    update += b"4 0 obj\n<< /Title (signed) /Padding (" + b"x" * padding + b") >>\nendobj\n"
    xref_at = len(pdf) + len(update)
    update += b"xref\n4 1\n%010d 00000 n \n" % obj_at
    update += b"trailer\n<< /Size 7 /Root 1 0 R /Info 4 0 R /Prev %d >>\nstartxref\n%d\n%%%%EOF\n" % (prev, xref_at)
    return pdf + bytes(update)


@pytest.mark.parametrize(
    ("what", "data"),
    [
        ("2 KiB of padding after %%EOF", make_pdf(label="p") + b"\0" * 2048),
        ("60 KiB of padding after %%EOF", make_pdf(label="p") + b"\r\n" * 30_000),
        ("an incremental update: a second %%EOF", second_revision(make_pdf(label="rev"))),
        ("an incremental update bigger than the tail", second_revision(make_pdf(label="rev"), padding=200_000)),
    ],
)
def test_valid_pdfs_are_complete(tmp_path, clock, tracker, what, data):
    path = tmp_path / "valid.pdf"
    path.write_bytes(data)
    tracker.seen(str(path), clock.now())
    assert paths(tracker.step(clock.advance(SETTLE))) == [str(path)], f"{what}: taken after settle, not the grace"
    assert readiness.pdf_looks_complete(str(path), len(data))


@pytest.mark.parametrize(
    ("what", "data"),
    [
        ("cut before its %%EOF", make_pdf(label="c")[: make_pdf(label="c").rindex(b"%%EOF")]),
        ("an incremental update cut before its %%EOF", second_revision(make_pdf(label="r"))[:-8]),
        ("an incremental update cut in its objects", second_revision(make_pdf(label="r"), padding=300)[:-200]),
    ],
)
def test_half_written_pdfs_wait_and_are_handed_out_incomplete_after_the_grace(tmp_path, clock, tracker, what, data):
    path = tmp_path / "half.pdf"
    path.write_bytes(data)
    tracker.seen(str(path), clock.now())
    assert tracker.step(clock.advance(SETTLE)) == [], f"{what}: not taken after settle"
    assert not readiness.pdf_looks_complete(str(path), len(data))
    [ready] = tracker.step(clock.advance(GRACE - SETTLE))
    assert (ready.path, ready.complete) == (str(path), False)
    assert "%%EOF" in (ready.reason or "")


def test_pdf_looks_complete_reads_a_descriptor_too(tmp_path):
    path = tmp_path / "a.pdf"
    data = make_pdf(label="fd") + b" " * 5000
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert readiness.pdf_looks_complete(f.fileno(), len(data))
        assert not readiness.pdf_looks_complete(f.fileno(), len(data) - 5010), "as if cut before its %%EOF"
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n" + b"x" * 100_000)
    assert readiness.pdf_looks_complete(str(png), 100_006), "only PDFs carry an end marker"


# -- files the daemon may not read ----------------------------------------------------------------

DENIED = OSError(errno.EACCES, os.strerror(errno.EACCES))


class Permissions:
    """The readability check, injected: which paths the daemon may not read (as root, it may read anything)."""

    def __init__(self) -> None:
        self.denied: set[str] = set()
        self.probes = 0

    def can_read(self, path: str) -> OSError | None:
        self.probes += 1
        return DENIED if path in self.denied else None


def messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "konfuzio_watch"]


def test_an_unreadable_file_stays_in_the_inbox_logged_once_until_it_may_be_read(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    perms = Permissions()
    tracker = CandidateTracker(SETTLE, GRACE, scan, can_read=perms.can_read, inbox=str(tmp_path))
    path = tmp_path / "private\nscan.pdf"
    path.write_bytes(make_pdf(label="private"))
    perms.denied.add(str(path))

    for _ in range(5):  # events and rescans
        tracker.seen(str(path), clock.now())
        assert tracker.step(clock.advance(GRACE)) == []
    assert messages(caplog, logging.WARNING) == [
        "private\\nscan.pdf: cannot read it (Permission denied); it stays in the inbox until konfuzio-watch may read it"
    ], "logged once, with the name escaped, not at every look"
    [seen] = tracker.snapshot(clock.now())
    assert (seen.state, seen.reason, seen.due_in_s) == ("unreadable", "cannot read it: Permission denied", None)
    assert tracker.next_due() is None, "nothing to wake up for until it changes"

    perms.denied.clear()  # its owner ran chmod: an attrib event, or the next rescan
    tracker.seen(str(path), clock.now())
    assert messages(caplog, logging.INFO) == [
        "private\\nscan.pdf: konfuzio-watch may read it now; it is taken in as usual"
    ]
    assert paths(tracker.step(clock.now())) == [str(path)], "stable all along: handed out at once"
    assert len(messages(caplog, logging.WARNING)) == 1


def test_a_file_that_becomes_unreadable_before_it_settles_is_not_handed_out(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    perms = Permissions()
    tracker = CandidateTracker(SETTLE, GRACE, scan, can_read=perms.can_read)
    path = tmp_path / "a.png"
    path.write_bytes(b"\x89PNG" + b"x" * 10)
    tracker.seen(str(path), clock.now())
    perms.denied.add(str(path))  # chmod 600 by another owner: no change to size or mtime

    assert tracker.step(clock.advance(SETTLE)) == [], "checked again when handed out"
    assert len(messages(caplog, logging.WARNING)) == 1
    assert tracker.snapshot(clock.now())[0].state == "unreadable"


def test_a_readable_file_is_not_probed_at_every_look(tmp_path, clock):
    perms = Permissions()
    tracker = CandidateTracker(SETTLE, GRACE, scan, can_read=perms.can_read)
    path = tmp_path / "a.png"
    path.write_bytes(b"\x89PNG" + b"x" * 10)
    for _ in range(10):
        tracker.seen(str(path), clock.advance(0.1))
    assert perms.probes == 1, "probed when first seen; once more when handed out"
    assert len(tracker.step(clock.advance(SETTLE))) == 1 and perms.probes == 2


CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import logging
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from konfuzio_watch.tracker import CandidateTracker
inbox, path = sys.argv[2], sys.argv[3]
tracker = CandidateTracker(2.0, 30.0, lambda folder: [], inbox=inbox)
now = 1000.0
for line in sys.stdin:
    now += float(line)
    tracker.seen(path, now)  # an event or a rescan
    ready = [r.path for r in tracker.step(now)]
    print(json.dumps({"uid": os.geteuid(), "ready": ready, "states": [c.to_dict() for c in tracker.snapshot(now)]}),
          flush=True)
"""


@pytest.mark.slow
def test_a_file_the_daemon_may_not_read_for_real_stays_where_it_is():
    """As root (CI): the tracker runs as nobody on a root-owned 0600 file; otherwise on a 0000 file of ours."""
    as_root = os.geteuid() == 0
    if as_root and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run the tracker as nobody")
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="konfuzio-watch-test-"))  # nobody cannot enter pytest's tmp
    try:
        root.chmod(0o755)
        package = Path(konfuzio_watch.__file__).parent
        shutil.copytree(
            package, root / "lib" / "konfuzio_watch", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
        inbox = root / "inbox"
        inbox.mkdir(mode=0o755)
        path = inbox / "scan.pdf"
        path.write_bytes(make_pdf(label="private"))
        path.chmod(0o600 if as_root else 0o000)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_root else []
        with subprocess.Popen(
            [*prefix, sys.executable, "-I", "-B", "-c", CHILD, str(root / "lib"), str(inbox), str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdin and proc.stdout and proc.stderr
            try:

                def look(advance_s: float) -> dict:
                    proc.stdin.write(f"{advance_s}\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                    assert line, f"the tracker process died: {proc.stderr.read()}"
                    return json.loads(line)

                first = look(0)
                assert first["uid"] != 0
                assert first["ready"] == []
                assert [(c["path"], c["state"], c["reason"]) for c in first["states"]] == [
                    ("scan.pdf", "unreadable", "cannot read it: Permission denied")
                ]
                assert look(SETTLE + 3)["ready"] == [], "settled, still unreadable: not handed out"
                assert look(1)["ready"] == []
                path.chmod(0o644)
                assert look(0)["ready"] == [str(path)], "readable now: handed out at the next look"
                assert path.exists(), "the tracker never moves anything"
                proc.stdin.close()
                log = proc.stderr.read().splitlines()
                assert proc.wait(30) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert [line for line in log if "scan.pdf" in line] == [
            "WARNING scan.pdf: cannot read it (Permission denied); it stays in the inbox until konfuzio-watch may read "
            "it",
            "INFO scan.pdf: konfuzio-watch may read it now; it is taken in as usual",
        ]
    finally:
        shutil.rmtree(root)


# -- the status of candidates ---------------------------------------------------------------------


def test_the_snapshot_says_where_each_candidate_stands(tmp_path, clock):
    perms = Permissions()
    tracker = CandidateTracker(SETTLE, GRACE, scan, can_read=perms.can_read, inbox=str(tmp_path))
    start = clock.now()
    half = tmp_path / "half.pdf"
    half.write_bytes(b"%PDF-1.4 and no end")
    tracker.seen(str(half), clock.now())
    assert tracker.step(clock.advance(SETTLE)) == []  # found without %%EOF
    private = tmp_path / "private.png"
    private.write_bytes(b"\x89PNG")
    perms.denied.add(str(private))
    tracker.seen(str(private), clock.now())
    ready = tmp_path / "ready.png"
    ready.write_bytes(b"\x89PNG ready")
    tracker.seen(str(ready), clock.now())
    assert len(tracker.step(clock.advance(SETTLE))) == 1  # handed out; its claim not yet confirmed
    fresh = tmp_path / "sub" / "new\x1b.png"
    fresh.parent.mkdir()
    fresh.write_bytes(b"\x89PNG new")
    tracker.seen(str(fresh), clock.now())
    clock.advance(1.25)

    snap = {c.name: c for c in tracker.snapshot(clock.now())}
    assert {name: c.text for name, c in snap.items()} == {
        "half.pdf": "incomplete (no %%EOF at its end: an incomplete PDF; fails in 25 s)",
        "private.png": "unreadable (cannot read it: Permission denied)",
        "ready.png": "settled (waiting to be claimed)",
        "sub/new\\x1b.png": "settling (stable for 1.2 of 2 s)",
    }
    assert snap["half.pdf"].due_in_s == pytest.approx(GRACE - 2 * SETTLE - 1.25)
    assert snap["half.pdf"].detected_at == start
    assert [c.name for c in tracker.snapshot(clock.now())][0] == "half.pdf", "oldest first"
    as_json = json.loads(json.dumps([c.to_dict() for c in tracker.snapshot(clock.now())]))
    assert as_json[-1] == {
        "path": "sub/new\\x1b.png",
        "state": "settling",
        "size": 8,
        "detected_at": clock.now() - 1.25,
        "changed_at": clock.now() - 1.25,
        "stable_s": 1.25,
        "settle_s": SETTLE,
        "due_in_s": 0.75,
        "reason": None,
        "text": "settling (stable for 1.2 of 2 s)",
    }
    tracker.claimed([str(ready)])
    assert "ready.png" not in {c.name for c in tracker.snapshot(clock.now())}


@pytest.mark.parametrize(
    ("head", "tail", "complete"),
    [
        (b"%PDF-1.7", b"...\n%%EOF\n", True),
        (b"%PDF-1.7", b"...\n%%EOF", True),
        (b"%PDF-1.7", b"...\nstartxref\n123\n", False),
        (b"%PDF-1.7", b"...\n%%EOF\n" + b"\0" * 4096, True),  # padding after the marker
        (b"%PDF-1.7", b"%%EOF\n5 0 obj\n<< /Linearized 1 >>", False),  # a linearized file's early %%EOF
        (b"\x89PNG\r\n", b"anything", True),  # only PDFs carry an end marker
        (b"", b"", True),
    ],
)
def test_content_looks_complete(head, tail, complete):
    assert readiness.content_looks_complete(head, tail) is complete


# -- a file someone still holds open for writing (a real descriptor of this process; /proc) ----------


def test_readiness_waits_for_a_held_file_at_a_growing_interval_and_looks_again_after_a_change(clock):
    obs = readiness.observe(None, 100, 1, clock.now())
    assert readiness.ready_at(obs, SETTLE, GRACE) == clock.now() + SETTLE
    found_at = clock.advance(SETTLE)
    held = readiness.held_by(obs, "scanner, pid 7", found_at)
    assert held.held == readiness.Held("scanner, pid 7", found_at, found_at)
    assert readiness.ready_at(held, SETTLE, GRACE) == found_at + SETTLE, "looked at again after settle_s"
    later = readiness.held_by(held, "scanner, pid 7", clock.advance(40))
    assert later.held.since == found_at and later.held.checked == clock.now()
    assert readiness.ready_at(later, SETTLE, GRACE) == clock.now() + 20, "half as long as it has been held"
    much_later = readiness.held_by(later, "scanner, pid 7", clock.advance(3600))
    assert readiness.ready_at(much_later, SETTLE, GRACE) == clock.now() + readiness.MAX_RECHECK_S
    assert readiness.is_held_past(much_later, clock.now(), GRACE)
    assert not readiness.is_held_past(held, found_at + GRACE - 1, GRACE)

    grown = readiness.observe(much_later, 200, 2, clock.advance(1))
    assert grown.held is not None and grown.held.checked is None and grown.held.since == found_at
    assert readiness.ready_at(grown, SETTLE, GRACE) == clock.now() + SETTLE, "changed: looked at once settled"
    assert readiness.held_by(grown, None, clock.now()).held is None, "closed: nobody holds it"


def test_a_settled_file_held_open_for_writing_waits_until_it_is_closed(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    tracker = CandidateTracker(SETTLE, GRACE, scan, inbox=str(tmp_path), find_writers=find_writers_unhurried)
    path = tmp_path / "scan.png"
    with open(path, "wb") as writer:  # half of it, and a pause longer than settle_s
        writer.write(b"\x89PNG half")
        writer.flush()
        tracker.seen(str(path), clock.now())

        assert tracker.step(clock.advance(SETTLE)) == [], "settled, but open for writing"
        [held] = tracker.snapshot(clock.now())
        assert (held.state, held.due_in_s) == ("open for writing", None)
        assert held.text.startswith("open for writing (for 0 s, by ")
        assert held.text.endswith(f", pid {os.getpid()}; taken in once it is closed)")
        assert tracker.step(clock.advance(SETTLE / 2)) == [] and tracker.next_due() == clock.now() + SETTLE / 2
        assert tracker.step(clock.advance(SETTLE / 2)) == [], "looked at again: still open"
        writer.write(b" and the rest")
    tracker.seen(str(path), clock.now())  # the modify and close-write events

    assert tracker.step(clock.advance(SETTLE - 0.01)) == [], "changed: it settles first"
    assert paths(tracker.step(clock.advance(0.01))) == [str(path)]
    said = messages(caplog, logging.INFO)
    writer_name = held.reason.split(" by ")[1].split(";")[0] if held.reason else ""
    assert said == [f"scan.png: open for writing by {writer_name}; taken in once it is closed"], "said once"


def test_a_writer_that_closes_without_a_change_lets_the_file_go_at_once(tmp_path, clock):
    tracker = CandidateTracker(SETTLE, GRACE, scan, find_writers=find_writers_unhurried)
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf(label="written, then held open"))
    writer = open(path, "ab")  # noqa: SIM115 - opened for writing, nothing more written
    try:
        tracker.seen(str(path), clock.now())
        assert tracker.step(clock.advance(SETTLE)) == []
        assert tracker.step(clock.advance(0.5)) == [], "not due before its next look"
    finally:
        writer.close()
    tracker.seen(str(path), clock.now())  # the close-write event
    assert paths(tracker.step(clock.now())) == [str(path)], "looked at again at once"


def test_a_file_held_open_forever_stays_pending_and_is_said_loudly_once_after_the_grace(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    tracker = CandidateTracker(SETTLE, GRACE, scan, inbox=str(tmp_path), find_writers=find_writers_unhurried)
    path = tmp_path / "stuck.pdf"
    path.write_bytes(make_pdf(label="held by a stuck process"))
    looks, start = 0, clock.now()
    with open(path, "r+b"):
        tracker.seen(str(path), clock.now())
        for _ in range(1000):  # an hour, a look whenever it is due
            due = tracker.next_due()
            assert due is not None, "held files are looked at again"
            clock.advance_to(due)
            assert tracker.step(clock.now()) == []
            looks += 1
            if clock.now() - start > 3600:
                break
        [held] = tracker.snapshot(clock.now())
    assert held.state == "open for writing" and held.reason and held.reason.endswith("taken in once it is closed")
    assert looks < 3600 / readiness.MAX_RECHECK_S + 20, "the looks thin out"
    warned = messages(caplog, logging.WARNING)
    assert len(warned) == 1 and warned[0].startswith("stuck.pdf: still open for writing by ")
    assert warned[0].endswith(f"after {GRACE:.0f} s; it stays in the inbox until it is closed")
