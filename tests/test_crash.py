"""The daemon as a real process: SIGKILL at many points, disk full, an unwritable done/.

The emulator runs in the test process and outlives every daemon process, like the real
Konfuzio server outlives a crashing client.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from konfuzio_watch.files import sidecar_for
from konfuzio_watch.samples import make_pdf, make_png

from .conftest import drop, wait_until
from .helpers import (
    AS_NOBODY,
    KONFUZIO_WATCH,
    DaemonProcess,
    assert_each_file_finished_exactly_once,
    can_drop_privileges,
    injecting,
    sample_files,
    waiting_in,
)

pytestmark = pytest.mark.slow  # every test starts the daemon as a process


def test_sigkill_at_many_points_every_file_finishes_exactly_once(daemon_process, emulator, tmp_path):
    emulator.knobs.upload_latency_s = 0.05
    emulator.knobs.processing_s = 0.4
    emulator.knobs.processing_jitter_s = 0.3
    emulator.knobs.callback_duplicate = 0.2
    daemon = daemon_process()
    files = sample_files(24, "first")
    later = sample_files(16, "second")
    stalled = sample_files(2, "stalled")  # one each for the two stalled uploads (the batches may be stored by then)
    for rel, data in files.items():
        drop(tmp_path / "inbox" / rel, data)

    uploads = lambda: len(emulator.uploads)  # noqa: E731
    rows = lambda: daemon.journal("SELECT COUNT(*) FROM files")[0][0] if (tmp_path / "state").exists() else 0  # noqa: E731
    kill_points: list[tuple[str, Callable[[], bool]]] = [
        ("right after start-up", lambda: True),
        ("while claiming", lambda: rows() >= 1),
        ("first uploads in flight", lambda: uploads() >= 2),
        ("uploads under way", lambda: uploads() >= 8),
        ("first exports", lambda: daemon.done_count() >= 2),
        ("mid-batch", lambda: uploads() >= 16),
        ("exports under way", lambda: daemon.done_count() >= 10),
        ("second batch claimed", lambda: rows() >= 30),
        ("second batch uploading", lambda: uploads() >= 30),
        ("late exports", lambda: daemon.done_count() >= 25),
        ("almost done", lambda: daemon.done_count() >= 34),
    ]
    for index, (point, reached) in enumerate(kill_points):
        daemon.start()
        if index == 7:
            for rel, data in later.items():
                drop(tmp_path / "inbox" / rel, data)
        wait_until(reached, 60, f"kill point {point!r}")
        daemon.kill9()
        # The dangerous window: the server has stored the upload, the daemon never hears its id.
        if index in (2, 5):
            emulator.knobs.stall_after_store_s = 5  # long enough to kill in; frees the server soon after
            stored = uploads()
            rel = sorted(stalled)[0 if index == 2 else 1]
            drop(tmp_path / "inbox" / rel, stalled[rel])
            daemon.start()
            wait_until(lambda s=stored: uploads() > s, 30, "an upload stored by the server, its answer pending")
            daemon.kill9()
            emulator.knobs.stall_after_store_s = 0

    daemon.start()
    wait_until(lambda: daemon.done_count() >= 42, 90, lambda: f"all 42 files done (have {daemon.done_count()})")
    assert daemon.terminate() == 0
    assert daemon.journal("PRAGMA integrity_check") == [("ok",)]
    assert_each_file_finished_exactly_once(tmp_path, emulator, {**files, **later, **stalled})
    states = dict(daemon.journal("SELECT state, COUNT(*) FROM files GROUP BY state"))
    assert states == {"done": 42}, states
    log = daemon.log.read_text()
    assert log.count("the server already had it as document") >= 1, "the reconcile path was never exercised"


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs Debian's strace for fault injection")
def test_disk_full_while_writing_the_json_keeps_the_file_safe_until_fixed(daemon_process, emulator, tmp_path):
    daemon = daemon_process()
    data = make_pdf(label="disk full")
    target_json = sidecar_for(tmp_path / "done" / "full.pdf", ".json")
    # The JSON is written under a random temporary name, then linked to its own: a full disk is
    # refused at the link (a folder out of blocks for one more name); strace sees the name relative
    # to the folder's descriptor.
    strace = injecting("link,linkat", "ENOSPC", paths=(target_json.name,))
    daemon.start(prefix=strace)
    drop(tmp_path / "inbox" / "full.pdf", data)

    wait_until(lambda: "No space left on device" in daemon.log.read_text(), 30, "the ENOSPC reported in the log")
    processing = tmp_path / ".inbox.konfuzio-watch"
    assert [p.read_bytes() for p in waiting_in(processing)] == [data], "the source must stay safe"
    assert not (tmp_path / "done" / "full.pdf").exists()
    assert not list((tmp_path / "done").glob(".konfuzio-watch-*.tmp")), "a half-written temp file was left"
    status = subprocess.run(
        [*KONFUZIO_WATCH, "status", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "LOG_TO_FILE": "False"},
    )
    assert "exporting" in status.stdout and "No space left on device" in status.stdout
    daemon.kill9()

    daemon.start()  # the disk has space again
    wait_until(lambda: (tmp_path / "done" / "full.pdf").exists(), 30, "exported once the disk has room")
    assert target_json.exists()
    assert (tmp_path / "done" / "full.pdf").read_bytes() == data
    assert daemon.terminate() == 0
    assert len(emulator.uploads) == 1


@pytest.mark.skipif(not can_drop_privileges(), reason="needs root and setpriv to run the daemon as nobody")
def test_unwritable_done_folder_keeps_the_file_safe_until_fixed(daemon_process, emulator):
    root = Path(tempfile.mkdtemp(prefix="kw-perm-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        for name in ("inbox", "done", "failed", "state"):
            (root / name).mkdir()
        daemon = DaemonProcess(root, emulator)
        subprocess.run(["chown", "-R", "65534:65534", str(root)], check=True)
        os.chmod(root / "done", 0o555)  # done/ not writable for the daemon's user
        daemon.start(prefix=AS_NOBODY)
        data = make_pdf(label="no permission")
        drop(root / "inbox" / "locked.pdf", data)
        os.chown(root / "inbox" / "locked.pdf", 65534, 65534)

        wait_until(lambda: "Permission denied" in daemon.log.read_text(), 30, "the EACCES reported in the log")
        processing = root / ".inbox.konfuzio-watch"
        assert [p.read_bytes() for p in waiting_in(processing)] == [data]
        os.chmod(root / "done", 0o755)  # fixed: the daemon retries by itself

        wait_until(lambda: (root / "done" / "locked.pdf").exists(), 30, "exported once done/ is writable")
        assert (root / "done" / "locked.pdf.json").exists()
        assert (root / "done" / "locked.pdf").read_bytes() == data
        assert daemon.terminate() == 0
        assert len(emulator.uploads) == 1
    finally:
        daemon.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_sigkill_while_the_server_stores_late_with_planted_processing_entries(daemon_process, emulator, tmp_path):
    """The kill -9 loop again, with a server that stores each upload 1.5 s after it arrived and,
    before every restart, a stale and a planted file in the processing folder."""
    emulator.knobs.upload_latency_s = 1.5
    emulator.knobs.processing_s = 0.3
    daemon = daemon_process(upload={"reconcile_window_seconds": 4, "concurrency": 4})
    files = sample_files(20, "late")
    for rel, data in files.items():
        drop(tmp_path / "inbox" / rel, data)
    arrived = lambda: getattr(emulator.request_stats().get("upload"), "count", 0)  # noqa: E731
    processing = tmp_path / ".inbox.konfuzio-watch"
    planted: dict[str, bytes] = {}
    for index, point in enumerate((2, 6, 10, 14, 18)):
        daemon.start()
        wait_until(lambda p=point: arrived() >= p, 60, f"{point} uploads reaching the server")
        daemon.kill9()  # uploads in flight, the server still storing some of them
        stale, fresh = f"{index + 1}", f"{index:016x}-planted-{index}.pdf"  # an old-style id, a current-style name
        planted[f"recovered-{stale}"] = make_png(label=f"stale {index}")
        planted[f"planted-{index}.pdf"] = make_pdf(label=f"planted {index}")
        (processing / stale).write_bytes(planted[f"recovered-{stale}"])
        (processing / fresh).write_bytes(planted[f"planted-{index}.pdf"])

    emulator.knobs.upload_latency_s = 0.0
    daemon.start()
    total = len(files) + len(planted)
    wait_until(lambda: daemon.done_count() >= total, 120, lambda: f"all {total} done (have {daemon.done_count()})")
    assert daemon.terminate() == 0
    assert daemon.journal("PRAGMA integrity_check") == [("ok",)]
    done = tmp_path / "done"
    for rel, data in files.items():
        assert (done / rel).read_bytes() == data, f"{rel} missing or changed"
        result = json.loads((done / (rel + ".json")).read_text())
        assert hashlib.sha256(data).hexdigest() in result["text"], f"{rel} got another file's result"
    for name, data in planted.items():
        result = json.loads((done / (name + ".json")).read_text())
        assert (done / name).read_bytes() == data and hashlib.sha256(data).hexdigest() in result["text"]
    deleted = {d.doc_id for d in emulator.deletions}
    kept = collections.Counter(u.sha256 for u in emulator.uploads if u.doc_id not in deleted)
    assert all(n == 1 for n in kept.values()), f"files stored twice: {[s for s, n in kept.items() if n > 1]}"
    assert not list((tmp_path / "failed").rglob("*"))
