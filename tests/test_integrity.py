"""Integrity in the field: nothing doubled, nothing under another file's name, nothing reported
done that isn't. Each case was reproduced on a real setup; each test runs the real daemon."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from konfuzio_watch.config import ConfigError
from konfuzio_watch.daemon import Daemon
from konfuzio_watch.emulator.faults import FaultRule
from konfuzio_watch.journal import State
from konfuzio_watch.samples import make_pdf, make_png

from .conftest import drop, make_config, wait_until
from .helpers import assert_own_result, callback_url_of, documents_per_sha, inbox_files, waiting_in

pytestmark = pytest.mark.slow  # every test starts the daemon against the emulator


def stored_copies(emulator) -> collections.Counter:  # type: ignore[no-untyped-def]
    """Documents on the server per content, not counting deleted ones."""
    deleted = {d.doc_id for d in emulator.deletions}
    return collections.Counter(u.sha256 for u in emulator.uploads if u.doc_id not in deleted)


def processing_dir(config) -> Path:  # type: ignore[no-untyped-def]
    return config.folders.inbox.parent / f".{config.folders.inbox.name}.konfuzio-watch"


# -- results under another file's name ----------------------------------------------------------


def test_the_processing_folder_is_private_and_outside_the_inbox(start_daemon, emulator):
    running = start_daemon()
    data = make_pdf(label="private")
    drop(running.inbox / "a.pdf", data)
    running.wait_finished(1)
    folder = running.daemon.processing_dir
    assert folder == processing_dir(running.config) and not folder.is_relative_to(running.inbox)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_processing_folder_others_may_write_is_refused(tmp_path, emulator):
    shared = tmp_path / "shared-processing"
    shared.mkdir()
    shared.chmod(0o777)
    config = make_config(tmp_path, emulator, folders={"processing": str(shared)})
    with pytest.raises(ConfigError, match=r"folders.processing: .* is writable by others \(mode 0777\); run: chmod"):
        Daemon(config).start()


def test_files_planted_in_the_processing_folder_are_never_taken_for_another_file(tmp_path, emulator, start_daemon):
    config = make_config(tmp_path, emulator)
    planted_dir = processing_dir(config)
    planted_dir.mkdir(parents=True, mode=0o700)
    planted = {}
    for i in range(1, 12):  # the names the journal's first ids would get, and the default claim names' shape
        planted[str(i)] = make_pdf(label=f"planted {i}")
        (planted_dir / str(i)).write_bytes(planted[str(i)])
    victims = {f"victim_{i}.pdf": make_pdf(label=f"victim {i}") for i in range(10)}

    running = start_daemon(config)
    for name, data in victims.items():
        drop(running.inbox / name, data)
    running.wait_finished(len(victims) + len(planted), timeout_s=60)

    for name, data in victims.items():
        assert_own_result(running.done, name, data)  # each victim's own bytes and own result
    for name, data in planted.items():  # the planted files went through as what they are, visibly
        assert_own_result(running.done, f"recovered-{name}", data)
    assert inbox_files(running) == []


# -- a lost journal ------------------------------------------------------------------------------


def test_a_lost_journal_adopts_the_waiting_files_under_their_own_names(daemon_process, emulator, tmp_path):
    emulator.knobs.processing_s = 60  # the documents stay unfinished: the files wait in processing/
    daemon = daemon_process()
    daemon.start()
    files = {f"lost/{i}.pdf": make_pdf(label=f"lost {i}") for i in range(5)}
    for rel, data in files.items():
        drop(tmp_path / "inbox" / rel, data)
    wait_until(
        lambda: daemon.journal("SELECT COUNT(*) FROM files WHERE state = 'uploaded'")[0][0] == 5,
        30,
        "five files uploaded and waiting",
    )
    daemon.kill9()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "state" / f"journal.sqlite3{suffix}").unlink(missing_ok=True)
    emulator.knobs.processing_s = 0.2

    daemon.start()
    wait_until(lambda: daemon.done_count() == 5, 60, lambda: f"all five done (have {daemon.done_count()})")
    assert daemon.terminate() == 0
    log = daemon.log.read_text()
    assert "5 file(s) in" in log and "had no journal row" in log, "the adoption is said, once"
    for rel, data in files.items():  # back under their base names (the journal that knew the folder is gone)
        result = json.loads((tmp_path / "done" / (Path(rel).name + ".json")).read_text())
        assert result["source"]["sha256"] == hashlib.sha256(data).hexdigest(), "another file's result"
        assert (tmp_path / "done" / Path(rel).name).read_bytes() == data
    # Without the journal the earlier uploads cannot be recognised: each file was uploaded once more.
    assert all(n == 2 for n in documents_per_sha(emulator).values())


def test_a_deleted_wal_orphans_nothing(daemon_process, emulator, tmp_path):
    emulator.knobs.processing_s = 60
    daemon = daemon_process()
    daemon.start()
    files = {f"wal/{i:02d}.png": make_png(label=f"wal {i}") for i in range(12)}
    for rel, data in files.items():
        drop(tmp_path / "inbox" / rel, data)
    wait_until(
        lambda: daemon.journal("SELECT COUNT(*) FROM files WHERE state = 'uploaded'")[0][0] == 12,
        30,
        "twelve files uploaded",
    )
    daemon.kill9()
    (tmp_path / "state" / "journal.sqlite3-wal").unlink()  # the rows since the last checkpoint are gone
    (tmp_path / "state" / "journal.sqlite3-shm").unlink(missing_ok=True)
    emulator.knobs.processing_s = 0.2

    daemon.start()
    wait_until(lambda: daemon.done_count() == 12, 60, lambda: f"all twelve done (have {daemon.done_count()})")
    assert daemon.terminate() == 0
    for rel, data in files.items():
        assert (tmp_path / "done" / Path(rel).name).read_bytes() == data
    assert not waiting_in(processing_dir_of(tmp_path))


def processing_dir_of(root: Path) -> Path:
    return root / ".inbox.konfuzio-watch"


@pytest.mark.parametrize("damage", ["garbage", "directory"])
def test_a_damaged_or_unreadable_journal_stops_the_start_with_one_line(tmp_path, emulator, damage):
    import subprocess

    from .helpers import KONFUZIO_WATCH, DaemonProcess

    daemon = DaemonProcess(tmp_path, emulator)
    journal = tmp_path / "state" / "journal.sqlite3"
    journal.parent.mkdir()
    if damage == "garbage":
        journal.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    else:
        journal.mkdir()
    done = subprocess.run(
        [*KONFUZIO_WATCH, "run", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOG_TO_FILE": "False"},
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "journal" in lines[0] and str(journal) in lines[0]


# -- uploaded twice: the server stores after the daemon gave up on its answer ---------------------


def test_a_crash_while_the_server_is_still_storing_uploads_nothing_twice(daemon_process, emulator, tmp_path):
    emulator.knobs.upload_latency_s = 3.0  # the server takes 3 s to store an upload
    daemon = daemon_process(upload={"reconcile_window_seconds": 8})
    daemon.start()
    files = {f"slow/{i}.pdf": make_pdf(label=f"slow store {i}") for i in range(6)}
    for rel, data in files.items():
        drop(tmp_path / "inbox" / rel, data)
    wait_until(
        lambda: getattr(emulator.request_stats().get("upload"), "count", 0) >= 4, 30, "uploads reaching the server"
    )
    daemon.kill9()  # while the server is still storing them
    emulator.knobs.upload_latency_s = 0.0

    daemon.start()
    wait_until(lambda: daemon.done_count() == 6, 60, lambda: f"all six done (have {daemon.done_count()})")
    assert daemon.terminate() == 0
    assert all(n == 1 for n in stored_copies(emulator).values()), stored_copies(emulator)
    for rel, data in files.items():
        assert (tmp_path / "done" / rel).read_bytes() == data


def test_a_read_timeout_shorter_than_the_store_time_uploads_nothing_twice(start_daemon, emulator):
    emulator.knobs.upload_latency_s = 2.5
    running = start_daemon(konfuzio={"timeout_seconds": 1}, upload={"reconcile_window_seconds": 6})
    files = {f"t{i}.png": make_png(label=f"timeout {i}") for i in range(3)}
    for name, data in files.items():
        drop(running.inbox / name, data)
    running.wait_finished(3, timeout_s=60)
    for name, data in files.items():
        assert_own_result(running.done, name, data)
    assert len(emulator.uploads) == 3, f"{len(emulator.uploads)} documents for 3 files"


def test_a_gateway_error_after_the_upload_was_forwarded_uploads_nothing_twice(start_daemon, emulator):
    emulator.knobs.fault_rules = [FaultRule.gateway(503, store_after_s=1.0, count=5)]
    running = start_daemon(upload={"reconcile_window_seconds": 4})
    files = {f"g{i}.pdf": make_pdf(label=f"gateway {i}") for i in range(5)}
    for name, data in files.items():
        drop(running.inbox / name, data)
    running.wait_finished(5, timeout_s=60)
    for name, data in files.items():
        assert_own_result(running.done, name, data)
    assert emulator.knobs.fault_rules[0].hits == 5
    assert len(emulator.uploads) == 5, f"{len(emulator.uploads)} documents for 5 files"


def test_a_copy_that_appears_after_the_window_is_recognised_and_deleted(start_daemon, emulator):
    emulator.knobs.fault_rules = [FaultRule.gateway(504, store_after_s=2.0, count=1)]
    running = start_daemon(upload={"reconcile_window_seconds": 0.3})  # too short for this server
    data = make_pdf(label="stored late")
    drop(running.inbox / "late.pdf", data)
    running.wait_finished(1, timeout_s=30)
    wait_until(
        lambda: len(emulator.uploads) == 2 and emulator.deletions, 30, "the late first copy appeared and was deleted"
    )
    result = assert_own_result(running.done, "late.pdf", data)
    (deleted,) = emulator.deletions
    assert deleted.doc_id != result["document_id"], "the copy in done/ is the one kept"
    assert stored_copies(emulator) == {hashlib.sha256(data).hexdigest(): 1}


# -- a result that does not describe its file -------------------------------------------------------


@pytest.mark.parametrize("kind", ["pdf", "png"])
def test_a_file_that_grows_after_it_was_claimed_is_uploaded_again_as_it_now_is(start_daemon, emulator, kind):
    emulator.knobs.processing_s = 1.5
    running = start_daemon(results={"callback_timeout": 0.5, "poll_interval": 0.2})
    first = make_pdf(label="first revision") if kind == "pdf" else make_png(label="first part")
    more = b"\n% an incremental update\n%%EOF\n" if kind == "pdf" else b"trailing bytes the writer added later"
    own_name = running.inbox.parent / "scanner" / f"growing.{kind}"  # the writer keeps a name of its own
    own_name.parent.mkdir()
    own_name.write_bytes(first)
    os.link(own_name, running.inbox / f"growing.{kind}")
    wait_until(lambda: len(emulator.uploads) == 1, 20, "the first content uploaded")
    with open(own_name, "ab") as writer:  # and comes back to it later (a file held open is not taken at all)
        writer.write(more)
    full = first + more

    running.wait_finished(1, timeout_s=30)
    result = json.loads((running.done / f"growing.{kind}.json").read_text())
    assert (running.done / f"growing.{kind}").read_bytes() == full
    assert result["source"]["sha256"] == hashlib.sha256(full).hexdigest()
    assert hashlib.sha256(full).hexdigest() in result["text"], "the result describes the truncated content"
    assert len(emulator.uploads) == 2


def test_a_half_written_pdf_fails_after_the_grace_and_valid_pdfs_are_not_misjudged(start_daemon, emulator):
    running = start_daemon(watch={"settle_seconds": 0.2, "incomplete_grace_seconds": 1.0})
    whole = make_pdf(pages=2, label="half written")
    drop(running.inbox / "half.pdf", whole[: whole.rindex(b"%%EOF")])
    trailing = make_pdf(label="trailing bytes") + b"\0" * 2048  # some producers pad after %%EOF
    drop(running.inbox / "trailing.pdf", trailing)
    updated = make_pdf(label="incremental") + b"1 0 obj\n<< /Revised true >>\nendobj\nstartxref\n9\n%%EOF\n"
    drop(running.inbox / "updated.pdf", updated)

    running.wait_finished(3, timeout_s=30)
    report = json.loads((running.failed / "half.pdf.error.json").read_text())
    assert report["stage"] == "validate" and "incomplete PDF" in report["error"] and "%%EOF" in report["error"]
    assert "half written" not in {u.data_file_name for u in emulator.uploads}
    assert_own_result(running.done, "trailing.pdf", trailing)
    assert_own_result(running.done, "updated.pdf", updated)


def test_a_file_whose_bytes_are_gone_is_never_reported_done(start_daemon, emulator):
    emulator.knobs.callback_loss = 1.0
    emulator.knobs.processing_s = 2.0
    running = start_daemon(results={"callback_timeout": 600, "poll_interval": 0.3})
    drop(running.inbox / "moveme.pdf", make_pdf(label="moved away"))
    wait_until(lambda: running.counts()[State.UPLOADED] == 1, 20, "uploaded")
    running.stop()
    folder = running.daemon.processing_dir
    shutil.move(folder, folder.with_name(folder.name + ".elsewhere"))  # someone moves the folder away

    again = start_daemon(running.config)
    again.wait_finished(1, timeout_s=30)
    assert again.counts()[State.FAILED] == 1 and again.counts()[State.DONE] == 0
    report = json.loads((again.failed / "moveme.pdf.error.json").read_text())
    assert report["stage"] == "vanished" and "vanished" in report["error"]
    assert not (again.done / "moveme.pdf.json").exists(), "a result without its file"


def test_a_path_that_fits_the_inbox_but_not_done_goes_to_failed_with_the_whole_path(tmp_path, emulator, start_daemon):
    long_done = tmp_path / ("d" * 200) / ("e" * 200) / "done"
    config = make_config(tmp_path, emulator, folders={"done": str(long_done)})
    running = start_daemon(config)
    rel = "/".join(["f" * 250] * 15) + "/deep.pdf"  # ~3770 bytes: fits under the inbox, not under done/
    data = make_pdf(label="deep")
    drop(running.inbox / rel, data)
    running.wait_finished(1, timeout_s=30)
    (report_path,) = running.failed.glob("deep~*.pdf.error.json")
    report = json.loads(report_path.read_text())
    assert report["source"]["path"] == rel and report["stage"] == "too_long" and "does not fit" in report["error"]
    assert report_path.with_name(report_path.name.removesuffix(".error.json")).read_bytes() == data


# -- exposed ---------------------------------------------------------------------------------------


def test_callback_tokens_never_reach_the_result_files(start_daemon, emulator):
    running = start_daemon()
    drop(running.inbox / "secret.pdf", make_pdf(label="token"))
    running.wait_finished(1)
    token = callback_url_of(emulator, "secret.pdf").rsplit("/", 1)[1]
    text = (running.done / "secret.pdf.json").read_text()
    assert token not in text
    assert json.loads(text)["konfuzio"]["callback_url"].endswith("/<redacted>")


def test_claims_run_while_other_threads_write_the_journal(start_daemon, emulator):
    """Many files at once, callbacks arriving while claims are written: no row moved twice."""
    running = start_daemon(upload={"concurrency": 8}, results={"workers": 4})
    files = {f"c{i:03d}.png": make_png(label=f"concurrent {i}") for i in range(60)}
    threads = [threading.Thread(target=drop, args=(running.inbox / name, data)) for name, data in files.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    running.wait_finished(60, timeout_s=60)
    for name, data in files.items():
        assert_own_result(running.done, name, data)
    assert all(n == 1 for n in documents_per_sha(emulator).values())


def test_reconciliation_reads_only_the_newest_page_of_a_large_project(daemon_process, emulator, tmp_path):
    emulator.seed_documents(1, 50_000)
    emulator.knobs.stall_after_store_s = 5  # stored, the answer pending: the daemon dies in between
    daemon = daemon_process()
    daemon.start()
    files = {f"big/{i}.pdf": make_pdf(label=f"in a big project {i}") for i in range(4)}
    for rel, data in files.items():
        drop(tmp_path / "inbox" / rel, data)
    wait_until(lambda: len(emulator.uploads) == 4, 30, "four uploads stored, their answers pending")
    daemon.kill9()
    emulator.knobs.stall_after_store_s = 0
    emulator.reset_request_stats()

    daemon.start()
    wait_until(lambda: daemon.done_count() == 4, 60, "all four done")
    assert daemon.terminate() == 0
    assert len(emulator.uploads) == 4, "reconciled, not uploaded again"
    lists = emulator.request_stats()["list"].count
    assert lists <= 3, f"{lists} list requests in a project of 50,000 documents"


def test_status_lists_files_still_settling_incomplete_or_unreadable(start_daemon, emulator):
    import io
    import time

    from konfuzio_watch.status import print_status

    running = start_daemon(watch={"settle_seconds": 30, "incomplete_grace_seconds": 60})
    whole = make_pdf(label="still being scanned")
    drop(running.inbox / "half.pdf", whole[: whole.rindex(b"%%EOF")])
    drop(running.inbox / "fresh.png", make_png(label="settling"))
    wait_until(lambda: len(running.daemon.scheduler.tracker) == 2, 10, "both seen")
    out = io.StringIO()
    print_status(running.config, show_all=False, now=time.time(), out=out)
    text = out.getvalue()
    assert "in the inbox, not taken in yet: 2" in text
    assert "    fresh.png: settling (stable for" in text
    assert "    half.pdf: settling" in text or "    half.pdf: incomplete" in text


def test_a_path_longer_than_path_max_reaches_failed_with_its_whole_path(start_daemon, emulator):
    running = start_daemon(watch={"rescan_interval": 0.5})  # inotify cannot watch that deep: the rescan finds it
    data = make_pdf(label="deeper than PATH_MAX")
    inbox_fd = os.open(running.inbox, os.O_RDONLY | os.O_DIRECTORY)
    parts = ["g" * 250] * 17  # 4,267 bytes of folders below the inbox
    try:
        fd = inbox_fd
        for part in parts:
            os.mkdir(part, dir_fd=fd)
            fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        file_fd = os.open("deep.pdf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(file_fd, data)
        os.close(file_fd)
    finally:
        os.close(inbox_fd)
    running.wait_finished(1, timeout_s=30)
    (report_path,) = running.failed.glob("deep~*.pdf.error.json")
    report = json.loads(report_path.read_text())
    assert report["source"]["path"] == "/".join([*parts, "deep.pdf"]) and report["stage"] == "too_long"
    assert report_path.with_name(report_path.name.removesuffix(".error.json")).read_bytes() == data


def test_status_all_lists_what_the_inbox_holds_but_never_takes_in(start_daemon, emulator):
    import io
    import time

    from konfuzio_watch.status import print_status

    running = start_daemon(watch={"ignore": ["*.bak"]})
    drop(running.inbox / "a.pdf", make_pdf(label="a"))
    running.wait_finished(1)
    (running.inbox / ".hidden.pdf").write_bytes(b"x")
    (running.inbox / "scan.pdf.part").write_bytes(b"x")
    (running.inbox / "old.bak").write_bytes(b"x")
    out = io.StringIO()
    print_status(running.config, show_all=True, now=time.time(), out=out)
    text = out.getvalue()
    assert "ignored in the inbox (never taken in)" in text
    for name in (".hidden.pdf", "scan.pdf.part", "old.bak"):
        assert f"  {name}  [" in text, name
    assert ".konfuzio-watch.lock" not in text
