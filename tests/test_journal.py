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
