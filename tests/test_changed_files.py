"""A file that changes after it was taken in never ends in done/ next to a result of other bytes.

Each test runs the real daemon against the emulator and counts stale results: files in done/ whose
bytes are not the ones their result JSON says were uploaded (its ``source.sha256`` and ``size``, and
the OCR text, which the emulator derives from the bytes it received).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from konfuzio_watch import changes, placing
from konfuzio_watch.emulator import Emulator
from konfuzio_watch.emulator.faults import FaultRule
from konfuzio_watch.gates import Gates
from konfuzio_watch.journal import Journal, Row, State
from konfuzio_watch.konfuzio import KonfuzioClient
from konfuzio_watch.metrics import Metrics
from konfuzio_watch.runner import Pipeline, limits_from
from konfuzio_watch.samples import make_pdf, make_png
from konfuzio_watch.steps import documents
from konfuzio_watch.steps.context import Context

from .conftest import TOKEN, make_config, wait_until
from .helpers import FakeClock, inbox_files


def stale_results(done: Path) -> list[str]:
    """The files in done/ that are not what their result JSON describes."""
    stale = []
    for result_path in sorted(done.rglob("*.json")):
        original = result_path.with_name(result_path.name.removesuffix(".json"))
        result = json.loads(result_path.read_text())
        data = original.read_bytes() if original.exists() else b""
        sha = hashlib.sha256(data).hexdigest()
        if (sha, len(data)) != (result["source"]["sha256"], result["source"]["size"]) or sha not in result["text"]:
            stale.append(original.name)
    return stale


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite the file's bytes through this name (a hard link), then put its mtime back."""
    before = os.stat(path)
    assert before.st_size == len(data), "the same size"
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def link_into(inbox: Path, elsewhere: Path, name: str, data: bytes) -> Path:
    """A finished file that appears in the inbox by a hard link; the writer keeps its own name."""
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / name).write_bytes(data)
    os.link(elsewhere / name, inbox / name)
    return elsewhere / name


def documents_left(emulator) -> int:  # type: ignore[no-untyped-def]
    deleted = {d.doc_id for d in emulator.deletions}
    return sum(1 for u in emulator.uploads if u.doc_id not in deleted)


# -- part 4: rewritten in place, same size, mtime put back -------------------------------------------


@pytest.mark.slow
def test_files_rewritten_through_a_hard_link_after_the_upload_are_uploaded_again(start_daemon, emulator, tmp_path):
    emulator.knobs.processing_s = 1.5  # the results come after the rewrite
    running = start_daemon()
    names = [f"scan_{i}.pdf" for i in range(5)]
    old = {name: make_pdf(label=f"old {name}") for name in names}
    new = {name: make_pdf(label=f"new {name}") for name in names}
    links = {name: link_into(running.inbox, tmp_path / "elsewhere", name, old[name]) for name in names}
    wait_until(lambda: len(emulator.uploads) == 5, 20, "all five uploaded")

    for name in names:
        rewrite_in_place(links[name], new[name])
    assert not list(running.done.rglob("*.json")), "rewritten before any result was exported"

    running.wait_finished(5, timeout_s=30)
    assert stale_results(running.done) == []
    for name in names:
        assert (running.done / name).read_bytes() == new[name]
    assert sorted(p.name for p in running.done.iterdir()) == sorted([*names, *(n + ".json" for n in names)])
    assert running.counts()[State.DONE] == 5 and inbox_files(running) == []
    kept = {u.sha256 for u in emulator.uploads if u.doc_id not in {d.doc_id for d in emulator.deletions}}
    assert kept == {hashlib.sha256(new[n]).hexdigest() for n in names}, "one document per file: of its new bytes"
    assert len(emulator.uploads) == 10 and documents_left(emulator) == 5


@pytest.mark.slow
def test_a_file_rewritten_while_it_is_uploaded_is_uploaded_again(start_daemon, emulator, tmp_path):
    emulator.knobs.upload_latency_s = 1.0  # the POST is in flight while the file is rewritten
    running = start_daemon()
    old, new = make_pdf(label="old while uploading"), make_pdf(label="new while uploading")
    link = link_into(running.inbox, tmp_path / "elsewhere", "scan.pdf", old)
    journal = running.daemon.journal
    assert journal is not None
    wait_until(lambda: journal.rows([State.UPLOADING]), 20, "the upload started")
    rewrite_in_place(link, new)
    emulator.knobs.upload_latency_s = 0.0

    running.wait_finished(1, timeout_s=30)
    assert stale_results(running.done) == []
    assert (running.done / "scan.pdf").read_bytes() == new
    assert running.counts()[State.DONE] == 1 and documents_left(emulator) == 1


@pytest.mark.slow
def test_a_rewritten_file_whose_second_upload_is_ambiguous_gets_the_new_documents_result(
    start_daemon, emulator, tmp_path
):
    emulator.knobs.processing_s = 1.0
    running = start_daemon(upload={"reconcile_window_seconds": 3})
    old, new = make_pdf(label="old, then an ambiguous upload"), make_pdf(label="new, then an ambiguous upload")
    link = link_into(running.inbox, tmp_path / "elsewhere", "scan.pdf", old)
    wait_until(lambda: len(emulator.uploads) == 1, 20, "the old bytes uploaded")
    # the second upload: the gateway answers 504 at once, the server stores it a moment later
    emulator.knobs.fault_rules = [FaultRule.gateway(504, store_after_s=0.5, count=1)]
    rewrite_in_place(link, new)

    running.wait_finished(1, timeout_s=30)
    assert emulator.knobs.fault_rules[0].hits == 1, "the second upload was ambiguous"
    assert stale_results(running.done) == [], "the result of the old document, reconciled by its old token"
    assert (running.done / "scan.pdf").read_bytes() == new
    first, second = emulator.uploads
    assert [first.sha256, second.sha256] == [hashlib.sha256(d).hexdigest() for d in (old, new)]
    assert [d.doc_id for d in emulator.deletions] == [first.doc_id], "the old bytes' document goes, the new one stays"
    assert json.loads((running.done / "scan.pdf.json").read_text())["document_id"] == second.doc_id


@pytest.mark.slow
def test_a_file_copied_into_a_done_folder_on_another_file_system_is_checked_by_content(
    start_daemon, emulator, tmp_path
):
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the tests' folders")
    done = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="konfuzio-watch-test-"))
    try:
        running = start_daemon(folders={"done": str(done)})
        files = {f"copied_{i}.pdf": make_pdf(label=f"copied {i}") for i in range(3)}
        for name, data in files.items():
            link_into(running.inbox, tmp_path / "elsewhere", name, data)
        running.wait_finished(3, timeout_s=30)
        assert stale_results(done) == [] and running.counts()[State.DONE] == 3
        assert len(emulator.uploads) == 3, "a copy's new inode and mtime are no change"
    finally:
        shutil.rmtree(done)


# -- part 5: a writer that pauses past settle_seconds with its file open -----------------------------

WRITER = """
import sys
path, source = sys.argv[1], sys.argv[2]
data = open(source, "rb").read()
with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
    f.flush()
    print("half", flush=True)
    sys.stdin.readline()  # the pause: until the test says go on
    f.write(data[len(data) // 2 :])
"""


@pytest.mark.slow
def test_a_writer_that_pauses_with_its_file_open_is_waited_for(start_daemon, emulator, tmp_path):
    settle = 0.3
    running = start_daemon(watch={"settle_seconds": settle})
    data = make_png(320, 240, label="written in two parts")
    source = tmp_path / "source.png"
    source.write_bytes(data)
    path = running.inbox / "scan.png"
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(source)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as writer:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline() == b"half\n"
        half_written = time.monotonic()
        tracker = running.daemon.scheduler.tracker

        def waited_for_or_taken() -> bool:
            held = any(c.state == "open for writing" for c in tracker.snapshot(time.time()))
            return held or (running.done / "scan.png.json").exists()

        try:
            wait_until(waited_for_or_taken, 20, "the file held back as open for writing, or taken and finished")
            time.sleep(max(0.0, half_written + 2 * settle - time.monotonic()))  # the writer's pause, not a wait
        finally:
            writer.stdin.write(b"go on\n")
            writer.stdin.close()
        assert writer.wait(10) == 0

    running.wait_finished(1, timeout_s=30)
    assert stale_results(running.done) == []
    assert (running.done / "scan.png").read_bytes() == data
    assert running.counts()[State.DONE] == 1
    assert [u.sha256 for u in emulator.uploads] == [hashlib.sha256(data).hexdigest()], "uploaded once, whole"


# -- the comparisons (changes.py), on real files ------------------------------------------------------


def uploaded_as(path: Path, **fields: object) -> Row:
    """A row that uploaded the file at ``path`` as it is now."""
    st = os.lstat(path)
    base: dict[str, object] = dict(
        id=1,
        rel_path=b"a.pdf",
        state=State.UPLOADED,
        size=st.st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        upload_name="a.pdf",
        token_hash="t",
        document_id=7,
        attempts=1,
        next_at=None,
        callback_at=None,
        uploaded_at=1.0,
        final_path=None,
        error=None,
        stage=None,
        project_id=1,
        detected_at=1.0,
        updated_at=1.0,
        finished_at=None,
        file_dev=st.st_dev,
        file_ino=st.st_ino,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
    )
    base.update(fields)
    return Row(**base)  # type: ignore[arg-type]


def after_a_ctime_tick(row: Row, folder: Path) -> None:
    """Until the file system's clock (coarse: a few ms) is past the row's ctime: a change from now on
    gets a later one."""
    scratch = folder / ".tick"
    scratch.touch()
    wait_until(
        lambda: os.chmod(scratch, 0o644) or os.lstat(scratch).st_ctime_ns > (row.ctime_ns or 0),
        2,
        "the file system's clock to tick",
    )


def file_with(tmp_path: Path, data: bytes, name: str = "a.pdf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))  # older than any ctime now
    return path


@pytest.mark.parametrize(
    ("touch", "stat_says", "ctime_moved", "content_differs"),
    [
        ("nothing", None, False, False),
        ("append", "it grew from 10 to 14 bytes", True, True),
        ("truncate", "it shrank from 10 to 4 bytes", True, True),
        ("touch", "it was modified", True, False),
        ("chmod", None, True, False),
        ("a hard link", None, True, False),  # the daemon's own link into done/, a crash before the unlink
        ("rewrite, mtime put back", None, True, True),
        ("rewrite the same bytes, mtime put back", None, True, False),
    ],
)
def test_a_change_is_named_by_stat_and_a_moved_ctime_is_settled_by_the_content(
    tmp_path, touch, stat_says, ctime_moved, content_differs
):
    path = file_with(tmp_path, b"0123456789")
    row = uploaded_as(path)
    after_a_ctime_tick(row, tmp_path)
    if touch == "append":
        with open(path, "ab") as f:
            f.write(b"more")
    elif touch == "truncate":
        os.truncate(path, 4)
    elif touch == "touch":
        os.utime(path)
    elif touch == "chmod":
        os.chmod(path, 0o600)
    elif touch == "a hard link":
        os.link(path, tmp_path / "done.pdf")
    elif touch.startswith("rewrite"):
        rewrite_in_place(path, b"0123456789" if "same bytes" in touch else b"9876543210")
    st = os.lstat(path)

    assert changes.change_since_upload(row, st, same_inode=True) == stat_says
    assert changes.ctime_moved(row, st) is ctime_moved
    assert changes.content_differs(path, row.sha256) is content_differs


def test_another_file_under_the_name_is_named_and_a_row_without_ctime_never_compares_it(tmp_path):
    path = file_with(tmp_path, b"0123456789")
    row = uploaded_as(path)
    assert changes.change_since_upload(row, os.lstat(path), same_inode=False) == "it was replaced by another file"
    after_a_ctime_tick(row, tmp_path)
    os.chmod(path, 0o600)
    assert changes.ctime_moved(row, os.lstat(path))
    assert not changes.ctime_moved(dataclasses.replace(row, ctime_ns=None), os.lstat(path)), "uploaded before 5"


def test_a_placed_file_is_compared_by_size_and_mtime_and_a_copy_by_size(tmp_path):
    path = file_with(tmp_path, b"0123456789")
    row = uploaded_as(path)
    copy = tmp_path / "copy.pdf"
    copy.write_bytes(path.read_bytes())  # done/ on another file system: a new inode, a new mtime
    assert changes.placed_change(row, os.lstat(copy), same_inode=False) is None
    assert not changes.content_differs(copy, row.sha256)
    os.utime(path)
    assert changes.placed_change(row, os.lstat(path), same_inode=True) == "it was modified"
    with open(copy, "ab") as f:
        f.write(b"appended")
    assert changes.placed_change(row, os.lstat(copy), same_inode=False) == "it grew from 10 to 18 bytes"
    link = tmp_path / "link.pdf"
    link.symlink_to(copy)
    assert changes.placed_change(row, os.lstat(link), same_inode=False) == "it was replaced by another file"
    assert changes.content_differs(link, row.sha256), "a symlink is never the uploaded file"


# -- the pipeline on the test's thread: the export's own checks -------------------------------------


@dataclass
class Steps:
    pipeline: Pipeline
    journal: Journal
    emulator: Emulator
    inbox: Path
    done: Path

    def uploaded(self, name: str, data: bytes, elsewhere: Path) -> tuple[Row, Path]:
        """Claim and upload a file that keeps a second name ``elsewhere``; wait until the server is done."""
        link = link_into(self.inbox, elsewhere, name, data)
        (row,) = self.pipeline.claim([name.encode()])
        row = self.pipeline.upload(row)
        assert row.state == State.UPLOADED
        wait_until(lambda: self.emulator.documents()[-1]["status_data"] == 2, 10, "the document processed")
        return row, link

    def finish(self, row: Row) -> Row:
        """Check the result, and upload again and check again while the file goes back to be uploaded."""
        row = self.pipeline.check_result(row)
        while row.state == State.CLAIMED:
            row = self.pipeline.upload(row)
            wait_until(lambda: self.emulator.documents()[-1]["status_data"] == 2, 10, "the document processed")
            row = self.pipeline.check_result(row)
        return row


@pytest.fixture
def steps(tmp_path, emulator) -> Iterator[Steps]:
    config = make_config(tmp_path, emulator)
    for folder in (config.folders.inbox, config.folders.done, config.folders.failed, config.folders.state):
        folder.mkdir(parents=True)
    journal = Journal(config.journal_path)
    client = KonfuzioClient(emulator.url, TOKEN, timeout_s=10)
    processing_dir = tmp_path / "processing"
    processing_dir.mkdir(mode=0o700)
    pipeline = Pipeline(
        config,
        journal,
        client,
        clock=FakeClock(time.time()),
        gates=Gates(limits_from(config)),
        metrics=Metrics(),
        callback_base=lambda: "http://127.0.0.1:9",
        processing_dir=processing_dir,
    )
    yield Steps(pipeline, journal, emulator, config.folders.inbox, config.folders.done)
    client.close()
    journal.close()


@pytest.mark.slow
@pytest.mark.parametrize("touch", ["a link into done/ (a crash before the unlink)", "a chmod"])
def test_the_daemons_own_link_or_a_chmod_alone_is_no_change(steps, tmp_path, touch):
    data = make_pdf(label="linked by a crashed export")
    row, _ = steps.uploaded("scan.pdf", data, tmp_path / "elsewhere")
    after_a_ctime_tick(row, tmp_path)
    source = steps.pipeline.processing_path(row)
    if touch.startswith("a link"):
        target = steps.done / "scan.pdf"
        row = steps.journal.transition(row, State.EXPORTING, time.time(), final_path=os.fsencode(target))
        os.link(source, target)
        row = steps.pipeline.export(row)
    else:
        os.chmod(source, 0o400)
        row = steps.pipeline.check_result(row)

    assert row.state == State.DONE
    assert len(steps.emulator.uploads) == 1, "not uploaded again"
    assert stale_results(steps.done) == [] and (steps.done / "scan.pdf").read_bytes() == data
    assert not source.exists()


@pytest.mark.slow
def test_a_rewrite_while_the_result_is_fetched_takes_the_result_back_out_of_done(steps, tmp_path, monkeypatch):
    old, new = make_pdf(label="old, rewritten during the export"), make_pdf(label="new, rewritten during the export")
    row, link = steps.uploaded("scan.pdf", old, tmp_path / "elsewhere")
    build_result = documents.build_result

    def build_then_rewrite(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = build_result(*args, **kwargs)
        if not (steps.done / "rewritten").exists():  # once: the writer's rewrite lands while the export runs
            (steps.done / "rewritten").touch()
            rewrite_in_place(link, new)
        return result

    monkeypatch.setattr(documents, "build_result", build_then_rewrite)
    row = steps.finish(row)

    (steps.done / "rewritten").unlink()
    assert row.state == State.DONE and stale_results(steps.done) == []
    assert (steps.done / "scan.pdf").read_bytes() == new
    assert sorted(p.name for p in steps.done.iterdir()) == ["scan.pdf", "scan.pdf.json"]
    assert [u.sha256 for u in steps.emulator.uploads] == [hashlib.sha256(d).hexdigest() for d in (old, new)]
    assert documents_left(steps.emulator) == 1, "the old bytes' document deleted"


@pytest.mark.slow
def test_an_append_right_after_the_move_takes_the_file_back_and_uploads_it_again(steps, tmp_path, monkeypatch):
    data = make_png(label="appended to right after it was placed")
    row, link = steps.uploaded("scan.png", data, tmp_path / "elsewhere")
    move_into_place = placing.move_into_place
    appended: list[bool] = []

    def move_then_append(ctx: Context, row: Row, target: Path) -> None:  # the writer's append lands just after the move
        move_into_place(ctx, row, target)
        if not appended:
            appended.append(True)
            with open(link, "ab") as f:
                f.write(b"appended")

    monkeypatch.setattr(placing, "move_into_place", move_then_append)
    row = steps.finish(row)

    assert appended and row.state == State.DONE and stale_results(steps.done) == []
    assert (steps.done / "scan.png").read_bytes() == data + b"appended"
    assert sorted(p.name for p in steps.done.iterdir()) == ["scan.png", "scan.png.json"]
    assert len(steps.emulator.uploads) == 2 and documents_left(steps.emulator) == 1
