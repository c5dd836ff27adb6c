"""The move of a finished file out of processing/ does not fsync its unlink (one fsync less per file):
after a power failure the processing folder may show that name again, a second name of the very file
now in done/. Start-up removes such a name (same inode as the row's final path) instead of adopting
it, which would upload the file a second time; anything else under a finished row's name is adopted
like any orphan."""

from __future__ import annotations

import os

import pytest

from konfuzio_watch.journal import State
from konfuzio_watch.samples import make_pdf

from .conftest import drop, make_config, wait_until
from .helpers import waiting_in

pytestmark = pytest.mark.slow  # every test starts the daemon against the emulator


def test_a_leftover_name_of_a_done_file_is_removed_not_adopted(start_daemon, emulator, tmp_path):
    config = make_config(tmp_path, emulator)
    running = start_daemon(config)
    data = make_pdf(label="leftover")
    drop(running.inbox / "scan.pdf", data)
    running.wait_finished(1)
    assert running.daemon.journal and running.daemon.processing_dir
    row = running.daemon.journal.rows([State.DONE])[0]
    processing = running.daemon.processing_dir
    running.stop()
    assert row.claim_name is not None and row.final_path is not None
    # What a power failure may leave: the unlink from processing/ lost, the link in done/ kept.
    os.link(os.fsdecode(row.final_path), processing / os.fsdecode(row.claim_name))

    running = start_daemon(config)
    wait_until(lambda: not waiting_in(processing), 10, "the leftover name removed")
    assert (running.done / "scan.pdf").read_bytes() == data
    assert sorted(p.name for p in running.done.iterdir()) == ["scan.pdf", "scan.pdf.json"]
    assert [p for p in running.inbox.iterdir() if not p.name.startswith(".")] == []
    assert len(emulator.uploads) == 1
    assert running.counts()[State.DONE] == 1


def test_another_file_under_a_done_files_name_is_adopted(start_daemon, emulator, tmp_path):
    config = make_config(tmp_path, emulator)
    running = start_daemon(config)
    drop(running.inbox / "scan.pdf", make_pdf(label="first"))
    running.wait_finished(1)
    assert running.daemon.journal and running.daemon.processing_dir
    row = running.daemon.journal.rows([State.DONE])[0]
    processing = running.daemon.processing_dir
    running.stop()
    assert row.claim_name is not None
    planted = make_pdf(label="planted under a finished name")
    (processing / os.fsdecode(row.claim_name)).write_bytes(planted)  # not the file in done/

    running = start_daemon(config)
    running.wait_finished(2)
    assert (running.done / "scan (2).pdf").read_bytes() == planted
    assert len(emulator.uploads) == 2
