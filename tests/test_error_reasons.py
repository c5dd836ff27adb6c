"""An ``.error.json`` keeps the file's first real reason: an error met while placing the file in
failed/ (a share that answered EBUSY once) is logged, never stored over the reason it failed for."""

from __future__ import annotations

import json
import shutil

import pytest

from konfuzio_watch.samples import make_pdf

from .conftest import drop, wait_until


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs Debian's strace for fault injection")
def test_a_busy_failed_folder_once_leaves_the_incomplete_pdf_its_reason(daemon_process, emulator, tmp_path):
    """A truncated PDF fails as incomplete; its first link into failed/ on each worker thread answers
    EBUSY (strace injects it, counting per thread, as Samba answers while it holds a share lock); a
    retry places it."""
    daemon = daemon_process(watch={"settle_seconds": 0.2, "incomplete_grace_seconds": 0.5})
    target = tmp_path / "failed" / "truncated.pdf"
    # The move is linkat(<processing/>, <claim name>, <failed/>, "truncated.pdf"): strace's -P matches
    # that relative name as it is (and the whole path, should the move ever name it so).
    strace = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=link,linkat",
              "-e", "inject=link,linkat:error=EBUSY:when=1", "-P", target.name, "-P", str(target)]
    daemon.start(prefix=strace)
    drop(tmp_path / "inbox" / "truncated.pdf", make_pdf(label="cut short")[:-200])

    report_path = tmp_path / "failed" / "truncated.pdf.error.json"
    wait_until(target.exists, 30, lambda: f"truncated.pdf placed in failed/ (log: {daemon.log.read_text()[-1500:]})")
    wait_until(report_path.exists, 5, "its .error.json")
    report = json.loads(report_path.read_text())
    log = daemon.log.read_text()
    assert "Device or resource busy" in log, "no fault was injected"
    assert report["stage"] == "validate", report
    assert report["error"].startswith("incomplete PDF"), report["error"]
    assert daemon.journal("SELECT state, error FROM files")[0][1].startswith("incomplete PDF")
    assert emulator.uploads == [], "an incomplete PDF is never uploaded"
