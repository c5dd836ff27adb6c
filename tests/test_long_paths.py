"""Files whose path is longer than PATH_MAX (4096 bytes): visible, tracked and movable like any other.

The trees are real: folders with 250-byte names nested until the path no longer fits the kernel.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from konfuzio_watch import readiness
from konfuzio_watch.long_paths import PATH_MAX, fits_path_max, list_dir, lstat_any, open_any, rename_any
from konfuzio_watch.samples import make_pdf
from konfuzio_watch.tracker import CandidateTracker
from konfuzio_watch.watcher import InboxFilter, InboxWatcher, ignored_files

from .conftest import wait_until
from .helpers import FakeClock

SETTLE, GRACE = 2.0, 30.0
DIRFD = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def deep_tree(
    base: Path, files: dict[str, bytes], *, longer_than: int = PATH_MAX, last_is_link_to: Path | None = None
) -> str:
    """Nest folders of 250-byte names below ``base`` until their path is longer than ``longer_than``
    bytes; put ``files`` into the deepest one (by descriptor: the kernel refuses the path). With
    ``last_is_link_to``, the deepest "folder" is a symbolic link to that folder instead."""
    base.mkdir(exist_ok=True)
    path, fd = str(base), os.open(base, DIRFD)
    try:
        level = 0
        while len(os.fsencode(path)) <= longer_than:
            name = f"{level:02d}-" + "d" * 247
            path, level = os.path.join(path, name), level + 1
            if last_is_link_to is not None and len(os.fsencode(path)) > longer_than:
                os.symlink(last_is_link_to, name, dir_fd=fd)
                return path
            os.mkdir(name, dir_fd=fd)
            step = os.open(name, DIRFD, dir_fd=fd)
            os.close(fd)
            fd = step
        for name, data in files.items():
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            with os.fdopen(out, "wb") as f:
                f.write(data)
    finally:
        os.close(fd)
    return path


def read_any(path: str) -> bytes:
    fd = open_any(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def assert_too_long_for_the_kernel(path: str) -> None:
    with pytest.raises(OSError) as caught:
        os.lstat(path)
    assert caught.value.errno == errno.ENAMETOOLONG, "the test tree must exceed PATH_MAX"


def test_a_file_beyond_path_max_can_be_statted_opened_listed_and_renamed(tmp_path):
    data = make_pdf(label="deep")
    folder = deep_tree(tmp_path, {"scan.pdf": data})
    path = os.path.join(folder, "scan.pdf")
    assert_too_long_for_the_kernel(path)
    assert not fits_path_max(path)

    assert lstat_any(path).st_size == len(data)
    assert read_any(path) == data
    assert list_dir(folder) == [("scan.pdf", False)]
    assert list_dir(os.path.dirname(folder)) == [(os.path.basename(folder), True)]
    assert readiness.pdf_looks_complete(path, len(data))

    short = tmp_path / "processing-1"
    rename_any(path, short)  # the claim
    assert short.read_bytes() == data and list_dir(folder) == []
    rename_any(short, path)  # and back (konfuzio-watch retry)
    assert read_any(path) == data and not short.exists()


def test_a_symlinked_folder_on_a_long_path_is_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.pdf").write_bytes(b"secret")
    folder = deep_tree(tmp_path / "inbox", {}, last_is_link_to=outside)
    path = os.path.join(folder, "secret.pdf")
    assert_too_long_for_the_kernel(path)

    for call in (
        lambda: lstat_any(path),
        lambda: open_any(path, os.O_RDONLY),
        lambda: list_dir(folder),
        lambda: rename_any(path, tmp_path / "stolen.pdf"),
    ):
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.ELOOP
    assert (outside / "secret.pdf").read_bytes() == b"secret"
    assert not (tmp_path / "stolen.pdf").exists()
    watcher = InboxWatcher(InboxFilter(tmp_path / "inbox", [], ()), report=lambda kind, path: None)
    assert list(watcher.scan()) == [folder], "the link itself is a candidate (failed unread); never its content"
    clock = FakeClock()
    tracker = CandidateTracker(SETTLE, GRACE, watcher.scan)
    tracker.seen(folder, clock.now())
    assert [r.path for r in tracker.step(clock.now())] == [folder], "handed out at once, like any symlink"


def test_a_deep_file_is_scanned_tracked_settled_and_claimed_like_any_other(tmp_path, caplog):
    inbox, processing = tmp_path / "inbox", tmp_path / "processing"
    processing.mkdir()
    data = make_pdf(label="deep")
    folder = deep_tree(inbox, {"scan.pdf": data, ".hidden.pdf": b"x"})
    path = os.path.join(folder, "scan.pdf")
    assert_too_long_for_the_kernel(path)
    watcher = InboxWatcher(InboxFilter(inbox, [processing], ()), report=lambda kind, path: None)
    clock = FakeClock()
    tracker = CandidateTracker(SETTLE, GRACE, watcher.scan, inbox=str(inbox))

    for _ in range(3):  # the start-up scan and two periodic rescans
        for found in watcher.scan():
            tracker.seen(found, clock.now())
    assert list(tracker.candidates) == [path]
    [candidate] = tracker.snapshot(clock.advance(1.0))
    assert candidate.state == "too long" and f"{len(os.fsencode(path))} bytes" in (candidate.reason or "")
    assert candidate.text.endswith("stable for 1.0 of 2 s)")
    assert not [r for r in caplog.records if r.levelname == "WARNING"], "no warning per rescan"

    [ready] = tracker.step(clock.advance(SETTLE))
    assert (ready.path, ready.complete) == (path, True)
    rename_any(ready.path, processing / "1")  # the pipeline's claim
    tracker.claimed([ready])
    assert (processing / "1").read_bytes() == data
    assert list_dir(folder) == [(".hidden.pdf", False)]


def test_a_folder_moved_in_with_a_deep_tree_brings_its_files(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    deep_tree(tmp_path / "batch", {"a.png": b"\x89PNG a"})
    os.rename(tmp_path / "batch", inbox / "batch")
    watcher = InboxWatcher(InboxFilter(inbox, [], ()), report=lambda kind, path: None)
    clock = FakeClock()
    tracker = CandidateTracker(SETTLE, GRACE, watcher.scan)
    tracker.seen(str(inbox / "batch"), clock.now())  # the observer's event for the folder
    [ready] = tracker.step(clock.advance(SETTLE))
    assert ready.path.endswith("/a.png") and read_any(ready.path) == b"\x89PNG a"


def test_ignored_files_are_listed_below_path_max_too(tmp_path):
    deep_tree(tmp_path, {"scan.pdf": b"%PDF", "scan.pdf.part": b"%PDF"})
    [(rel, reason)] = ignored_files(tmp_path, [], ())
    assert rel.endswith("/scan.pdf.part") and len(os.fsencode(rel)) > PATH_MAX - 100
    assert "'*.part'" in reason


@pytest.mark.slow
def test_the_observer_survives_a_tree_too_deep_to_watch(tmp_path):
    """inotify cannot watch a folder whose path is too long; the observer goes on, and the
    rescan finds what lies there. A file whose own path is too long in a folder it can watch
    is reported by its event."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    reported: list[str] = []
    keep = InboxFilter(inbox, [], ())
    watcher = InboxWatcher(keep, lambda kind, path: reported.append(path), probe_timeout_s=5)
    watcher.start()
    try:
        assert not watcher.polling
        folder = deep_tree(inbox, {}, longer_than=PATH_MAX - 600)
        while (room := PATH_MAX - 100 - len(os.fsencode(folder))) > 0:  # 100 bytes short of PATH_MAX: watchable
            folder = os.path.join(folder, "e" * (250 if room > 253 else room - 1))
            os.mkdir(folder)
        name = "n" * 120  # ... but not the path of a file in it
        wait_until(lambda: any(p.startswith(folder[:200]) for p in reported), 10, "the deep folders reported")
        fd = open_any(folder, DIRFD)
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))  # ... a file in it is not
            os.mkdir("deeper", dir_fd=fd)
            sub = os.open("deeper", DIRFD, dir_fd=fd)
            os.close(os.open("unwatched.pdf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=sub))
            os.close(sub)
        finally:
            os.close(fd)
        long_file = os.path.join(folder, name)
        assert_too_long_for_the_kernel(long_file)
        wait_until(lambda: long_file in reported, 10, "the event for a file whose path is too long")
        (inbox / "later.pdf").write_bytes(b"%PDF")
        wait_until(lambda: str(inbox / "later.pdf") in reported, 10, "events after the deep tree")
        assert os.path.join(folder, "deeper", "unwatched.pdf") in set(watcher.scan()), "the rescan finds it"
    finally:
        watcher.stop()
