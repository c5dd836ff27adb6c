"""What users saw when failures were decided in seven places, each reproduced end to end:
a full journal disk, an unreadable file, a far-future Retry-After, a clock stepped back, and
GETs answered 401/403/400."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from konfuzio_watch.emulator.faults import FaultRule
from konfuzio_watch.samples import make_pdf, make_png

from .conftest import TOKEN, drop, wait_until
from .helpers import AS_NOBODY, DaemonProcess, assert_own_result, can_drop_privileges

pytestmark = pytest.mark.slow  # every test starts the daemon against the emulator

FAKE_WALL = Path(__file__).with_name("fakewall")


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# -- 1. the journal's disk is full --------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "32m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (65536, 4096, 512):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * block)
    finally:
        os.close(fd)
    return filler


def test_a_full_journal_disk_pauses_everything_quietly_and_resumes_at_once(tmp_path, emulator):
    state = tmp_path / "state"
    with small_tmpfs(state):
        daemon = DaemonProcess(tmp_path, emulator, watch={"settle_seconds": 0.2, "rescan_interval": 300})
        try:
            daemon.start()
            filler = fill(state)
            files = {f"full/{i:03d}.pdf": make_pdf(label=f"full {i}") for i in range(100)}
            log_before = daemon.log.read_text()
            for rel, data in files.items():
                drop(tmp_path / "inbox" / rel, data)
            wait_until(
                lambda: "the journal cannot be written" in daemon.log.read_text(),
                30,
                lambda: f"the full journal reported (log: {daemon.log.read_text()[-1500:]})",
            )
            # (the same 3 s on a fake clock, the loop alone: test_scheduler.py, a full journal)
            time.sleep(3.0)  # a measurement window, not a wait: the disk stays full for 3 s
            during = daemon.log.read_text()[len(log_before) :]

            filler.unlink()
            freed = time.monotonic()
            wait_until(
                lambda: daemon.done_count() == len(files),
                30,
                lambda: f"all {len(files)} files done after space came back (have {daemon.done_count()})",
            )
            resumed_in = time.monotonic() - freed
            assert daemon.terminate() == 0
        finally:
            daemon.cleanup()
    lines = during.splitlines()
    print(
        f"\ndisk full: {len(lines)} log lines in the full window; last file done {resumed_in:.2f} s after "
        f"space came back"
    )  # figures for the record (pytest -s)
    assert "Traceback" not in during, f"a traceback per failed write: {during[:2000]}"
    assert len(lines) < 40, f"{len(lines)} log lines while the disk was full: {lines[:40]}"
    # far more than the 100 files need; the rescan that would otherwise find them is 300 s away
    assert resumed_in < 20, f"{resumed_in:.1f} s from free space to the last file done"
    for rel, data in files.items():
        assert (tmp_path / "done" / rel).read_bytes() == data
    assert len(emulator.uploads) == len(files)


# -- 2. a file the daemon cannot read ----------------------------------------------------------


@pytest.mark.skipif(not can_drop_privileges(), reason="needs root and setpriv to run the daemon as nobody")
def test_a_file_the_daemon_cannot_read_stays_in_the_inbox_until_it_may(emulator):
    """It used to be claimed into the hidden processing folder under a number, where its owner
    could no longer see it, and failed there. Now it stays in the inbox under its own name."""
    root = Path(tempfile.mkdtemp(prefix="kw-unreadable-", dir="/tmp"))  # pytest's tmp is 0700: nobody can't enter
    os.chmod(root, 0o755)
    for name in ("inbox", "done", "failed", "state"):
        (root / name).mkdir()
    daemon = DaemonProcess(root, emulator)
    try:
        subprocess.run(["chown", "-R", "65534:65534", str(root)], check=True)
        daemon.start(prefix=AS_NOBODY)
        secret = root / "inbox" / "other-user.pdf"
        data = make_pdf(label="mode 0600, owned by root")
        staged = root / "other-user.pdf"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owned by root, unreadable from the start
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(staged, secret)
        warning = (
            "other-user.pdf: cannot read it (Permission denied); it stays in the inbox until konfuzio-watch may read it"
        )
        wait_until(
            lambda: warning in daemon.log.read_text(),
            30,
            lambda: f"the warning (log: {daemon.log.read_text()[-1500:]})",
        )
        other = make_pdf(label="readable")
        drop(root / "inbox" / "readable.pdf", other)  # dropped later, finished first
        wait_until(lambda: (root / "done" / "readable.pdf.json").exists(), 60, "the readable file done")

        assert secret.read_bytes() == data, "still in the inbox under its name"
        assert [r[0] for r in daemon.journal("SELECT rel_path FROM files")] == [b"readable.pdf"]
        assert daemon.log.read_text().count("cannot read it") == 1, "logged once, not at every look"
        assert [u.data_file_name for u in emulator.uploads] == ["readable.pdf"]

        os.chmod(secret, 0o644)  # its owner lets the daemon read it: a chmod event
        # the JSON is placed before the file itself: wait for both
        wait_until(
            lambda: (root / "done" / "other-user.pdf").exists() and (root / "done" / "other-user.pdf.json").exists(),
            60,
            "the file done once readable",
        )
        assert (root / "done" / "other-user.pdf").read_bytes() == data
        assert daemon.log.read_text().count("may read it now; it is taken in as usual") == 1
        assert list((root / "failed").iterdir()) == []
        assert daemon.terminate() == 0
    finally:
        daemon.cleanup()
        shutil.rmtree(root, ignore_errors=True)


# -- 3. a far-future Retry-After --------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["999999999", "Thu, 31 Dec 2099 23:59:59 GMT"])
def test_a_far_future_retry_after_pauses_uploads_for_the_backoff_cap_only(start_daemon, emulator, caplog, retry_after):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    emulator.knobs.retry_after_s = retry_after
    emulator.knobs.rate_429 = 1.0
    running = start_daemon(upload={"backoff_base_seconds": 0.1, "backoff_cap_seconds": 1.0})
    files = {f"t{i}.pdf": make_pdf(label=f"throttled {i}") for i in range(5)}
    for name, data in files.items():
        drop(running.inbox / name, data)
    wait_until(lambda: logged(caplog, "429"), 20, "uploads throttled")
    emulator.knobs.rate_429 = 0.0

    running.wait_finished(5, timeout_s=15)  # the cap is 1 s: not an hour
    for name, data in files.items():
        assert_own_result(running.done, name, data)
    assert logged(caplog, "cut to the backoff cap of 1 s"), "the capped Retry-After is said once"


def test_a_restart_clears_a_pause_from_a_far_future_retry_after(start_daemon, emulator, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    emulator.knobs.retry_after_s = "999999999"
    emulator.knobs.rate_429 = 1.0
    running = start_daemon(upload={"backoff_base_seconds": 10, "backoff_cap_seconds": 3600})
    data = make_pdf(label="throttled before a restart")
    drop(running.inbox / "r.pdf", data)
    wait_until(lambda: logged(caplog, "429"), 20, "the upload throttled")
    running.stop()
    emulator.knobs.rate_429 = 0.0

    again = start_daemon(running.config)
    again.wait_finished(1, timeout_s=15)
    assert_own_result(again.done, "r.pdf", data)


# -- 4. the wall clock is set back -------------------------------------------------------------


def test_a_wall_clock_stepped_back_an_hour_does_not_stall_polling(daemon_process, emulator, tmp_path, monkeypatch):
    emulator.knobs.callback_loss = 1.0  # results come by polling only
    offset = tmp_path / "wall-offset"
    offset.write_text("0")
    monkeypatch.setenv("FAKE_WALL_OFFSET_FILE", str(offset))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_WALL), os.environ.get("PYTHONPATH")])))
    daemon = daemon_process(results={"callback_timeout": 1.0, "poll_interval": 0.5})
    daemon.start()
    files = {f"c{i}.png": make_png(label=f"clock {i}") for i in range(3)}
    for name, data in files.items():
        drop(tmp_path / "inbox" / name, data)
    wait_until(
        lambda: daemon.journal("SELECT COUNT(*) FROM files WHERE state = 'uploaded'")[0][0] == 3,
        30,
        "all three uploaded and waiting for a poll",
    )

    offset.write_text("-3600")  # the wall clock jumps back one hour

    wait_until(lambda: daemon.done_count() == 3, 20, "polled and done although the wall clock went back")
    assert daemon.terminate() == 0


# -- 5. GETs answered 401, 403, 400; failure counts that survive a restart ----------------------


def rejected_for_a_while(emulator, path: str, status: int) -> FaultRule:  # type: ignore[no-untyped-def]
    """Once the upload is stored: requests to ``path`` answered ``status`` for 2 s (then the token works)."""
    wait_until(lambda: emulator.uploads, 20, "the upload stored")
    rule = FaultRule("GET", path, status, until=time.time() + 2.0)
    emulator.knobs.fault_rules = [rule]
    return rule


def test_a_rejected_bbox_request_blocks_instead_of_exporting_without_boxes(start_daemon, emulator, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    emulator.knobs.processing_s = 1.0  # done after the fault is in place
    running = start_daemon(upload={"backoff_base_seconds": 0.1, "backoff_cap_seconds": 0.5})
    data = make_pdf(label="boxes matter")
    drop(running.inbox / "boxes.pdf", data)
    rule = rejected_for_a_while(emulator, r"/bbox/?$", 401)

    running.wait_finished(1, timeout_s=20)
    assert rule.hits >= 1, "the fault was never hit"
    assert_own_result(running.done, "boxes.pdf", data)  # with its boxes
    assert logged(caplog, "Konfuzio rejected the API token")


def test_a_rejected_details_request_is_not_retried_forever(start_daemon, emulator, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    emulator.knobs.processing_s = 1.0
    running = start_daemon(upload={"backoff_base_seconds": 0.1, "backoff_cap_seconds": 0.5})
    data = make_png(label="403 then fine")
    drop(running.inbox / "forbidden.png", data)
    rule = rejected_for_a_while(emulator, r"^/api/v3/documents/\d+/?$", 403)
    running.wait_finished(1, timeout_s=20)
    assert rule.hits >= 1, "the fault was never hit"
    assert_own_result(running.done, "forbidden.png", data)
    assert len(logged(caplog, "Konfuzio rejected the API token")) == 1, "said once, not per try"


def test_a_details_request_answered_400_fails_the_file_with_the_reason(start_daemon, emulator):
    emulator.knobs.fault_rules = [
        FaultRule("GET", r"^/api/v3/documents/\d+/?$", 400, body={"detail": "Malformed document."})
    ]
    running = start_daemon()
    drop(running.inbox / "bad-request.pdf", make_pdf(label="400"))
    running.wait_finished(1, timeout_s=20)
    report = json.loads((running.failed / "bad-request.pdf.error.json").read_text())
    assert report["stage"] == "result" and "400" in report["error"] and "Malformed document" in report["error"]


def test_a_files_failure_count_survives_a_restart(start_daemon, emulator):
    emulator.knobs.fault_rules = [FaultRule("GET", r"^/api/v3/documents/\d+/?$", 500)]
    running = start_daemon(
        upload={"backoff_base_seconds": 0.05, "backoff_cap_seconds": 0.2}, results={"max_failures": 6}
    )
    drop(running.inbox / "flaky.pdf", make_pdf(label="500s"))
    wait_until(lambda: [r for r in running.daemon.journal.rows() if r.failures >= 3], 20, "three failed fetches")
    running.stop()

    again = start_daemon(running.config)
    again.wait_finished(1, timeout_s=20)
    report = json.loads((again.failed / "flaky.pdf.error.json").read_text())
    assert "gave up after 6 failures" in report["error"] and "HTTP 500" in report["error"]
    assert emulator.knobs.fault_rules[0].hits == 6, "the count went on after the restart instead of starting over"


def test_a_success_clears_the_failure_count_and_the_error(emulator, start_daemon):
    emulator.knobs.fault_rules = [FaultRule("GET", r"^/api/v3/documents/\d+/?$", 500, count=2)]
    running = start_daemon(upload={"backoff_base_seconds": 0.05, "backoff_cap_seconds": 0.2})
    data = make_pdf(label="two 500s")
    drop(running.inbox / "twice.pdf", data)
    running.wait_finished(1, timeout_s=20)
    assert_own_result(running.done, "twice.pdf", data)
    row = running.daemon.journal.rows(limit=1)[0]
    assert row.failures == 0 and row.error is None, "a success clears the count and the error"


def test_the_token_is_never_in_a_gate_message(start_daemon, emulator, caplog):
    caplog.set_level(logging.DEBUG, logger="konfuzio_watch")
    emulator.knobs.fault_rules = [FaultRule("*", ".*", 401, until=time.time() + 1.0)]
    running = start_daemon(upload={"backoff_base_seconds": 0.1, "backoff_cap_seconds": 0.3})
    drop(running.inbox / "t.pdf", make_pdf(label="t"))
    running.wait_finished(1, timeout_s=20)
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]
