"""Which errors say that a share does not answer, and when a file is proven gone (``shares.py``);
a missing output folder pauses the exports. The Samba tests (test_share_outages.py) show the same
on a real share; these run on the local disk, with Debian's strace to make a path answer EIO."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from konfuzio_watch.journal import State
from konfuzio_watch.konfuzio import classify
from konfuzio_watch.policy import Scope
from konfuzio_watch.shares import Folders, ShareUnavailable, caused_by_share_error, is_share_error

from .conftest import wait_until
from .helpers import drop_batch, injecting

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs Debian's strace for fault injection")


@pytest.mark.parametrize(
    ("error", "is_share"),
    [
        (errno.EIO, True),
        (errno.ENOTCONN, True),
        (errno.ESTALE, True),
        (errno.EBUSY, True),
        (errno.EHOSTDOWN, True),
        (errno.EHOSTUNREACH, True),
        (errno.ENETDOWN, True),
        (errno.ENETUNREACH, True),
        (errno.ETIMEDOUT, True),
        (errno.ECONNRESET, True),
        (errno.ECONNABORTED, True),
        (errno.ENODEV, True),
        (errno.ENXIO, True),
        # answers about the file or the folder itself: not a share away
        (errno.ENOENT, False),
        (errno.ENOTDIR, False),
        (errno.EACCES, False),
        (errno.EPERM, False),
        (errno.ENOSPC, False),
        (errno.EEXIST, False),
        (errno.ENAMETOOLONG, False),
        (errno.ELOOP, False),
    ],
)
def test_which_errors_are_a_share_that_does_not_answer(error, is_share):
    assert is_share_error(OSError(error, os.strerror(error))) is is_share


def test_a_missing_folder_is_a_share_away_and_an_error_behind_the_upload_is_found():
    assert is_share_error(ShareUnavailable(errno.ENOENT, "the folder is not there", "/mnt/scans/done"))
    assert not is_share_error(ValueError("x"))
    # requests wraps an error reading the upload's body into a ConnectionError, the client into an ApiError
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as exc:
            raise requests.ConnectionError(exc) from None
    except requests.ConnectionError as wrapped:
        api_error = classify(wrapped, is_post=True)
        api_error.__cause__ = wrapped
    assert caused_by_share_error(api_error)
    assert not caused_by_share_error(classify(requests.ConnectionError("connection refused"), is_post=True))


def test_absent_is_proven_only_by_a_folder_that_answers(tmp_path: Path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "there.pdf").write_bytes(b"x")
    folders = Folders([done])
    assert not folders.is_absent(done / "there.pdf")
    assert folders.is_absent(done / "gone.pdf")
    assert folders.is_absent(done / "there.pdf" / "below")  # ENOTDIR: nothing there either
    assert folders.is_absent_below(done, done / "sub" / "gone.pdf")
    os.symlink(tmp_path, done / "link")
    assert folders.is_absent_below(done, done / "link" / "done")  # never followed: nothing there for us
    shutil.rmtree(done)
    with pytest.raises(ShareUnavailable):  # an unmounted share: every file ENOENT, and no proof of anything
        folders.is_absent(done / "there.pdf")
    with pytest.raises(ShareUnavailable):
        folders.look_all()


def test_a_folder_on_another_file_system_than_at_start_is_a_bare_mountpoint(tmp_path: Path):
    """A configured folder that is itself a mountpoint is an empty local folder once the share is gone."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    share, bare = tmp_path / "share", Path(os.fspath(other)) / f"kw-bare-{os.getpid()}"
    share.mkdir()
    bare.mkdir()
    try:
        done = tmp_path / "done"
        os.symlink(share, done)  # the admin's path; where it leads is the "mount"
        folders = Folders([done])
        folders.check(done)
        done.unlink()
        os.symlink(bare, done)
        with pytest.raises(ShareUnavailable, match="not on the file system it was on"):
            folders.check(done)
        with pytest.raises(ShareUnavailable):
            folders.is_absent(done / "scan.pdf")
    finally:
        bare.rmdir()


EIO_PROBE = """
import sys
from pathlib import Path
from konfuzio_watch.shares import Folders
folder, path = Path(sys.argv[1]), Path(sys.argv[2])
folders = Folders([folder])
try:
    print("absent" if folders.is_absent(path, folder) else "present")
except OSError as exc:
    print(type(exc).__name__, exc.errno)
"""


def _with_eio_on(path: Path, folder: Path, asked: Path) -> str:
    """What ``is_absent(asked)`` says when every call on ``path`` fails with EIO (as on a share whose
    server is away), in a process of its own under strace."""
    strace = injecting("all", "EIO", paths=(str(path),))
    command = [*strace, sys.executable, "-c", EIO_PROBE, str(folder), str(asked)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.slow
@needs_strace
def test_eio_is_never_taken_for_absent(tmp_path: Path):
    """``os.path.lexists`` answers False on EIO; the proof raises it instead."""
    folder = tmp_path / "processing"
    folder.mkdir()
    (folder / "scan.pdf").write_bytes(b"x")
    assert _with_eio_on(folder / "scan.pdf", folder, folder / "scan.pdf") == f"OSError {errno.EIO}"
    # the file is missing, but its folder does not answer: no proof either
    assert _with_eio_on(folder, folder, folder / "gone.pdf") == f"OSError {errno.EIO}"
    assert _with_eio_on(tmp_path / "elsewhere", folder, folder / "gone.pdf") == "absent"


@pytest.mark.slow
def test_done_taken_away_pauses_the_exports_keeps_the_results_and_is_never_made_again(
    start_daemon, emulator, tmp_path: Path
):
    """done/ missing (a share unmounted under it) is no reason to fail a file, nor to make it again; the
    results fetched meanwhile are kept in the state folder and placed without asking Konfuzio again."""
    running = start_daemon()
    away = tmp_path / "done.away"
    running.done.rename(away)
    files = drop_batch(running, 4)
    kept = running.config.folders.state / "kept-results"
    wait_until(
        lambda: kept.is_dir() and len(list(kept.glob("*.json"))) == len(files),
        15,
        lambda: f"every result fetched and kept: {running.counts()}",
    )
    assert running.counts()[State.EXPORTING] == len(files)
    assert not running.done.exists(), "done/ made again at run time"
    assert running.daemon.gates[Scope.SHARES].is_blocked and running.counts()[State.FAILED] == 0
    assert running.metric("blocked", scope="shares") == 1
    emulator.reset_request_stats()
    away.rename(running.done)
    running.wait_finished(len(files), timeout_s=15)
    assert running.counts()[State.DONE] == len(files)
    for name, data in files.items():
        assert (running.done / name).read_bytes() == data and (running.done / f"{name}.json").exists()
    assert emulator.api_requests("details", "annotations", "bbox", "upload") == 0, emulator.request_stats()
    assert list(kept.iterdir()) == []
    rows = running.daemon.journal.rows()
    assert all(r.failures == 0 and r.attempts == 1 for r in rows)
