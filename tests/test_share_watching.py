"""Watching a share: a client mount is polled by default; which watcher runs and why is said; status
counts the files waiting whether or not an event came; watching comes back by itself after the share
went away. The end-to-end tests use tests/smb.py: smbd on loopback, the share mounted through
smbnetfs, smbclient as the scanner, which writes as another host (no inotify event on the mount)."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
from watchdog.observers.api import BaseObserver, EventEmitter

from konfuzio_watch.locks import INBOX_LOCK_NAME, InboxLock, ProcessingLock
from konfuzio_watch.markers import InboxPlace, MarkerKeeper
from konfuzio_watch.mounts import Mount
from konfuzio_watch.samples import make_pdf
from konfuzio_watch.status import print_status
from konfuzio_watch.watcher import InboxFilter, InboxWatcher, count_waiting, plan_watching

from .conftest import drop, wait_until
from .helpers import KONFUZIO_WATCH, DaemonProcess
from .smb import Scanner

SETTLE = 0.3
EXT4 = Mount(22, "8:1", "/", "ext4", "/dev/sda1")
SMBNETFS = Mount(42, "0:51", "/mnt/smb", "fuse.smbnetfs", "smbnetfs")
CIFS = Mount(41, "0:50", "/srv/scans", "cifs", "//nas/scans")


# -- which watcher, and why ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "mount", "polling", "said", "warning"),
    [
        (
            "auto",
            SMBNETFS,
            True,
            "by polling every 5 s: it is on fuse.smbnetfs at /mnt/smb (smbnetfs), where other "
            "hosts' writes make no inotify event",
            False,
        ),
        (
            "auto",
            CIFS,
            True,
            "by polling every 5 s: it is on cifs at /srv/scans (//nas/scans), where other hosts' "
            "writes make no inotify event",
            False,
        ),
        ("auto", EXT4, False, "by inotify: it is on ext4 at / (/dev/sda1), a local file system", False),
        ("auto", None, False, "by inotify: its file system is not known (no /proc/self/mountinfo)", False),
        (True, EXT4, True, "by polling every 5 s (watch.polling: true)", False),
        (False, EXT4, False, "by inotify (watch.polling: false)", False),
        (
            False,
            CIFS,
            False,
            "by inotify (watch.polling: false), although it is on cifs at /srv/scans (//nas/scans), "
            "where other hosts' writes make no inotify event: files they write are found only by the "
            "rescan every 300 s; set watch.polling: auto",
            True,
        ),
    ],
)
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


@pytest.mark.slow
def test_status_counts_the_files_waiting_in_the_inbox_that_no_event_announced(start_daemon):
    running = start_daemon(watch={"polling": False, "rescan_interval": 300}, daemon_kwargs={"observer_factory": _blind})
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


# -- an observer that stopped, a share that went away ----------------------------------------------


@pytest.mark.slow
def test_a_poller_that_stopped_by_itself_is_started_again(start_daemon, caplog):
    """watchdog's poller stops for good when its folder is missing for a moment (a share remounted)."""
    caplog.set_level(logging.WARNING, logger="konfuzio_watch")
    running = start_daemon(watch={"polling": True, "poll_interval": 0.2, "rescan_interval": 300})
    watcher = running.daemon.watcher
    wait_until(watcher.is_running, 5, "the poller running")
    stopped, old = time.monotonic(), watcher._observer
    for emitter in old.emitters:  # what the poller does when its snapshot finds no folder
        emitter.stop()
    wait_until(lambda: watcher._observer is not old and watcher.is_running(), 5, "the poller started again")
    assert time.monotonic() - stopped < 0.5 + 0.5, "within the markers' look (every poll_interval, at least 0.5 s)"
    drop(running.inbox / "after.pdf", make_pdf(label="after"))
    running.wait_finished(1, timeout_s=10)
    assert [r.getMessage() for r in caplog.records if r.name == "konfuzio_watch"] == [
        f"the observer of the inbox {running.inbox} had stopped (its folder was missing for a moment?): watching it "
        "again"
    ]


class FakeMounts:
    """The inbox's place as ``markers.inbox_place`` gives it, with a mount the test unmounts and mounts
    again: a real folder under a mountpoint that the test empties (a lazy unmount) and fills again."""

    def __init__(self, point: Path):
        self.point = point
        self.mounted = True
        self.mount_id = 100
        self.fs_type = "fuse.smbnetfs"

        self.failing: int | None = None  # the errno a server that does not answer gives

    def where(self, inbox: Path) -> InboxPlace:
        mount = Mount(self.mount_id, "0:99", str(self.point), self.fs_type, "smbnetfs") if self.mounted else EXT4
        try:
            if self.failing is not None:
                raise OSError(self.failing, os.strerror(self.failing))
            return InboxPlace(mount, os.stat(inbox).st_dev)
        except OSError as exc:  # under the bare mountpoint, or the server does not answer
            return InboxPlace(mount, error=exc.strerror, code=exc.errno)


def keeper_on(tmp_path: Path, calls: list[str]) -> tuple[MarkerKeeper, FakeMounts, Path]:
    """A marker keeper on an inbox under a fake mount, with the markers taken; it tells ``calls``."""
    point = tmp_path / "mnt"
    inbox, processing = point / "share" / "inbox", point / "share" / ".inbox.konfuzio-watch"
    inbox.mkdir(parents=True)
    processing.mkdir(mode=0o700)
    state = tmp_path / "state"
    inbox_lock = InboxLock(inbox, state).acquire()
    inbox_lock.claim("journal-1")
    processing_lock = ProcessingLock(processing, state).acquire()
    processing_lock.claim("journal-1")
    mounts = FakeMounts(point)
    keeper = MarkerKeeper(
        inbox_lock,
        processing_lock,
        inbox=inbox,
        on_lost=lambda r: calls.append(f"lost {r}"),
        on_new_inbox=lambda now: calls.append("new inbox"),
        on_inbox_away=lambda reason: calls.append(f"away: {reason}"),
        on_inbox_back=lambda now: calls.append("back"),
        where=mounts.where,
    )
    return keeper, mounts, inbox


def test_a_share_away_pauses_watching_writes_nothing_under_the_bare_mountpoint_and_is_taken_again_when_back(
    tmp_path, caplog
):
    caplog.set_level(logging.DEBUG, logger="konfuzio_watch")
    calls: list[str] = []
    keeper, mounts, inbox = keeper_on(tmp_path, calls)
    point, elsewhere = mounts.point, tmp_path / "share-while-unmounted"
    inbox_lock, processing_lock = keeper.inbox_lock, keeper.processing_lock
    assert inbox_lock
    try:
        keeper.tend(1.0)
        assert calls == [] and keeper.away is None

        point.rename(elsewhere)  # the share unmounted: the bare mountpoint is left, empty
        point.mkdir()
        mounts.mounted = False
        for now in (2.0, 4.0, 6.0):
            keeper.tend(now)
        assert list(point.iterdir()) == [], "written under the bare mountpoint"
        assert calls == [
            f"away: fuse.smbnetfs at {point} (smbnetfs) is not mounted any more (No such file or directory)"
        ]
        assert keeper.away is not None and keeper.away.since == 2.0
        assert not inbox_lock.file.held and not processing_lock.file.held, "let go: they keep a dead mount alive"

        point.rmdir()  # mounted again: the same share, a new mount
        elsewhere.rename(point)
        mounts.mounted, mounts.mount_id = True, mounts.mount_id + 1
        keeper.tend(8.0)
        assert calls[1:] == ["back"] and keeper.away is None
        assert inbox_lock.file.in_place() and processing_lock.file.in_place()
        assert (inbox / INBOX_LOCK_NAME).read_text().count(f'"pid": {os.getpid()}') == 1

        mounts.mount_id += 1  # mounted again between two looks
        keeper.tend(10.0)
        assert calls[2:] == ["back"]
        mounts.fs_type = "tmpfs"  # something else mounted there
        keeper.tend(12.0)
        assert calls[3:] == [
            "away: it is on tmpfs at " + str(point) + " (smbnetfs) now, not on fuse.smbnetfs at "
            f"{point} (smbnetfs) as at start-up (if it moved there for good, restart konfuzio-watch)"
        ]
    finally:
        inbox_lock.release()
        processing_lock.release()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == [
        (
            "ERROR",
            f"the inbox {inbox} is away: fuse.smbnetfs at {point} (smbnetfs) is not mounted any more (No "
            "such file or directory); watching it is paused, and nothing is written there until it is back",
        ),
        (
            "WARNING",
            f"the inbox {inbox} is back on fuse.smbnetfs at {point} (smbnetfs) after 6 s away: watching it again",
        ),
        (
            "WARNING",
            f"the inbox {inbox} is back on fuse.smbnetfs at {point} (smbnetfs), mounted again since the last "
            "look: watching it again",
        ),
        (
            "ERROR",
            f"the inbox {inbox} is away: it is on tmpfs at {point} (smbnetfs) now, not on fuse.smbnetfs at "
            f"{point} (smbnetfs) as at start-up (if it moved there for good, restart konfuzio-watch); watching "
            "it is paused, and nothing is written there until it is back",
        ),
    ]


@pytest.mark.slow
def test_a_paused_watcher_says_why_and_starts_again(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher = InboxWatcher(InboxFilter(inbox, [], ()), lambda kind, path: None, polling=True, poll_interval_s=0.1)
    watcher.start()
    try:
        assert watcher.is_running() and watcher.describe() == "by polling every 0.1 s (watch.polling: true)"
        watcher.pause("the inbox's share is away")
        assert not watcher.is_running() and watcher.describe() == "paused: the inbox's share is away"
        watcher.start()
        assert watcher.is_running() and watcher.describe() == "by polling every 0.1 s (watch.polling: true)"
    finally:
        watcher.stop()


def test_a_share_that_does_not_answer_pauses_watching_and_one_merely_missing_inbox_is_left_to_the_markers(
    tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="konfuzio_watch")
    calls: list[str] = []
    keeper, mounts, inbox = keeper_on(tmp_path, calls)
    try:
        mounts.failing = errno.EIO  # smbd stopped: the mount is there, and answers EIO
        keeper.tend(1.0)
        keeper.tend(3.0)
        mounts.failing = None
        keeper.tend(31.0)
        assert calls == ["away: it cannot be looked at (Input/output error)", "back"]

        inbox.rename(inbox.with_name("inbox-old"))  # renamed, on its own mount: the markers' look says it
        keeper.tend(33.0)
        inbox.mkdir()
        keeper.tend(35.0)
        assert calls[2:] == ["new inbox"] and keeper.away is None
    finally:
        assert keeper.inbox_lock
        keeper.inbox_lock.release()
        keeper.processing_lock.release()
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        f"the inbox {inbox} is away: it cannot be looked at (Input/output error)",
        f"the inbox {inbox} is back on fuse.smbnetfs at {mounts.point} (smbnetfs) after 30 s away: watching it again",
        f"the inbox's marker {inbox / INBOX_LOCK_NAME} was removed or replaced (by an inbox writer, or the inbox was "
        "renamed and recreated) while this daemon ran",
    ]


# -- a real share ------------------------------------------------------------------------------------


def on_the_share(daemon_process, smb_mount, **watch: object) -> DaemonProcess:  # type: ignore[no-untyped-def]
    """A daemon with its inbox, done/ and failed/ on the client mount (its journal on the local disk)."""
    share = smb_mount.share
    return daemon_process(
        folders={"inbox": str(share / "inbox"), "done": str(share / "done"), "failed": str(share / "failed")},
        watch={"settle_seconds": SETTLE, **watch},
    )


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
    return all((done / name).exists() and (done / f"{name}.json").exists() for name in names) and daemon.journal(
        "SELECT COUNT(*) FROM files WHERE state = 'done'"
    ) == [(total,)]


def log_lines(daemon: DaemonProcess, level: str, pattern: str) -> list[str]:
    return [line for line in daemon.log.read_text().splitlines() if f" {level} " in line and re.search(pattern, line)]


def konfuzio_watch(daemon: DaemonProcess, command: str) -> str:
    result = subprocess.run(
        [*KONFUZIO_WATCH, command, "--config", str(daemon.config)], capture_output=True, text=True, timeout=60
    )
    return result.stdout + result.stderr


@pytest.mark.slow
def test_a_client_mount_is_polled_by_default_and_another_hosts_file_is_done_within_a_poll(
    samba, smb_mount, daemon_process, tmp_path
):
    poll = 1.0
    daemon = on_the_share(daemon_process, smb_mount, poll_interval=poll)
    daemon.start()
    inbox = smb_mount.share / "inbox"
    watching = log_lines(daemon, "INFO", "watching .* by polling")
    assert watching == [watching[0]] and watching[0].endswith(
        f"watching {inbox} by polling every 1 s: it is on fuse.smbnetfs at {smb_mount.mountpoint} (smbnetfs), "
        "where other hosts' writes make no inotify event"
    ), daemon.log.read_text()[-3000:]

    put_all(samba, tmp_path, ["scan.pdf"])
    written = time.monotonic()
    wait_until(
        lambda: all_done(daemon, samba, ["scan.pdf"], 1),
        20,
        lambda: f"scan.pdf done (log: {daemon.log.read_text()[-2000:]})",
    )
    took = time.monotonic() - written
    print(f"client mount, default config: done {took:.1f} s after the scanner's last write")
    assert took < poll + SETTLE + 4, "poll_interval + settle + processing"
    assert daemon.journal("SELECT state, COUNT(*) FROM files GROUP BY state") == [("done", 1)]
    assert daemon.terminate() == 0


@pytest.mark.slow
def test_polling_false_on_a_client_mount_is_honoured_loudly_and_status_counts_the_files_it_cannot_see(
    samba, smb_mount, daemon_process, tmp_path
):
    daemon = on_the_share(daemon_process, smb_mount, polling=False)
    inbox = smb_mount.share / "inbox"
    inbox.mkdir()
    checked = konfuzio_watch(daemon, "check")
    because = (
        f"it is on fuse.smbnetfs at {smb_mount.mountpoint} (smbnetfs), where other hosts' writes make no "
        "inotify event: files they write are found only by the rescan every 300 s; set watch.polling: auto"
    )
    assert f"warn  watcher: by inotify (watch.polling: false), although {because}" in checked, checked

    daemon.start()
    assert log_lines(daemon, "WARNING", "by inotify") == [
        *log_lines(
            daemon,
            "WARNING",
            f"watching {re.escape(str(inbox))} by inotify \\(watch.polling: false\\), although {re.escape(because)}$",
        )
    ], daemon.log.read_text()[-3000:]
    put_all(samba, tmp_path, ["a.pdf", "b.pdf"])
    status = konfuzio_watch(daemon, "status")
    assert "  watcher: by inotify (watch.polling: false), although it is on fuse.smbnetfs" in status, status
    assert "  in the inbox, not taken in yet: 2 (the daemon has seen 0 of them)" in status, status
    assert daemon.terminate() == 0


@pytest.mark.slow
def test_a_share_unmounted_and_mounted_again_is_watched_again_within_a_poll_and_nothing_lands_under_the_mountpoint(
    samba, smb_mount, daemon_process, tmp_path
):
    poll = 2.0
    daemon = on_the_share(daemon_process, smb_mount, poll_interval=poll)
    daemon.start()
    put_all(samba, tmp_path, ["before.pdf"])
    wait_until(lambda: all_done(daemon, samba, ["before.pdf"], 1), 20, "before.pdf done")

    unmounted = time.monotonic()
    smb_mount.unmount(lazy=True)  # returns once smbnetfs is gone: the daemon let go of the share (or 10 s)
    print(f"smbnetfs gone {time.monotonic() - unmounted:.1f} s after the lazy unmount")
    wait_until(
        lambda: log_lines(daemon, "ERROR", "inbox"),
        10,
        lambda: f"the ERROR on the share going away (log: {daemon.log.read_text()[-2000:]})",
    )
    live = requests.get(f"{daemon.monitor_url}/status", timeout=5).json()
    assert live["extra"]["watcher"].startswith("paused: the inbox's share is away since "), live["extra"]
    outage_end = time.monotonic() + 3
    while time.monotonic() < outage_end:  # the share stays away; the daemon looks at it every second or two
        assert list(smb_mount.mountpoint.iterdir()) == [], "written under the bare mountpoint"
        time.sleep(0.1)

    smb_mount.mount()
    back = time.monotonic()
    names = [f"after-{i}.pdf" for i in range(5)]
    put_all(samba, tmp_path, names)
    wait_until(
        lambda: all_done(daemon, samba, names, 6),
        30,
        lambda: f"the 5 files put after the return done (log: {daemon.log.read_text()[-3000:]})",
    )
    took = time.monotonic() - back
    print(f"lazy unmount and remount: the 5 files done {took:.1f} s after the return")
    assert took <= 2 * poll, "2 x poll_interval of the share's return"
    # One of each for the share (the start-up WARNING on the processing folder's privacy is another matter)
    said = log_lines(daemon, "ERROR", "") + log_lines(daemon, "WARNING", r"the inbox .* is (away|back)")
    assert len(said) == 2 and " is away: fuse.smbnetfs at " in said[0] and " is back on fuse.smbnetfs at " in said[1], (
        daemon.log.read_text()[-3000:]
    )
    assert daemon.journal("SELECT state, COUNT(*) FROM files GROUP BY state") == [("done", 6)]
    assert not list((samba.share / "failed").rglob("*"))
    assert daemon.terminate() == 0
