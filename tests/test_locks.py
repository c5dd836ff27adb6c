"""Two daemons: one journal per process (the state folder's lock), one journal per inbox (its marker), and
the files in flight in a processing folder in the hands of one live daemon (the folder's lock)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from konfuzio_watch import lock_file, markers, processing
from konfuzio_watch.daemon import Daemon
from konfuzio_watch.journal import State
from konfuzio_watch.lock_file import Holder, LockFile, LockHeld
from konfuzio_watch.locks import DAEMON_LOCK_NAME, INBOX_LOCK_NAME, PROCESSING_LOCK_NAME, InboxLock, ProcessingLock
from konfuzio_watch.markers import MarkerKeeper
from konfuzio_watch.samples import make_pdf

from .conftest import drop, make_config, wait_until
from .helpers import (
    KONFUZIO_WATCH,
    DaemonProcess,
    FakeClock,
    cluster_node,
    documents_per_sha,
    pg_rows,
    waiting_in,
)

HOST = socket.gethostname()
SINCE = r"since (\d{4}-\d\d-\d\d )?\d\d:\d\d"


def second_daemon(tmp_path, emulator, first: DaemonProcess, **folders: str) -> DaemonProcess:  # type: ignore[no-untyped-def]
    """Another `run` with a copy of the first one's config: its own callback port."""
    root = tmp_path / "second"
    root.mkdir()
    shared = {name: str(first.root / name) for name in ("inbox", "done", "failed", "state")}
    return DaemonProcess(root, emulator, folders={**shared, **folders})


def refusal(daemon: DaemonProcess) -> str:
    daemon.start(wait_ready=False)
    assert daemon.proc
    assert daemon.proc.wait(20) == 1, daemon.log.read_text()
    return daemon.log.read_text()


@pytest.mark.slow
def test_a_second_daemon_on_the_same_state_folder_exits_at_once_naming_the_first(tmp_path, emulator):
    first = DaemonProcess(tmp_path, emulator)
    first.start()
    assert first.proc

    log = refusal(second_daemon(tmp_path, emulator, first))

    expected = (
        rf"konfuzio-watch: another konfuzio-watch \(pid {first.proc.pid} on host {re.escape(HOST)}, {SINCE}\) "
        rf"is running on {re.escape(str(tmp_path / 'state'))}; stop it first\n"
    )
    assert re.fullmatch(expected, log), log  # one line: no recovery, no traceback, nothing else
    holder = json.loads((tmp_path / "state" / DAEMON_LOCK_NAME).read_text())
    assert holder["pid"] == first.proc.pid, "the second daemon wrote the first one's lock file"
    assert requests.get(f"{holder['monitor_url']}/healthz", timeout=5).json()["status"] == "ok"

    data = make_pdf(label="only once")
    drop(tmp_path / "inbox" / "once.pdf", data)
    wait_until(lambda: first.done_count() == 1, 30, "once.pdf done")
    assert list(documents_per_sha(emulator).values()) == [1]
    assert first.terminate() == 0


@pytest.mark.slow
def test_a_second_daemon_with_its_own_state_folder_refuses_the_inbox(tmp_path, emulator):
    first = DaemonProcess(tmp_path, emulator)
    first.start()
    assert first.proc
    other_state = tmp_path / "second" / "state"

    log = refusal(second_daemon(tmp_path, emulator, first, state=str(other_state)))

    expected = (
        rf"konfuzio-watch: another konfuzio-watch \(pid {first.proc.pid} on host {re.escape(HOST)}, {SINCE}, "
        rf"state folder {re.escape(str(tmp_path / 'state'))}\) is watching the inbox "
        rf"{re.escape(str(tmp_path / 'inbox'))}; stop it first, or give each daemon its own inbox\n"
    )
    assert re.fullmatch(expected, log), log
    assert not (other_state / "journal.sqlite3").exists(), "refused only after opening its journal"
    assert json.loads((other_state / DAEMON_LOCK_NAME).read_text())["stopped_at"], "it kept its own lock"

    files = {f"f{i}.pdf": make_pdf(label=f"f{i}") for i in range(3)}
    for name, data in files.items():
        drop(tmp_path / "inbox" / name, data)
    wait_until(lambda: first.done_count() == 3, 30, "the first daemon's files done")
    assert sorted(documents_per_sha(emulator).values()) == [1, 1, 1], "a file was uploaded twice"
    assert first.terminate() == 0


@pytest.mark.slow
def test_two_daemons_in_one_process_on_one_state_folder(start_daemon, tmp_path, emulator):
    running = start_daemon()
    with pytest.raises(LockHeld) as refused:
        Daemon(running.config).start()
    assert str(refused.value).startswith(f"another konfuzio-watch (pid {os.getpid()} on host {HOST}, since ")
    drop(running.inbox / "still.pdf", make_pdf(label="still served"))
    running.wait_finished(1)
    # the thread-leak check proves the refused daemon started nothing


@pytest.mark.slow
def test_an_inbox_last_watched_with_another_journal_is_taken_over_with_one_warning(
    start_daemon, tmp_path, emulator, caplog
):
    caplog.set_level(logging.WARNING, logger="konfuzio_watch")
    first = start_daemon()
    first_id = first.daemon.journal.journal_id
    first.stop()
    marker = first.inbox / INBOX_LOCK_NAME
    assert json.loads(marker.read_text())["journal_id"] == first_id
    assert not [r for r in caplog.records if "another journal" in r.getMessage()]

    config = make_config(tmp_path, emulator, folders={"state": str(tmp_path / "state-2")})
    second = start_daemon(config)
    (warning,) = [r for r in caplog.records if "another journal" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert re.fullmatch(
        rf"the inbox {re.escape(str(first.inbox))} was last watched with another journal \(id "
        rf"{first_id}, state folder {re.escape(str(tmp_path / 'state'))}, pid {os.getpid()} on host "
        rf"{re.escape(HOST)}, {SINCE}\); taking it over: the files that journal left unfinished are "
        r"not in this one's",
        warning.getMessage(),
    ), warning.getMessage()
    mark = json.loads(marker.read_text())
    assert mark["journal_id"] == second.daemon.journal.journal_id != first_id
    assert (mark["state"], mark["pid"], mark["host"], mark["mode"]) == (
        str(tmp_path / "state-2"),
        os.getpid(),
        HOST,
        "single",
    )
    drop(second.inbox / "taken.pdf", make_pdf(label="taken over"))
    second.wait_finished(1)
    second.stop()

    caplog.clear()
    start_daemon(config).stop()  # the same journal again: nothing to say
    assert not [r for r in caplog.records if "another journal" in r.getMessage()]

    for leftover in (tmp_path / "state-2").glob("journal.sqlite3*"):  # a lost journal
        leftover.unlink()
    start_daemon(config).stop()
    assert [r for r in caplog.records if "another journal" in r.getMessage()]


@pytest.mark.slow
def test_status_and_retry_work_while_a_daemon_runs(tmp_path, emulator):
    daemon = DaemonProcess(tmp_path, emulator)
    daemon.start()
    assert daemon.proc
    drop(tmp_path / "inbox" / "notes.txt", b"not a document")
    wait_until(lambda: (tmp_path / "failed" / "notes.txt").exists(), 30, "notes.txt failed")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*KONFUZIO_WATCH, *args, "--config", str(daemon.config)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "LOG_TO_FILE": "False"},
        )

    status = cli("status")
    assert status.returncode == 0 and status.stderr == "", status.stderr
    lines = status.stdout.splitlines()
    assert re.fullmatch(rf"daemon: running \(pid {daemon.proc.pid} on host {re.escape(HOST)}, {SINCE}\)", lines[0])
    assert "  blocked: nothing" in lines
    assert f"{'failed':<11} {1:>5}" in lines

    retry = cli("retry", "--all-failed")
    assert retry.returncode == 0, retry.stderr
    assert "notes.txt: back in the inbox as notes.txt" in retry.stdout
    wait_until(
        lambda: (
            dict(daemon.journal("SELECT state, COUNT(*) FROM files GROUP BY state"))
            == {State.RETRIED.value: 1, State.FAILED.value: 1}
            and (tmp_path / "failed" / "notes.txt").exists()
        ),
        30,
        "the retried file back in failed/ (it is text)",
    )

    assert daemon.terminate() == 0
    after = cli("status")
    assert after.returncode == 0 and after.stdout.startswith("daemon: no daemon running\n"), after.stdout


# -- a marker removed or replaced while its daemon runs (FolderLock.verify) ------------------------------


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def marker_of(folder: Path) -> dict:
    return json.loads((folder / INBOX_LOCK_NAME).read_text())


@pytest.mark.parametrize("how", ["removed", "replaced by a stopped daemon's", "inbox renamed and recreated"])
def test_a_removed_or_replaced_marker_is_taken_again_and_rewritten(tmp_path, inbox, how):
    lock = InboxLock(inbox, tmp_path / "state").acquire()
    lock.claim("journal-1")
    written = marker_of(inbox)
    assert lock.verify() is True
    if how == "removed":
        (inbox / INBOX_LOCK_NAME).unlink()
    elif how == "replaced by a stopped daemon's":
        (inbox / INBOX_LOCK_NAME).unlink()
        (inbox / INBOX_LOCK_NAME).write_text(json.dumps({"journal_id": "journal-2", "pid": 1, "stopped_at": 5.0}))
    else:
        inbox.rename(tmp_path / "inbox-old")
        inbox.mkdir()

    assert lock.verify() is False
    assert marker_of(inbox) == written
    assert lock.verify() is True, "taken again: the path names the file held"
    with pytest.raises(LockHeld, match=r"\) is watching the inbox .*; stop it first"):
        InboxLock(inbox, tmp_path / "state-2").acquire()
    lock.release()
    assert marker_of(inbox)["stopped_at"]


def test_a_new_marker_another_process_holds_is_left_to_it(tmp_path, inbox):
    lock = InboxLock(inbox, tmp_path / "state").acquire()
    lock.claim("journal-1")
    (inbox / INBOX_LOCK_NAME).unlink()
    starting = InboxLock(inbox, tmp_path / "state-2").acquire()  # a second daemon, not yet through its start

    with pytest.raises(LockHeld) as held:
        lock.verify()
    assert held.value.holder == Holder(), "it has not written its name yet"
    assert not lock.file.in_place() and lock.file.held, "the old marker stays held meanwhile"
    assert (inbox / INBOX_LOCK_NAME).read_text() == "", "the other one's marker is left as it is"

    starting.release()  # it refused (its processing folder is the first one's)
    assert lock.verify() is False
    assert marker_of(inbox)["journal_id"] == "journal-1"
    lock.release()


@pytest.mark.parametrize(
    ("holder", "another"),
    [
        (Holder(pid=os.getpid(), host=HOST), False),  # this process: a marker copied from its own
        (Holder(pid=os.getppid(), host=HOST), True),
        (Holder(pid=os.getppid(), host=HOST, stopped_at=5.0), False),
        (Holder(pid=2**22 + 1, host=HOST), False),  # above pid_max: no such process
        (Holder(pid=os.getpid(), host="elsewhere"), True),  # cannot look: taken as running
        (Holder(), False),  # an empty marker: a daemon that has not written its name yet
    ],
)
def test_a_marker_names_another_running_process(holder, another):
    assert holder.is_another_process() is another


def test_a_marker_whose_folder_is_gone_stays_held_until_the_folder_is_back(tmp_path, inbox):
    lock = InboxLock(inbox, tmp_path / "state").acquire()
    lock.claim("journal-1")
    inbox.rename(tmp_path / "inbox-old")

    with pytest.raises(FileNotFoundError):
        lock.verify()
    assert lock.file.held
    inbox.mkdir()
    assert lock.verify() is False
    assert marker_of(inbox)["journal_id"] == "journal-1"
    lock.release()


def node_on(lock: InboxLock | ProcessingLock) -> InboxLock | ProcessingLock:
    """A node of a cluster takes the marker as at its start-up."""
    lock.acquire()
    lock.claim(lock.cluster_id or "")
    return lock


def test_the_nodes_of_a_cluster_take_a_removed_marker_again_together(tmp_path, inbox):
    nodes = [
        node_on(InboxLock(inbox, tmp_path / f"node-{n}", cluster_id="cluster-1", journal="pg://db")) for n in (1, 2)
    ]
    assert [n.first for n in nodes] == [True, False]
    (inbox / INBOX_LOCK_NAME).unlink()

    assert [n.verify() for n in reversed(nodes)] == [False, False]
    assert [n.first for n in nodes] == [False, True], "the one that looked first wrote it"
    mark = marker_of(inbox)
    assert (mark["mode"], mark["cluster_id"], mark["state"]) == ("cluster", "cluster-1", str(tmp_path / "node-2"))
    with pytest.raises(LockHeld, match="a cluster of konfuzio-watch nodes"):
        InboxLock(inbox, tmp_path / "single").acquire()
    with pytest.raises(LockHeld, match="another konfuzio-watch cluster"):
        InboxLock(inbox, tmp_path / "node-x", cluster_id="cluster-2").acquire()
    for node in nodes:
        node.release()
    assert marker_of(inbox)["stopped_at"], "the last node out says so"


def test_a_file_system_without_flock_gets_its_marker_back_too(tmp_path, inbox, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="konfuzio_watch")

    def no_flock(_fd: int, _op: int) -> None:  # what some SMB mounts answer; no such file system here
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_file.fcntl, "flock", no_flock)
    lock = InboxLock(inbox, tmp_path / "state").acquire()
    lock.claim("journal-1")
    (inbox / INBOX_LOCK_NAME).unlink()

    assert lock.verify() is False
    assert marker_of(inbox)["journal_id"] == "journal-1"
    (warning,) = caplog.records
    assert "this file system has no flock" in warning.getMessage()
    lock.release()


def test_the_processing_folder_lock_keeps_out_another_journal_but_not_the_nodes_of_one_cluster(tmp_path):
    folder = tmp_path / ".inbox.konfuzio-watch"
    processing.prepare(folder, tmp_path)
    single = ProcessingLock(folder, tmp_path / "state").acquire()
    single.claim("journal-1")
    with pytest.raises(LockHeld) as refused:
        ProcessingLock(folder, tmp_path / "state-2").acquire()
    assert re.fullmatch(
        rf"another konfuzio-watch \(pid {os.getpid()} on host {re.escape(HOST)}, {SINCE}, state folder "
        rf"{re.escape(str(tmp_path / 'state'))}\) has files in flight in the processing folder "
        rf"{re.escape(str(folder))}; stop it first, or give each daemon its own inbox",
        str(refused.value),
    ), refused.value
    with pytest.raises(LockHeld, match="with a journal of its own"):
        ProcessingLock(folder, tmp_path / "node-1", cluster_id="cluster-1").acquire()
    single.release()

    nodes = [node_on(ProcessingLock(folder, tmp_path / f"node-{n}", cluster_id="cluster-1")) for n in (1, 2)]
    with pytest.raises(LockHeld, match="another konfuzio-watch cluster"):
        ProcessingLock(folder, tmp_path / "node-x", cluster_id="cluster-2").acquire()
    with pytest.raises(LockHeld, match="a cluster of konfuzio-watch nodes"):
        ProcessingLock(folder, tmp_path / "state").acquire()
    for node in nodes:
        node.release()


def test_the_processing_folders_lock_is_never_taken_for_a_claimed_file(tmp_path):
    folder = tmp_path / "processing"
    folder.mkdir()
    (folder / PROCESSING_LOCK_NAME).write_text("{}")
    (folder / "0123456789abcdef-scan.pdf").write_bytes(b"%PDF")
    assert processing.names(folder) == [b"0123456789abcdef-scan.pdf"]


# -- the running daemon looks after its markers ------------------------------------------------------------


def test_a_new_marker_a_starting_daemon_holds_is_waited_out_and_one_a_running_daemon_holds_stops_this_one(
    tmp_path, inbox, caplog
):
    caplog.set_level(logging.WARNING, logger="konfuzio_watch")
    clock = FakeClock()
    folder = tmp_path / ".inbox.konfuzio-watch"
    processing.prepare(folder, inbox)
    taken = [InboxLock(inbox, tmp_path / "state").acquire(), ProcessingLock(folder, tmp_path / "state").acquire()]
    for lock in taken:
        lock.claim("journal-1")
    lost: list[str] = []
    keeper = MarkerKeeper(*taken, inbox=inbox, on_lost=lost.append, on_new_inbox=lambda _now: None)
    (inbox / INBOX_LOCK_NAME).unlink()
    other = LockFile(inbox / INBOX_LOCK_NAME)  # a second daemon, still starting: it wrote no name yet
    assert other.try_lock()

    keeper.tend(clock.now())
    keeper.tend(clock.advance(markers.MARKER_TAKEN_GRACE_S - 1))
    assert (lost, caplog.records) == ([], [])
    keeper.tend(clock.advance(1))
    keeper.tend(clock.advance(markers.MARKERS_EVERY_S))
    (waited,) = caplog.records
    assert (
        waited.levelno == logging.WARNING
        and "another process holds the new one without saying who it is (for "
        f"{markers.MARKER_TAKEN_GRACE_S:.0f} s now); this daemon goes on"
        in waited.getMessage()
    )
    assert taken[0].file.held and not lost

    other.write({"journal_id": "journal-2", "pid": os.getppid(), "host": HOST, "mode": "single"})  # it runs now
    keeper.tend(clock.advance(markers.MARKERS_EVERY_S))
    assert lost == [keeper.lost] and keeper.lost
    assert keeper.lost.startswith(f"another konfuzio-watch (pid {os.getppid()} on host {HOST}) is watching the inbox")
    assert caplog.records[-1].levelno == logging.ERROR
    other.close()
    for lock in taken:
        lock.release()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["removed", "inbox renamed and recreated"])
def test_a_running_daemon_takes_its_inbox_marker_again_within_seconds(start_daemon, tmp_path, emulator, caplog, how):
    caplog.set_level(logging.WARNING, logger="konfuzio_watch")
    running = start_daemon()
    assert running.daemon.journal
    written = marker_of(running.inbox)
    if how == "removed":
        (running.inbox / INBOX_LOCK_NAME).unlink()
    else:
        running.inbox.rename(tmp_path / "inbox-old")
        running.inbox.mkdir()

    taken_at = time.monotonic()
    (warning,) = wait_until(lambda: [r for r in caplog.records if r.name == "konfuzio_watch"], 10, "the marker back")
    assert time.monotonic() - taken_at < markers.MARKERS_EVERY_S + 1
    assert warning.levelno == logging.WARNING and warning.getMessage() == (
        f"the inbox's marker {running.inbox / INBOX_LOCK_NAME} was removed or replaced (by an inbox writer, or the "
        "inbox was renamed and recreated) while this daemon ran; it holds it again"
    )
    assert marker_of(running.inbox) == written
    with pytest.raises(LockHeld, match=r"\) is watching the inbox "):
        Daemon(make_config(tmp_path, emulator, folders={"state": str(tmp_path / "state-2")})).start()
    drop(running.inbox / "after.pdf", make_pdf(label="after"))
    running.daemon.request_rescan()  # a renamed inbox's watch followed the old folder
    running.wait_finished(1)


@pytest.mark.slow
def test_a_second_daemon_refuses_a_processing_folder_a_live_daemon_uses(start_daemon, tmp_path, emulator, monkeypatch):
    monkeypatch.setattr(markers, "MARKERS_EVERY_S", 3600.0)  # the first daemon does not look meanwhile
    emulator.knobs.processing_s = 60  # the file waits in the processing folder
    running = start_daemon()
    drop(running.inbox / "flight.pdf", make_pdf(label="in flight"))
    wait_until(lambda: running.counts()[State.UPLOADED] == 1, 10, "flight.pdf uploaded")
    (running.inbox / INBOX_LOCK_NAME).unlink()
    second_state = tmp_path / "state-2"

    with pytest.raises(LockHeld) as refused:
        Daemon(make_config(tmp_path, emulator, folders={"state": str(second_state)})).start()
    assert re.fullmatch(
        rf"another konfuzio-watch \(pid {os.getpid()} on host {re.escape(HOST)}, {SINCE}, state folder "
        rf"{re.escape(str(tmp_path / 'state'))}\) has files in flight in the processing folder "
        rf"{re.escape(str(running.daemon.processing_dir))}; stop it first, or give each daemon its "
        "own inbox",
        str(refused.value),
    ), refused.value
    assert running.daemon.processing_dir
    assert len(waiting_in(running.daemon.processing_dir)) == 1, "taken out of the first daemon's hands"
    assert (running.inbox / INBOX_LOCK_NAME).read_text() == "", "the second daemon wrote its name into the marker"
    assert [p.name for p in running.inbox.iterdir()] == [INBOX_LOCK_NAME]
    assert len(emulator.uploads) == 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["lock removed", "folder moved away"])
def test_a_running_daemon_takes_its_processing_folders_lock_again(start_daemon, tmp_path, caplog, how):
    caplog.set_level(logging.WARNING, logger="konfuzio_watch")
    running = start_daemon()
    folder = running.daemon.processing_dir
    assert folder
    lock = folder / PROCESSING_LOCK_NAME
    written = json.loads(lock.read_text())
    if how == "lock removed":
        lock.unlink()
        now = f"{lock} (deleted)"
    else:
        folder.rename(tmp_path / "moved")
        now = str(tmp_path / "moved" / PROCESSING_LOCK_NAME)

    (warning,) = wait_until(lambda: [r for r in caplog.records if r.name == "konfuzio_watch"], 10, "the lock back")
    assert json.loads(lock.read_text()) == written
    assert folder.stat().st_mode & 0o777 == 0o700
    assert warning.getMessage().startswith(
        f"the lock {lock} of the processing folder was removed or replaced while "
        f"this daemon ran (the one it held is now {now}); it holds it again"
    )
    assert running.daemon.pipeline and running.daemon.pipeline.ctx.holds_processing_dir()


@pytest.mark.slow
def test_files_without_a_row_are_left_alone_in_a_processing_folder_not_locked(start_daemon, tmp_path, monkeypatch):
    monkeypatch.setattr(markers, "MARKERS_EVERY_S", 3600.0)
    running = start_daemon()
    folder = running.daemon.processing_dir
    assert folder and running.daemon.pipeline and running.daemon.scheduler
    look = next(duty for duty in running.daemon.scheduler.duties if duty.name == "markers")
    wait_until(lambda: look.runs, 10, "the loop's first look at the markers (the next is seconds away)")
    folder.rename(tmp_path / "moved")
    folder.mkdir(mode=0o700)  # another daemon's now, say
    planted = folder / "0123456789abcdef-theirs.pdf"
    planted.write_bytes(make_pdf(label="theirs"))

    assert running.daemon.pipeline.adopt_orphans() == []
    assert planted.exists()


@pytest.mark.slow
def test_a_daemon_whose_inbox_marker_another_running_daemon_took_stops_and_refuses_to_start(
    tmp_path, emulator, daemon_process
):
    first = daemon_process()
    first.start()
    assert first.proc
    marker = tmp_path / "inbox" / INBOX_LOCK_NAME
    marker.unlink()
    taker = LockFile(marker)  # this test process, as another daemon that took the marker and runs
    assert taker.try_lock()
    taker.write(
        {
            "journal_id": "journal-2",
            "pid": os.getpid(),
            "host": HOST,
            "state": "/elsewhere",
            "mode": "single",
            "started_at": time.time(),
        }
    )
    try:
        assert first.proc.wait(10) == 1
        log = first.log.read_text()
        assert re.search(
            rf"ERROR +{re.escape(str(marker))} was removed or replaced while this daemon ran, and now "
            rf"another konfuzio-watch \(pid {os.getpid()} on host {re.escape(HOST)}, {SINCE}, state "
            r"folder /elsewhere\) is watching the inbox .*: stopping\n",
            log,
        ), log
        assert json.loads(marker.read_text())["journal_id"] == "journal-2", "it left the other one's marker alone"

        first.start(wait_ready=False)  # systemd restarts it
        assert first.proc.wait(20) == 1
        assert f"(pid {os.getpid()} on host {HOST}" in first.log.read_text().splitlines()[-1]
    finally:
        taker.close()
    first.start()
    assert first.terminate() == 0


@pytest.mark.slow
def test_an_inbox_renamed_away_with_the_processing_folder_in_it_loses_no_file(
    start_daemon, tmp_path, emulator, caplog, monkeypatch
):
    """The processing folder inside the inbox (``<inbox>/.konfuzio-watch/processing``, the fallback when
    the inbox's parent is not writable, or configured so) goes with it when the inbox is renamed away."""
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    monkeypatch.setattr(markers, "MARKERS_EVERY_S", 0.5)  # a shorter test
    emulator.knobs.processing_s = 1.5  # the files wait in the processing folder meanwhile
    inbox = tmp_path / "inbox"
    running = start_daemon(folders={"processing": str(inbox / ".konfuzio-watch" / "processing")})
    files = {f"nested-{i}.pdf": make_pdf(label=f"nested {i}") for i in range(4)}
    for name, data in files.items():
        drop(inbox / name, data)
    wait_until(lambda: running.counts()[State.UPLOADED] == len(files), 10, "every file uploaded")

    inbox.rename(tmp_path / "inbox-old")
    inbox.mkdir()
    running.wait_finished(len(files), timeout_s=20)
    emulator.knobs.processing_s = 0.2
    files["later.pdf"] = make_pdf(label="later")
    drop(inbox / "later.pdf", files["later.pdf"])  # the new folder is watched
    running.wait_finished(len(files), timeout_s=10)

    assert running.counts()[State.DONE] == len(files) and not list(running.failed.iterdir())
    for name, data in files.items():
        assert (running.done / name).read_bytes() == data
    assert sorted(documents_per_sha(emulator).values()) == [1] * len(files)
    assert not waiting_in(tmp_path / "inbox-old" / ".konfuzio-watch" / "processing")
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 2, said
    assert said[1].endswith(
        f", and moved the 4 file(s) in flight back from {tmp_path / 'inbox-old' / '.konfuzio-watch' / 'processing'}"
    ), said


# -- the marker removed while a daemon runs: a second daemon must not take the files in flight ----------


def files_in_flight(tmp_path, emulator, first: DaemonProcess, n: int) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """``n`` files uploaded by ``first`` and waiting for their results in its processing folder."""
    files = {f"flight-{i:02d}.pdf": make_pdf(label=f"in flight {i}") for i in range(n)}
    for name, data in files.items():
        drop(tmp_path / "inbox" / name, data)
    wait_until(
        lambda: first.journal("SELECT COUNT(*) FROM files WHERE state = 'uploaded'") == [(n,)],
        30,
        "every file uploaded, waiting for its result",
    )
    return files


def outcome(tmp_path, emulator, files: dict[str, bytes]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The issue's figures: files, done, duplicate documents, error reports in failed/."""
    per_sha = documents_per_sha(emulator)
    shas = {hashlib.sha256(data).hexdigest() for data in files.values()}
    done = [p for p in (tmp_path / "done").rglob("*") if p.is_file() and not p.name.endswith(".json")]
    return {
        "files": len(files),
        "done": sum(hashlib.sha256(p.read_bytes()).hexdigest() in shas for p in done),
        "duplicate documents": sum(per_sha[sha] - 1 for sha in shas if per_sha[sha] > 1),
        "error reports in failed/": len(list((tmp_path / "failed").rglob("*.error.json"))),
    }


def settled(*daemons: DaemonProcess) -> bool:
    """Every daemon still running has nothing unfinished in its journal."""
    return all(
        d.proc is None
        or d.proc.poll() is not None
        or not d.journal("SELECT 1 FROM files WHERE state NOT IN ('done', 'failed', 'retried') LIMIT 1")
        for d in daemons
    )


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["marker removed", "inbox renamed and recreated"])
def test_a_second_daemon_never_takes_the_files_in_flight_of_a_running_one(tmp_path, emulator, daemon_process, attack):
    emulator.knobs.processing_s = 6.0  # the files wait in the processing folder meanwhile
    first = daemon_process()
    first.start()
    assert first.proc
    files = files_in_flight(tmp_path, emulator, first, 12)
    inbox = tmp_path / "inbox"
    if attack == "marker removed":
        (inbox / INBOX_LOCK_NAME).unlink()  # any inbox writer may
    else:
        inbox.rename(tmp_path / "inbox-old")  # whoever may write the inbox's parent
        inbox.mkdir()
    second = second_daemon(tmp_path, emulator, first, state=str(tmp_path / "second" / "state"))
    second.start(wait_ready=False)
    assert second.proc
    try:
        wait_until(lambda: second.proc.poll() is not None or second.is_ready(), 30, "the second daemon decided")
        wait_until(
            lambda: first.done_count() >= len(files) and settled(first, second),
            60,
            lambda: f"every file finished ({outcome(tmp_path, emulator, files)})",
        )
        figures = outcome(tmp_path, emulator, files)
        assert figures == {"files": 12, "done": 12, "duplicate documents": 0, "error reports in failed/": 0}, figures
        assert second.proc.wait(10) == 1, second.log.read_text()
        assert f"(pid {first.proc.pid} on host {HOST}" in second.log.read_text()
        marker = wait_until(
            lambda: json.loads((inbox / INBOX_LOCK_NAME).read_text() or "{}"),
            10,
            "the first daemon's marker back in the inbox",
        )
        assert (marker["pid"], marker["state"]) == (first.proc.pid, str(tmp_path / "state")), marker
        warnings = [line for line in first.log.read_text().splitlines() if " WARNING " in line or " ERROR " in line]
        assert len(warnings) == 1 and "it holds it again" in warnings[0], warnings
        assert first.terminate() == 0
    finally:
        second.cleanup()


@pytest.mark.slow
@pytest.mark.postgres
def test_cluster_nodes_take_their_removed_marker_again_and_a_dead_nodes_files_still_pass_on(tmp_path, emulator, pg_url):
    emulator.knobs.processing_s = 4.0  # the files wait in the shared processing folder
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    nodes = [cluster_node(tmp_path, n, emulator, pg_url) for n in ("a", "b")]
    (tmp_path / "single").mkdir()
    single = DaemonProcess(
        tmp_path / "single",
        emulator,
        folders={  # a daemon with a journal of its own
            "inbox": str(inbox),
            "done": str(tmp_path / "done"),
            "failed": str(tmp_path / "failed"),
            "state": str(tmp_path / "single" / "state"),
        },
    )
    try:
        for node in nodes:
            node.start()
        files = {f"node-{i:02d}.pdf": make_pdf(label=f"cluster {i}") for i in range(10)}
        for name, data in files.items():
            drop(inbox / name, data)
        waiting = "SELECT COUNT(*) FROM files WHERE state = 'uploaded'"
        wait_until(lambda: pg_rows(pg_url, waiting) == [(10,)], 30, "every file uploaded, waiting for its result")
        (inbox / INBOX_LOCK_NAME).unlink()
        nodes[1].kill9()  # with its files in flight: they pass to node a through the journal

        mark = wait_until(lambda: (inbox / INBOX_LOCK_NAME).exists() and marker_of(inbox), 10, "the marker back")
        assert (mark["mode"], mark["state"]) == ("cluster", str(tmp_path / "node-a" / "state")), mark
        single.start(wait_ready=False)
        assert single.proc and single.proc.wait(20) == 1
        assert "a cluster of konfuzio-watch nodes" in single.log.read_text(), single.log.read_text()
        wait_until(
            lambda: len(list((tmp_path / "done").glob("*.json"))) >= len(files),
            60,
            lambda: f"every file done ({outcome(tmp_path, emulator, files)})\n{nodes[0].log.read_text()}",
        )
        assert outcome(tmp_path, emulator, files) == {
            "files": 10,
            "done": 10,
            "duplicate documents": 0,
            "error reports in failed/": 0,
        }
        assert nodes[0].terminate() == 0
        assert marker_of(inbox)["stopped_at"]
    finally:
        for daemon in (*nodes, single):
            daemon.cleanup()
