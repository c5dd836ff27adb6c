"""The processing folder on a Samba share, seen through a client mount (smbnetfs, tests/smb.py).

Through FUSE the folder shows the mount's owner and mode (``0755 root:root``); on the server it is
the share's (``2770``, the scanners' group), and a scanner may put a file into it over SMB. ``check``
and the daemon's start-up say that this cannot be verified from here, and what to set on the
server; whatever a scanner plants there is never taken for another file's result.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from konfuzio_watch.cli import main
from konfuzio_watch.journal import State
from konfuzio_watch.samples import make_pdf, make_png

from .conftest import TOKEN, wait_until
from .helpers import assert_own_result, net_uploads_per_sha
from .smb import Scanner

pytestmark = pytest.mark.slow

PROCESSING = ".inbox.konfuzio-watch"  # the default processing folder, next to the share's inbox


def share_folders(share: Path, tmp_path: Path) -> dict:
    """inbox, done/ and failed/ on the share (made through the mount, as the daemon's user); the
    state folder on the local disk."""
    for name in ("inbox", "done", "failed"):
        (share / name).mkdir(exist_ok=True)
    return {
        "inbox": str(share / "inbox"),
        "done": str(share / "done"),
        "failed": str(share / "failed"),
        "state": str(tmp_path / "state"),
    }


def put_files(scanner: Scanner, tmp_path: Path, files: dict[str, bytes], folder: str = "inbox") -> None:
    local = tmp_path / "scans"
    local.mkdir(exist_ok=True)
    for name, data in files.items():
        (local / name).write_bytes(data)
        scanner.put(local / name, f"{folder}/{name}")


def stale_results(done: Path) -> list[str]:
    """The files in done/ whose result JSON describes other bytes."""
    stale = []
    for result_path in sorted(done.rglob("*.json")):
        data = result_path.with_name(result_path.name.removesuffix(".json")).read_bytes()
        result = json.loads(result_path.read_text())
        sha = hashlib.sha256(data).hexdigest()
        if result["source"]["sha256"] != sha or sha not in result["text"]:
            stale.append(result_path.name.removesuffix(".json"))
    return stale


def test_check_says_the_processing_folders_privacy_cannot_be_verified_on_a_client_mount(
    samba, smb_mount, emulator, tmp_path, capsys
):
    """Through smbnetfs the folder passes the local check (0755 root:root, as the mount shows it)
    while on the server the scanners' group may write into it: check says so, and what to set; what
    it asks for keeps the scanner out."""
    folders = share_folders(smb_mount.share, tmp_path)
    processing = smb_mount.share / PROCESSING
    processing.mkdir(mode=0o700)  # as the daemon makes it
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "konfuzio": {"host": emulator.url, "token": TOKEN, "project_id": 1},
                "folders": folders,
                "callback": {"enabled": False},
            }
        )
    )
    main(["check", "--config", str(config)])
    out = capsys.readouterr().out
    assert f"ok    processing folder: {processing}" in out  # the mount's view passes
    note = next((line for line in out.splitlines() if "cannot be verified" in line), None)
    assert note is not None, f"check is silent about the processing folder on a share:\n{out}"
    assert note.startswith(f"note  the processing folder {processing} is on fuse.smbnetfs")
    assert "only konfuzio-watch's account" in note and "0700" in note

    scanner = Scanner(samba)
    server_side = samba.share / PROCESSING
    assert oct(server_side.stat().st_mode & 0o777) == "0o770", "the share's directory mask lets the group in"
    put_files(scanner, tmp_path, {"planted.pdf": make_pdf(label="planted")}, PROCESSING)
    os.chmod(server_side, 0o700)  # what the note asks for, on the server
    with pytest.raises(OSError, match="NT_STATUS_ACCESS_DENIED"):
        put_files(scanner, tmp_path, {"again.pdf": make_pdf(label="again")}, PROCESSING)


def test_a_file_planted_over_smb_into_the_processing_folder_is_never_another_files_result(
    samba, smb_mount, start_daemon, emulator, tmp_path, caplog
):
    """A scanner swaps a file in flight for one of its own bytes, the same size and modification
    time (a Windows client sets it to 100 ns; here on the server's disk), under its claim name (listed
    over SMB); and puts one more file in under a name of its own. Through smbnetfs the swapped file
    keeps its inode number (numbers follow the path there) and its ctime is its mtime: only its
    content tells. It is uploaded again as itself; the other is left alone, and adopted back into
    the inbox at the next start (as ``recovered-<name>``: no claim made that name)."""
    emulator.knobs.processing_s = 2.0  # a window between the upload and the export
    config = {
        "folders": share_folders(smb_mount.share, tmp_path),
        "watch": {"polling": True, "poll_interval": 0.3, "settle_seconds": 0.3},
    }
    running = start_daemon(**config)
    scanner = Scanner(samba)
    files = {f"scan_{i}.pdf": make_pdf(label=f"planted test {i}") for i in range(3)}
    put_files(scanner, tmp_path, files)
    wait_until(lambda: running.counts()[State.UPLOADED] == 3, 15, "three files uploaded")
    warned = [r for r in caplog.records if "cannot be verified from here" in r.getMessage()]
    assert [r.levelname for r in warned] == ["WARNING"], "the start-up log is silent about the folder's privacy"

    victim = next(n for n in scanner.run(f"ls {PROCESSING}/*").split() if n.endswith("-scan_0.pdf"))
    swapped = files["scan_0.pdf"].replace(b"planted test 0", b"planted test X")
    assert len(swapped) == len(files["scan_0.pdf"]) and swapped != files["scan_0.pdf"]
    put_files(scanner, tmp_path, {"swap.tmp": swapped, "planted.png": make_png(label="planted")}, PROCESSING)
    on_server = samba.share / PROCESSING
    mtime_ns = os.stat(on_server / victim).st_mtime_ns
    os.utime(on_server / "swap.tmp", ns=(mtime_ns, mtime_ns))
    scanner.run(f'cd {PROCESSING}; del "{victim}"; rename swap.tmp "{victim}"')

    running.wait_finished(3, timeout_s=20)
    assert stale_results(running.done) == [], "a file in done/ next to another file's result"
    assert (running.done / "scan_0.pdf").read_bytes() == swapped
    for name in ("scan_1.pdf", "scan_2.pdf"):
        assert_own_result(running.done, name, files[name])
    assert (on_server / "planted.png").exists(), "a file no row claims is left alone while the daemon runs"
    running.stop()

    running = start_daemon(**config)  # the next start adopts it: back into the inbox, through as itself
    running.wait_finished(4, timeout_s=20)
    assert stale_results(running.done) == []
    assert sorted(p.name for p in running.done.iterdir() if p.suffix != ".json") == [
        "recovered-planted.png",
        "scan_0.pdf",
        "scan_1.pdf",
        "scan_2.pdf",
    ]  # not a claim name: marked so
    assert list(running.failed.iterdir()) == []
    left = net_uploads_per_sha(emulator)
    assert sorted(left.values()) == [0, 1, 1, 1, 1], left  # scan_0's first document was deleted
