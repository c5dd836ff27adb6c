"""Two daemons: one journal per process (the state folder's lock), one journal per inbox (its marker)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess

import pytest
import requests

from konfuzio_watch.daemon import Daemon
from konfuzio_watch.journal import State
from konfuzio_watch.locks import DAEMON_LOCK_NAME, INBOX_LOCK_NAME, LockHeld
from konfuzio_watch.samples import make_pdf

from .conftest import drop, make_config, wait_until
from .helpers import KONFUZIO_WATCH, DaemonProcess, documents_per_sha

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

