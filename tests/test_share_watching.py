"""Watching a share: a client mount is polled by default; which watcher runs and why is said; status
counts the files waiting whether or not an event came. The end-to-end tests use tests/smb.py: smbd on
loopback, the share mounted through smbnetfs, smbclient as the scanner, which writes as another host
(no inotify event on the mount)."""

from __future__ import annotations

import io
import re
import subprocess
import time
from pathlib import Path

import pytest
from watchdog.observers.api import BaseObserver, EventEmitter

from konfuzio_watch.mounts import Mount
from konfuzio_watch.samples import make_pdf
from konfuzio_watch.status import print_status
from konfuzio_watch.watcher import count_waiting, plan_watching

from .conftest import drop, wait_until
from .helpers import KONFUZIO_WATCH, DaemonProcess
from .smb import Scanner

SETTLE = 0.3
EXT4 = Mount(22, "8:1", "/", "ext4", "/dev/sda1")
SMBNETFS = Mount(42, "0:51", "/mnt/smb", "fuse.smbnetfs", "smbnetfs")
CIFS = Mount(41, "0:50", "/srv/scans", "cifs", "//nas/scans")


# -- which watcher, and why ------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "mount", "polling", "said", "warning"), [
    ("auto", SMBNETFS, True, "by polling every 5 s: it is on fuse.smbnetfs at /mnt/smb (smbnetfs), where other "
                             "hosts' writes make no inotify event", False),
    ("auto", CIFS, True, "by polling every 5 s: it is on cifs at /srv/scans (//nas/scans), where other hosts' "
                         "writes make no inotify event", False),
    ("auto", EXT4, False, "by inotify: it is on ext4 at / (/dev/sda1), a local file system", False),
    ("auto", None, False, "by inotify: its file system is not known (no /proc/self/mountinfo)", False),
    (True, EXT4, True, "by polling every 5 s (watch.polling: true)", False),
    (False, EXT4, False, "by inotify (watch.polling: false)", False),
    (False, CIFS, False, "by inotify (watch.polling: false), although it is on cifs at /srv/scans (//nas/scans), "
                         "where other hosts' writes make no inotify event: files they write are found only by the "
                         "rescan every 300 s; set watch.polling: auto", True),
])
def test_the_watcher_follows_the_setting_and_the_inboxs_file_system(setting, mount, polling, said, warning):
    plan = plan_watching(setting, mount, rescan_interval_s=300)
    assert (plan.polling, plan.describe(5), plan.warning) == (polling, said, warning)
    assert plan.probe == (setting == "auto" and not polling), "a probe proves something on a local disk only"


class _DeadEmitter(EventEmitter):
    """An observer that never reports (inotify on a client mount, for another host's file)."""

    def queue_events(self, timeout: float) -> None:
        self.stopped_event.wait(timeout)


def _blind(polling: bool, interval_s: float, skip: frozenset[str]) -> BaseObserver:
    return BaseObserver(emitter_class=_DeadEmitter)


def test_status_counts_the_files_waiting_in_the_inbox_that_no_event_announced(start_daemon):
    running = start_daemon(watch={"polling": False, "rescan_interval": 300},
                           daemon_kwargs={"observer_factory": _blind})
    rescan = next(duty for duty in running.daemon.scheduler.duties if duty.name == "rescan")
    wait_until(lambda: rescan.runs, 10, "the start-up scan done (the files come after it)")
    for name in ("a.pdf", "b.pdf", "sub/c.pdf"):
        drop(running.inbox / name, make_pdf(label=name))
    drop(running.inbox / "scan.pdf.part", b"a scanner's temporary file is not counted")
    out = io.StringIO()
    print_status(running.config, show_all=False, now=time.time(), out=out)
    lines = out.getvalue().splitlines()
    assert "  watcher: by inotify (watch.polling: false)" in lines, lines
    assert "  in the inbox, not taken in yet: 3 (the daemon has seen 0 of them)" in lines, lines

    running.stop()
    out = io.StringIO()
    print_status(running.config, show_all=False, now=time.time(), out=out)
    assert out.getvalue().startswith("daemon: no daemon running\n  in the inbox, not taken in yet: 3\n")


def test_the_count_of_a_big_inbox_stops_at_its_limit(tmp_path):
    inbox = tmp_path / "inbox"
    for i in range(30):
        drop(inbox / f"{i:02d}.pdf", b"%PDF-1.4\n%%EOF\n")
    drop(inbox / "done" / "old.pdf", b"%PDF-1.4\n%%EOF\n")
    assert count_waiting(inbox, [inbox / "done"], ()) == count_waiting(inbox, [inbox / "done"], (), limit=31)
    assert count_waiting(inbox, [inbox / "done"], (), limit=31).files == 30
    counted = count_waiting(inbox, [inbox / "done"], (), limit=10)
    assert (counted.files, counted.complete) == (10, False)
    assert count_waiting(tmp_path / "missing", [], ()).error == "No such file or directory"


# -- a real share ------------------------------------------------------------------------------------


def on_the_share(daemon_process, smb_mount, **watch: object) -> DaemonProcess:  # type: ignore[no-untyped-def]
    """A daemon with its inbox, done/ and failed/ on the client mount (its journal on the local disk)."""
    share = smb_mount.share
    return daemon_process(folders={"inbox": str(share / "inbox"), "done": str(share / "done"),
                                   "failed": str(share / "failed")},
                          watch={"settle_seconds": SETTLE, **watch})


def put_all(samba, tmp_path: Path, names: list[str]) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """The scanner puts the files into inbox/ in one session (a temporary name, then a rename each)."""
    files = {name: make_pdf(label=f"scanned {name}") for name in names}
    commands = ['cd "inbox"']
    for name, data in files.items():
        local = tmp_path / f"scan-{name}"
        local.write_bytes(data)
        commands.append(f'put "{local}" "{name}.part"; rename "{name}.part" "{name}"')
    Scanner(samba).run("; ".join(commands))
    return files


def all_done(daemon: DaemonProcess, samba, names: list[str], total: int) -> bool:  # type: ignore[no-untyped-def]
    """The files are in done/ with their results, as the file server's own disk shows it (the mount caches
    attributes for a moment), and ``total`` rows are done in the journal."""
    done = samba.share / "done"
    return all((done / name).exists() and (done / f"{name}.json").exists() for name in names) and \
        daemon.journal("SELECT COUNT(*) FROM files WHERE state = 'done'") == [(total,)]


def log_lines(daemon: DaemonProcess, level: str, pattern: str) -> list[str]:
    return [line for line in daemon.log.read_text().splitlines()
            if f" {level} " in line and re.search(pattern, line)]


def konfuzio_watch(daemon: DaemonProcess, command: str) -> str:
    result = subprocess.run([*KONFUZIO_WATCH, command, "--config", str(daemon.config)], capture_output=True,
                            text=True, timeout=60)
    return result.stdout + result.stderr


@pytest.mark.slow
def test_a_client_mount_is_polled_by_default_and_another_hosts_file_is_done_within_a_poll(
        samba, smb_mount, daemon_process, tmp_path):
    poll = 1.0
    daemon = on_the_share(daemon_process, smb_mount, poll_interval=poll)
    daemon.start()
    inbox = smb_mount.share / "inbox"
    watching = log_lines(daemon, "INFO", "watching .* by polling")
    assert watching == [watching[0]] and watching[0].endswith(
        f"watching {inbox} by polling every 1 s: it is on fuse.smbnetfs at {smb_mount.mountpoint} (smbnetfs), "
        "where other hosts' writes make no inotify event"), daemon.log.read_text()[-3000:]

    put_all(samba, tmp_path, ["scan.pdf"])
    written = time.monotonic()
    wait_until(lambda: all_done(daemon, samba, ["scan.pdf"], 1), 20,
               lambda: f"scan.pdf done (log: {daemon.log.read_text()[-2000:]})")
    took = time.monotonic() - written
    print(f"client mount, default config: done {took:.1f} s after the scanner's last write")
    assert took < poll + SETTLE + 4, "poll_interval + settle + processing"
    assert daemon.journal("SELECT state, COUNT(*) FROM files GROUP BY state") == [("done", 1)]
    assert daemon.terminate() == 0


@pytest.mark.slow
def test_polling_false_on_a_client_mount_is_honoured_loudly_and_status_counts_the_files_it_cannot_see(
        samba, smb_mount, daemon_process, tmp_path):
    daemon = on_the_share(daemon_process, smb_mount, polling=False)
    inbox = smb_mount.share / "inbox"
    inbox.mkdir()
    checked = konfuzio_watch(daemon, "check")
    because = (f"it is on fuse.smbnetfs at {smb_mount.mountpoint} (smbnetfs), where other hosts' writes make no "
               "inotify event: files they write are found only by the rescan every 300 s; set watch.polling: auto")
    assert f"warn  watcher: by inotify (watch.polling: false), although {because}" in checked, checked

    daemon.start()
    assert log_lines(daemon, "WARNING", "by inotify") == [
        *log_lines(daemon, "WARNING", f"watching {re.escape(str(inbox))} by inotify \\(watch.polling: false\\), "
                                      f"although {re.escape(because)}$")], daemon.log.read_text()[-3000:]
    put_all(samba, tmp_path, ["a.pdf", "b.pdf"])
    status = konfuzio_watch(daemon, "status")
    assert "  watcher: by inotify (watch.polling: false), although it is on fuse.smbnetfs" in status, status
    assert "  in the inbox, not taken in yet: 2 (the daemon has seen 0 of them)" in status, status
    assert daemon.terminate() == 0
