"""Two daemons: one journal per process (the state folder's lock), one journal per inbox (its marker), and
the files in flight in a processing folder in the hands of one live daemon (the folder's lock)."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import requests

from konfuzio_watch import locks, processing
from konfuzio_watch.daemon import Daemon
from konfuzio_watch.journal import State
from konfuzio_watch.locks import (
    DAEMON_LOCK_NAME,
    INBOX_LOCK_NAME,
    PROCESSING_LOCK_NAME,
    Holder,
    InboxLock,
    LockHeld,
    ProcessingLock,
)
from konfuzio_watch.samples import make_pdf

from .conftest import drop, make_config, wait_until
from .helpers import (
    KONFUZIO_WATCH,
    DaemonProcess,
    documents_per_sha,
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


def test_a_second_daemon_on_the_same_state_folder_exits_at_once_naming_the_first(tmp_path, emulator):
    first = DaemonProcess(tmp_path, emulator)
    first.start()
    assert first.proc

    log = refusal(second_daemon(tmp_path, emulator, first))

    expected = (rf"konfuzio-watch: another konfuzio-watch \(pid {first.proc.pid} on host {re.escape(HOST)}, {SINCE}\) "
                rf"is running on {re.escape(str(tmp_path / 'state'))}; stop it first\n")
    assert re.fullmatch(expected, log), log  # one line: no recovery, no traceback, nothing else
    holder = json.loads((tmp_path / "state" / DAEMON_LOCK_NAME).read_text())
    assert holder["pid"] == first.proc.pid, "the second daemon wrote the first one's lock file"
    assert requests.get(f"{holder['monitor_url']}/healthz", timeout=5).json()["status"] == "ok"

    data = make_pdf(label="only once")
    drop(tmp_path / "inbox" / "once.pdf", data)
    wait_until(lambda: first.done_count() == 1, 30, "once.pdf done")
    assert list(documents_per_sha(emulator).values()) == [1]
    assert first.terminate() == 0


def test_a_second_daemon_with_its_own_state_folder_refuses_the_inbox(tmp_path, emulator):
    first = DaemonProcess(tmp_path, emulator)
    first.start()
    assert first.proc
    other_state = tmp_path / "second" / "state"

    log = refusal(second_daemon(tmp_path, emulator, first, state=str(other_state)))

    expected = (rf"konfuzio-watch: another konfuzio-watch \(pid {first.proc.pid} on host {re.escape(HOST)}, {SINCE}, "
                rf"state folder {re.escape(str(tmp_path / 'state'))}\) is watching the inbox "
                rf"{re.escape(str(tmp_path / 'inbox'))}; stop it first, or give each daemon its own inbox\n")
    assert re.fullmatch(expected, log), log
    assert not (other_state / "journal.sqlite3").exists(), "refused only after opening its journal"
    assert json.loads((other_state / DAEMON_LOCK_NAME).read_text())["stopped_at"], "it kept its own lock"

    files = {f"f{i}.pdf": make_pdf(label=f"f{i}") for i in range(3)}
    for name, data in files.items():
        drop(tmp_path / "inbox" / name, data)
    wait_until(lambda: first.done_count() == 3, 30, "the first daemon's files done")
    assert sorted(documents_per_sha(emulator).values()) == [1, 1, 1], "a file was uploaded twice"
    assert first.terminate() == 0


def test_two_daemons_in_one_process_on_one_state_folder(start_daemon, tmp_path, emulator):
    running = start_daemon()
    with pytest.raises(LockHeld) as refused:
        Daemon(running.config).start()
    assert str(refused.value).startswith(f"another konfuzio-watch (pid {os.getpid()} on host {HOST}, since ")
    drop(running.inbox / "still.pdf", make_pdf(label="still served"))
    running.wait_finished(1)
    # the thread-leak check proves the refused daemon started nothing


def test_an_inbox_last_watched_with_another_journal_is_taken_over_with_one_warning(
        start_daemon, tmp_path, emulator, caplog):
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
    assert re.fullmatch(rf"the inbox {re.escape(str(first.inbox))} was last watched with another journal \(id "
                        rf"{first_id}, state folder {re.escape(str(tmp_path / 'state'))}, pid {os.getpid()} on host "
                        rf"{re.escape(HOST)}, {SINCE}\); taking it over: the files that journal left unfinished are "
                        r"not in this one's", warning.getMessage()), warning.getMessage()
    mark = json.loads(marker.read_text())
    assert mark["journal_id"] == second.daemon.journal.journal_id != first_id
    assert (mark["state"], mark["pid"], mark["host"], mark["mode"]) == (str(tmp_path / "state-2"), os.getpid(), HOST,
                                                                        "single")
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


def test_status_and_retry_work_while_a_daemon_runs(tmp_path, emulator):
    daemon = DaemonProcess(tmp_path, emulator)
    daemon.start()
    assert daemon.proc
    drop(tmp_path / "inbox" / "notes.txt", b"not a document")
    wait_until(lambda: (tmp_path / "failed" / "notes.txt").exists(), 30, "notes.txt failed")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*KONFUZIO_WATCH, *args, "--config", str(daemon.config)], capture_output=True,
                              text=True, timeout=30, env={**os.environ, "LOG_TO_FILE": "False"})

    status = cli("status")
    assert status.returncode == 0 and status.stderr == "", status.stderr
    lines = status.stdout.splitlines()
    assert re.fullmatch(rf"daemon: running \(pid {daemon.proc.pid} on host {re.escape(HOST)}, {SINCE}\)", lines[0])
    assert "  blocked: nothing" in lines
    assert f"{'failed':<11} {1:>5}" in lines

    retry = cli("retry", "--all-failed")
    assert retry.returncode == 0, retry.stderr
    assert "notes.txt: back in the inbox as notes.txt" in retry.stdout
    wait_until(lambda: dict(daemon.journal("SELECT state, COUNT(*) FROM files GROUP BY state")) == {
        State.RETRIED.value: 1, State.FAILED.value: 1} and (tmp_path / "failed" / "notes.txt").exists(), 30,
        "the retried file back in failed/ (it is text)")

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


@pytest.mark.parametrize(("holder", "another"), [
    (Holder(pid=os.getpid(), host=HOST), False),  # this process: a marker copied from its own
    (Holder(pid=os.getppid(), host=HOST), True),
    (Holder(pid=os.getppid(), host=HOST, stopped_at=5.0), False),
    (Holder(pid=2**22 + 1, host=HOST), False),  # above pid_max: no such process
    (Holder(pid=os.getpid(), host="elsewhere"), True),  # cannot look: taken as running
    (Holder(), False),  # an empty marker: a daemon that has not written its name yet
])
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
    nodes = [node_on(InboxLock(inbox, tmp_path / f"node-{n}", cluster_id="cluster-1", journal="pg://db"))
             for n in (1, 2)]
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

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
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
    assert re.fullmatch(rf"another konfuzio-watch \(pid {os.getpid()} on host {re.escape(HOST)}, {SINCE}, state folder "
                        rf"{re.escape(str(tmp_path / 'state'))}\) has files in flight in the processing folder "
                        rf"{re.escape(str(folder))}; stop it first, or give each daemon its own inbox",
                        str(refused.value)), refused.value
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
