"""The journal: refuses network file systems; survives what SQLite promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from konfuzio_watch.journal import Journal, JournalError, State, filesystem_type


def mountinfo_with(mount_point: Path, fstype: str) -> str:
    return (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        f"97 22 0:55 / {mount_point} rw,relatime shared:50 - {fstype} //nas/scans rw,vers=3.0\n"
    )


@pytest.mark.parametrize("fstype", ["nfs4", "cifs", "smb3", "fuse.sshfs"])
def test_a_journal_on_a_network_file_system_is_refused(tmp_path: Path, fstype: str):
    info = mountinfo_with(tmp_path / "share", fstype)
    assert filesystem_type(tmp_path / "share" / "state", info) == fstype
    with pytest.raises(JournalError, match=rf"folders.state: .* network file system \({fstype}\)"):
        Journal(tmp_path / "share" / "state" / "journal.sqlite3", mountinfo=info)


def test_a_journal_on_a_local_disk_is_fine(tmp_path: Path):
    info = mountinfo_with(tmp_path / "share", "cifs")
    assert filesystem_type(tmp_path / "local", info) == "ext4"
    journal = Journal(tmp_path / "local" / "journal.sqlite3", mountinfo=info)
    try:
        (row,) = journal.add_claims([b"a\xff.pdf"], now=1.0)
        assert row.state == State.CLAIMING and row.rel_path == b"a\xff.pdf"
        assert row.display_path == "a\\xff.pdf"
        assert journal.integrity_check() == "ok"
    finally:
        journal.close()


def test_the_real_mount_table_is_read(tmp_path: Path):
    assert filesystem_type(tmp_path) is not None


def test_moving_the_processing_folder_while_files_wait_there_is_refused(tmp_path: Path):
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        journal.bind_processing_dir(tmp_path / "processing")
        journal.bind_processing_dir(tmp_path / "processing")  # same place: fine
        (row,) = journal.add_claims([b"a.pdf"], now=1.0)
        row = journal.transition(row, State.CLAIMED, 2.0)
        with pytest.raises(JournalError, match=r"folders.processing: 1 unfinished file\(s\) wait in"):
            journal.bind_processing_dir(tmp_path / "elsewhere")
        row = journal.transition(row, State.FAILING, 3.0)
        journal.transition(row, State.FAILED, 3.0)
        journal.bind_processing_dir(tmp_path / "elsewhere")  # nothing waits: the new place is taken
    finally:
        journal.close()


def test_row_ids_are_never_reused(tmp_path: Path):
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        first, second = journal.add_claims([b"a.pdf", b"b.pdf"], now=1.0)
        journal.discard(second)  # the newest row goes away ...
        (third,) = journal.add_claims([b"c.pdf"], now=2.0)
        assert third.id > second.id  # ... and its id (the name of a processing file) is not handed out again
    finally:
        journal.close()


def test_free_names_for_very_long_file_names_end_and_fit(tmp_path: Path):
    from konfuzio_watch.files import free_target, sidecar_for

    name = "x" * 250 + ".pdf"
    taken = []
    for _ in range(3):
        target = free_target(tmp_path, name, ".json")
        assert len(target.name.encode()) <= 255 and target not in taken
        target.write_bytes(b"")
        sidecar_for(target, ".json").write_bytes(b"")
        taken.append(target)
    assert taken[1].name.endswith(" (2).pdf") and taken[2].name.endswith(" (3).pdf")
