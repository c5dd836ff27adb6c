"""Links planted in done/ and failed/ by anyone who may write there (a scanner group, an unlucky admin).

Each test runs the real daemon with a symbolic link waiting where it writes: at the temporary name
that the daemon used to give a result (a name anyone could compute), at the searchable PDF's, and in
place of a subfolder. Nothing outside the output folders may be written, the links stay as they
were, and every file still ends exactly once in done/ or failed/ next to its own result.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from konfuzio_watch.journal import State
from konfuzio_watch.samples import make_pdf, make_png

from .conftest import drop, wait_until
from .helpers import DaemonProcess, file_of, predictable_temp

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Outcome:
    """The issue's table: files | done | duplicate documents | written outside | stale results."""

    files: int
    done: int  # files found exactly once, in their output folder, next to their own result or report
    duplicates: int  # documents stored on the server beyond one per file
    written_outside: int  # entries created, changed or removed outside the output folders (journal included)
    stale_results: int  # result or report files that are not the file's own (or a link)
    links_untouched: bool


CLEAN = dict(duplicates=0, written_outside=0, stale_results=0, links_untouched=True)


class Attack:
    """The folders of one run, the files dropped, the links planted and what lies outside."""

    def __init__(self, root: Path, emulator, done: Path | None = None, **overrides: dict) -> None:  # type: ignore[no-untyped-def]
        self.root = root
        self.done, self.failed = done or root / "done", root / "failed"
        self.outside = root / "outside"
        self.outside.mkdir()
        folders = {"done": str(self.done), **overrides.pop("folders", {})}
        self.daemon = DaemonProcess(root, emulator, folders=folders, **overrides)
        self.emulator = emulator
        self.expected: dict[str, tuple[str, bytes]] = {}  # rel path -> (output folder, bytes)
        self.links: dict[Path, str] = {}

    def victim(self, name: str) -> Path:
        path = self.outside / name
        path.write_bytes(f"victim {name}: must never change\n".encode())
        return path

    def plant(self, link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)
        self.links[link] = os.readlink(link)

    def drop(self, rel: str, data: bytes, folder: str = "done") -> None:
        self.expected[rel] = (folder, data)
        drop(self.root / "inbox" / rel, data)

    def run(self, then: Callable[[], None] | None = None) -> Outcome:
        """Start the daemon (then call ``then``), wait until every file dropped is finished, stop it."""
        before = snapshot(self.outside)
        self.daemon.start()
        if then is not None:
            then()
        wait_until(
            lambda: self.finished_or_broken(),
            60,
            lambda: f"all {len(self.expected)} files finished (log: {self.daemon.log.read_text()[-1500:]})",
        )
        self.daemon.terminate()
        journal = self.root / "state" / "journal.sqlite3"
        outcome = Outcome(
            files=len(self.expected),
            done=self.placed_once(),
            duplicates=self.duplicates(),
            written_outside=changed(before, snapshot(self.outside)) + (not journal_intact(journal)),
            stale_results=self.stale_results(),
            links_untouched=self.links_untouched(),
        )
        print(outcome)  # the figures for the table (shown with a failure, or with -s)
        return outcome

    def restarts(self) -> bool:
        """Does the daemon start again on this journal (and stop cleanly)?"""
        self.daemon.start(wait_ready=False)

        def up_or_exited() -> str | None:
            try:
                return "ready" if self.daemon.is_ready() else None
            except pytest.fail.Exception:
                return "exited"

        if wait_until(up_or_exited, 30, "the restart to come up or give up") == "exited":
            return False
        return self.daemon.terminate() == 0

    def finished_or_broken(self) -> bool:
        assert self.daemon.proc
        if self.daemon.proc.poll() is not None:
            return True
        try:
            ((n,),) = self.daemon.journal("SELECT COUNT(*) FROM files WHERE state IN ('done', 'failed')")
        except sqlite3.DatabaseError:
            return True  # the journal was destroyed: nothing will finish
        return n >= len(self.expected)

    def placed_once(self) -> int:
        found = collections.defaultdict(list)
        for folder in ("done", "failed"):
            for path in walk(getattr(self, folder)):
                if not path.name.endswith(".json") and not path.is_symlink():
                    found[(folder, hashlib.sha256(path.read_bytes()).hexdigest())].append(path)
        placed = 0
        for folder, data in self.expected.values():
            paths = found[(folder, hashlib.sha256(data).hexdigest())]
            sidecar = ".json" if folder == "done" else ".error.json"
            if len(paths) == 1 and own_sidecar(paths[0], paths[0].with_name(paths[0].name + sidecar)):
                placed += 1
        return placed

    def duplicates(self) -> int:
        deleted = {d.doc_id for d in self.emulator.deletions}
        kept = collections.Counter(u.sha256 for u in self.emulator.uploads if u.doc_id not in deleted)
        return sum(n - 1 for n in kept.values())

    def stale_results(self) -> int:
        stale = 0
        for folder in (self.done, self.failed):
            for path in walk(folder):
                if path.name.endswith(".json"):
                    stale += not own_sidecar(
                        path.with_name(path.name.removesuffix(".error.json").removesuffix(".json")), path
                    )
        return stale

    def links_untouched(self) -> bool:
        return all(link.is_symlink() and os.readlink(link) == target for link, target in self.links.items())


def walk(folder: Path) -> list[Path]:
    """Every entry below ``folder``, symbolic links listed but never followed; hidden ones left out."""
    found = []
    for parent, dirs, files in os.walk(folder):
        found += [
            Path(parent) / name
            for name in files + [d for d in dirs if os.path.islink(Path(parent) / d)]
            if not name.startswith(".")
        ]
    return found


def own_sidecar(file: Path, sidecar: Path) -> bool:
    """Is ``sidecar`` a regular file describing the regular file ``file`` (its source's sha256)?"""
    if file.is_symlink() or sidecar.is_symlink() or not file.is_file() or not sidecar.is_file():
        return False
    source = json.loads(sidecar.read_text()).get("source") or {}
    data = file.read_bytes()
    if source.get("sha256") is None:  # a file refused before it was hashed (empty, unsupported)
        return source.get("size") in (None, len(data))
    return source["sha256"] == hashlib.sha256(data).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    state = {}
    for path in folder.rglob("*"):
        state[str(path)] = (
            "link:" + os.readlink(path)
            if path.is_symlink()
            else "dir"
            if path.is_dir()
            else hashlib.sha256(path.read_bytes()).hexdigest()
        )
    return state


def changed(before: dict[str, str], after: dict[str, str]) -> int:
    return sum(before.get(key) != after.get(key) for key in before.keys() | after.keys())


def journal_intact(path: Path) -> bool:
    """A journal whose file is still SQLite's (its pages may all sit in the WAL: the check alone would
    pass until the next checkpoint) and whose integrity check passes."""
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\0":
            return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    except sqlite3.DatabaseError:
        return False


FILES = {"a.pdf": make_pdf(label="link a"), "b.png": make_png(label="link b"), "c.pdf": make_pdf(label="link c")}


def test_a_link_at_a_results_temporary_name_is_never_written_through(tmp_path, emulator):
    attack = Attack(tmp_path, emulator)
    for name in FILES:
        attack.plant(predictable_temp(tmp_path / "done" / f"{name}.json"), attack.victim(f"victim-{name}"))
    for name, data in FILES.items():
        attack.drop(name, data)
    assert attack.run() == Outcome(files=3, done=3, **CLEAN)


def test_a_link_to_the_journal_at_a_results_temporary_name_leaves_the_journal_whole(tmp_path, emulator):
    attack = Attack(tmp_path, emulator)
    for i in range(12):  # a journal of some size: the result's bytes land on pages the next run never writes
        attack.drop(f"earlier/{i:02d}.pdf", make_pdf(label=f"before the link {i}"))
    attack.run()
    attack.plant(predictable_temp(tmp_path / "done" / "j.pdf.json"), tmp_path / "state" / "journal.sqlite3")

    def drop_after_a_checkpoint() -> None:
        # What SQLite does by itself every 1,000 pages of a running daemon: the journal's file holds
        # every row, its WAL starts empty. Then the files come.
        with sqlite3.connect(tmp_path / "state" / "journal.sqlite3") as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        attack.drop("j.pdf", make_pdf(label="journal link"))
        attack.drop("k.pdf", make_pdf(label="journal link, the next file"))

    outcome = attack.run(then=drop_after_a_checkpoint)
    restarted = attack.restarts()
    print(f"restarted: {restarted}")
    assert (outcome, restarted) == (Outcome(files=14, done=14, **CLEAN), True), attack.daemon.log.read_text()[-1500:]


def test_a_linked_subfolder_in_done_is_never_followed(tmp_path, emulator):
    attack = Attack(tmp_path, emulator)
    (tmp_path / "outside" / "elsewhere").mkdir()
    attack.plant(tmp_path / "done" / "sub", tmp_path / "outside" / "elsewhere")
    attack.drop("sub/x.pdf", make_pdf(label="under a linked folder"))
    attack.drop("sub/deeper/y.png", make_png(label="two folders under a linked folder"))
    attack.drop("z.pdf", make_pdf(label="next to the linked folder"))
    assert attack.run() == Outcome(files=3, done=3, **CLEAN)
    assert (tmp_path / "done" / "sub (2)" / "x.pdf.json").is_file()
    assert "not followed" in attack.daemon.log.read_text()


def test_a_linked_subfolder_in_failed_is_never_followed(tmp_path, emulator):
    attack = Attack(tmp_path, emulator, watch={"incomplete_grace_seconds": 0.5})  # an empty file fails soon
    (tmp_path / "outside" / "elsewhere").mkdir()
    attack.plant(tmp_path / "failed" / "sub", tmp_path / "outside" / "elsewhere")
    attack.drop("sub/empty.pdf", b"", folder="failed")
    attack.drop("sub/notes.txt", b"not a document\n", folder="failed")
    assert attack.run() == Outcome(files=2, done=2, **CLEAN)
    assert (tmp_path / "failed" / "sub (2)" / "empty.pdf.error.json").is_file()


def test_a_link_at_the_searchable_pdfs_temporary_names_is_never_written_through(tmp_path, emulator):
    attack = Attack(tmp_path, emulator, results={"outputs": ["json", "searchable_pdf"]})
    for row_id in range(1, 4):  # the journal's first row ids: the staging name was made of them
        staging = predictable_temp(tmp_path / "done" / f"{row_id}.ocr.pdf")
        attack.plant(staging, attack.victim(f"victim-staging-{row_id}"))
        attack.plant(predictable_temp(staging), attack.victim(f"victim-download-{row_id}"))
    for name, data in FILES.items():
        attack.drop(name, data)
    assert attack.run() == Outcome(files=3, done=3, **CLEAN)
    for name in FILES:
        pdf = tmp_path / "done" / f"{name}.ocr.pdf"
        assert not pdf.is_symlink() and pdf.read_bytes().startswith(b"%PDF-")


def test_a_link_at_a_copys_temporary_name_is_never_written_through(tmp_path, emulator):
    """done/ on another file system (tmpfs) than the inbox: each file is copied into it."""
    other_fs = Path(tempfile.mkdtemp(prefix="kw-links-", dir="/dev/shm"))
    if os.stat(other_fs).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same file system as the test's folder")
    try:
        attack = Attack(tmp_path, emulator, done=other_fs / "done")
        for name in FILES:
            attack.plant(predictable_temp(attack.done / name), attack.victim(f"victim-copy-{name}"))
        for name, data in FILES.items():
            attack.drop(name, data)
        assert attack.run() == Outcome(files=3, done=3, **CLEAN)
    finally:
        shutil.rmtree(other_fs, ignore_errors=True)


def test_a_review_never_writes_its_revision_through_a_link_put_in_place_of_the_result(start_daemon, emulator, tmp_path):
    """After the export someone puts links where the results are: the searchable PDF's own name
    (a link to a victim) and the folder of another file's result (a link to where that folder was
    moved). The reviews that follow replace the one link by the new PDF and write nothing through
    the other."""
    running = start_daemon(results={"outputs": ["json", "searchable_pdf"]})
    outside = tmp_path / "outside"
    outside.mkdir()
    drop(running.inbox / "pdf" / "a.pdf", file_of("invoice", tag="review through a link a"))
    drop(running.inbox / "moved" / "b.pdf", file_of("invoice", tag="review through a link b"))
    running.wait_finished(2)
    assert emulator.wait_idle(10)
    wait_until(
        lambda: all(r.refresh_at is None for r in running.daemon.journal.rows([State.DONE])), 10, "no refresh pending"
    )
    docs = {r.rel_path: r.document_id for r in running.daemon.journal.rows([State.DONE])}
    victim = outside / "victim.pdf"
    victim.write_bytes(b"victim: must never change\n")
    pdf = running.done / "pdf" / "a.pdf.ocr.pdf"
    pdf.unlink()
    os.symlink(victim, pdf)
    os.replace(running.done / "moved", outside / "moved")
    os.symlink(outside / "moved", running.done / "moved")
    before = snapshot(outside)

    reviewed = emulator.request_stats()["details"].count + len(docs)
    for doc_id in docs.values():
        emulator.review(doc_id, changes={"Total": "999,00"})
    wait_until(
        lambda: (
            emulator.request_stats()["details"].count >= reviewed
            and all(r.refresh_at is None for r in running.daemon.journal.rows([State.DONE]))
        ),
        15,
        "both reviews looked at",
    )
    revisions = {r.rel_path: r.revision for r in running.daemon.journal.rows([State.DONE])}
    print(f"written outside: {changed(before, snapshot(outside))}, revisions: {revisions}")
    assert changed(before, snapshot(outside)) == 0, "written outside done/"
    assert revisions == {b"pdf/a.pdf": 2, b"moved/b.pdf": 1}
    assert not pdf.is_symlink() and pdf.read_bytes().startswith(b"%PDF-")
    assert json.loads((running.done / "pdf" / "a.pdf.json").read_text())["revision"] == 2
    assert os.readlink(running.done / "moved") == str(outside / "moved")


def test_retry_never_takes_a_file_in_through_a_folder_of_failed_that_became_a_link(start_daemon, emulator, tmp_path):
    """``konfuzio-watch retry`` moves a failed file back into the inbox: a folder of failed/ that was
    replaced by a link in the meantime (to someone's files) is not followed, and nothing is taken in."""
    from konfuzio_watch.retry import retry_files

    running = start_daemon()
    drop(running.inbox / "sub" / "notes.txt", b"not a document\n")
    running.wait_finished(1)
    running.stop()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.replace(running.failed / "sub", outside / "sub")
    (outside / "sub" / "notes.txt").write_bytes(b"someone else's notes, now under that name\n")
    os.symlink(outside / "sub", running.failed / "sub")
    before = snapshot(outside)

    messages, unmatched = retry_files(running.config, [], all_failed=True, now=time.time())
    print(messages, f"written outside: {changed(before, snapshot(outside))}")
    assert unmatched == 0 and len(messages) == 1 and "not followed" in messages[0]
    assert changed(before, snapshot(outside)) == 0
    assert [p for p in running.inbox.rglob("*") if p.is_file() and ".konfuzio-watch" not in str(p)] == []


def test_on_a_samba_mount_results_are_placed_without_hard_links_or_links(smb_mount, tmp_path):
    """A client mount of an SMB share (smbnetfs: no hard links, no symbolic links): every write and
    move below done/ falls back to check-then-rename, a file where a subfolder should be is gone
    around, and nothing is left under a temporary name."""
    from konfuzio_watch.files import free_target, move_no_clobber, write_json_no_clobber

    done = smb_mount.share / "done"
    done.mkdir()
    (done / "sub").write_bytes(b"a file where a folder is wanted")
    source, second = tmp_path / "x.pdf", tmp_path / "second.pdf"
    source.write_bytes(b"%PDF- original")
    second.write_bytes(b"%PDF- another")

    target = free_target(done, "sub/x.pdf", ".json")
    assert target == done / "sub (2)" / "x.pdf"
    write_json_no_clobber(target.with_name("x.pdf.json"), {"document_id": 1}, is_ours=lambda old: False, root=done)
    move_no_clobber(source, target, dst_root=done)  # another file system: a copy, then its name
    with pytest.raises(FileExistsError):
        move_no_clobber(second, target, dst_root=done)
    assert free_target(done, "sub/x.pdf", ".json") == done / "sub (2)" / "x (2).pdf"
    assert sorted(os.listdir(done / "sub (2)")) == ["x.pdf", "x.pdf.json"]
    assert target.read_bytes() == b"%PDF- original" and second.read_bytes() == b"%PDF- another"
    assert not source.exists() and (done / "sub").read_bytes() == b"a file where a folder is wanted"
