"""A real Samba share on loopback: what the daemon sees of other hosts' writes (tests/smb.py)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .conftest import wait_until
from .smb import Scanner

pytestmark = pytest.mark.slow


class _Seen(FileSystemEventHandler):
    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        with self.lock:
            self.paths.add(os.path.basename(os.fsdecode(event.src_path)))
            self.paths.add(os.path.basename(os.fsdecode(getattr(event, "dest_path", "") or "")))


def test_a_client_mount_gets_no_inotify_event_for_another_hosts_write(samba, smb_mount, tmp_path: Path):
    """The reason the daemon polls a client mount: the scanner's file is there, its event never is;
    the mount's own write is seen (so a probe written by the daemon proves nothing)."""
    inbox = smb_mount.share / "inbox"
    inbox.mkdir()
    seen = _Seen()
    observer = Observer()
    observer.schedule(seen, str(inbox))
    observer.start()
    try:
        local = tmp_path / "scan.pdf"
        local.write_bytes(b"%PDF-1.4\n%%EOF\n")
        Scanner(samba).put(local, "inbox/scan.pdf")
        wait_until(lambda: (inbox / "scan.pdf").exists(), 10, "the scanner's file on the mount")
        (inbox / "own.txt").write_bytes(b"x")
        wait_until(lambda: "own.txt" in seen.paths, 10, "an event for the mount's own write")
        assert "scan.pdf" not in seen.paths and "scan.pdf.part" not in seen.paths
        assert (inbox / "scan.pdf").read_bytes() == local.read_bytes()
        assert (samba.share / "inbox" / "scan.pdf").read_bytes() == local.read_bytes()
    finally:
        observer.stop()
        observer.join(5)


def test_a_share_outage_is_an_error_on_the_mount_not_an_absence(samba, smb_mount, tmp_path: Path):
    """With smbd stopped, calls on the mount fail (EIO and its kind), while os.path.exists answers
    False: a daemon must not read that as "the file is gone"."""
    local = tmp_path / "scan.pdf"
    local.write_bytes(b"%PDF-1.4\n%%EOF\n")
    samba.share.joinpath("inbox").mkdir(mode=0o777)
    samba.share.joinpath("inbox").chmod(0o777)
    Scanner(samba).put(local, "inbox/scan.pdf")
    path = smb_mount.share / "inbox" / "scan.pdf"
    wait_until(path.exists, 10, "the scanner's file on the mount")
    samba.stop()
    errors: list[OSError] = []

    def lstat_fails() -> bool:
        try:
            os.lstat(path)  # the mount caches attributes for a moment
        except OSError as exc:
            errors.append(exc)
            return True
        return False

    wait_until(lstat_fails, 10, "an error from the mount while smbd is stopped")
    assert errors[-1].errno != errno.ENOENT, errors[-1]
    assert not os.path.lexists(path)
    with pytest.raises(OSError) as info:
        os.listdir(path.parent)
    assert info.value.errno != errno.ENOENT
