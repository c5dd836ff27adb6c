"""A momentary error is never taken for the reason: an ``.error.json`` keeps the file's first real
reason (an error met while placing the file in failed/, a share that answered EBUSY once, is logged,
never stored over it), and ``check`` does not call a folder unwritable for a busy moment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from konfuzio_watch.samples import make_pdf

from .conftest import TOKEN, drop, wait_until
from .helpers import KONFUZIO_WATCH, injecting


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
    strace = injecting("link,linkat", "EBUSY", paths=(target.name, str(target)), when="1")
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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs Debian's strace for fault injection")
def test_check_takes_a_busy_removal_of_its_probe_for_what_it_is(emulator, tmp_path):
    """check writes a probe file into each folder and removes it. On smbnetfs the removal right
    after the close answers EBUSY now and then (the SMB handle is still open for a moment; seen 1 in
    60): the folder is writable all the same. strace makes the first three removals busy."""
    for name in ("inbox", "done", "failed"):
        (tmp_path / name).mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "konfuzio": {"host": emulator.url, "token": TOKEN, "project_id": 1},
                "folders": {name: str(tmp_path / name) for name in ("inbox", "done", "failed", "state")},
                "callback": {"enabled": False},
            }
        )
    )
    strace = injecting("unlink,unlinkat", "EBUSY", when="1..3")
    checked = subprocess.run(
        [*strace, *KONFUZIO_WATCH, "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOG_TO_FILE": "False"},
    )
    assert f"ok    folders.inbox: {tmp_path / 'inbox'}" in checked.stdout, checked.stdout
    assert "FAIL" not in checked.stdout and checked.returncode == 0, checked.stdout
    assert list((tmp_path / "inbox").iterdir()) == [], "check left its probe behind"
