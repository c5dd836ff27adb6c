"""The daemon on a client mount of a Samba share (tests/smb.py) while the share goes away: smbd
stopped mid-run, or the mount lazily unmounted and mounted again. A share that errors pauses the
work on it as one blocked episode; no file is failed or uploaded again, nothing is written into the
bare mountpoint, and the files in flight end once in done/."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from konfuzio_watch.samples import make_pdf, make_png

from .conftest import wait_until
from .helpers import documents_per_sha
from .smb import Scanner

pytestmark = pytest.mark.slow

# How long an outage lasts at least: the tests keep it short; docs/performance.md's table runs them with 30.
OUTAGE_S = float(os.environ.get("KONFUZIO_WATCH_SHARE_OUTAGE_S", "0"))
PAUSED = re.compile(r" ERROR .*pausing all work on the shares")
RESUMED = re.compile(r" WARNING .*the shares answer again")


def _scan(samba, tmp_path: Path, n: int) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """``n`` files put into the share's inbox as a scanner does (one smbclient session)."""
    local = tmp_path / "scans"
    local.mkdir()
    files, commands = {}, ["cd inbox"]
    for i in range(n):
        name = f"scan_{i:03d}.pdf" if i % 3 else f"scan_{i:03d}.png"
        files[name] = make_pdf(label=name) if i % 3 else make_png(label=name)
        (local / name).write_bytes(files[name])
        commands.append(f'put "{local / name}" "{name}.part"; rename "{name}.part" "{name}"')
    Scanner(samba).run("; ".join(commands))
    return files


def _on_the_mount(daemon_process, smb_mount, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A daemon whose inbox, done/ and failed/ (and so its processing folder) are on the client mount."""
    share = smb_mount.share
    for name in ("inbox", "done", "failed"):
        (share / name).mkdir()
    return daemon_process(
        folders={
            "inbox": str(share / "inbox"),
            "done": str(share / "done"),
            "failed": str(share / "failed"),
            "state": str(tmp_path / "state"),
        },
        watch={"polling": True, "poll_interval": 0.5, "settle_seconds": 0.3},
    )


def _done(share: Path) -> list[Path]:
    try:
        return sorted(p for p in (share / "done").rglob("*.json"))
    except OSError:  # the share is away
        return []


def _failed(share: Path) -> list[Path]:
    try:
        return sorted(p for p in (share / "failed").rglob("*.error.json"))
    except OSError:
        return []


def _states(daemon) -> set[str]:  # type: ignore[no-untyped-def]
    return {state for (state,) in daemon.journal("SELECT DISTINCT state FROM files")}


def _fetched_while_away(daemon, state: Path, n: int) -> bool:  # type: ignore[no-untyped-def]
    """Every file done, or its result fetched and kept in the state folder until done/ answers (on
    main: failed or failing)."""
    states = _states(daemon)
    if not states <= {"exporting", "done", "failing", "failed"}:
        return False
    if states & {"failing", "failed"}:
        return True
    done = daemon.journal("SELECT count(*) FROM files WHERE state = 'done'")[0][0]
    return done + len(list((state / "kept-results").glob("*.json"))) == n


def _assert_all_done_once(share: Path, emulator, files: dict[str, bytes]) -> None:  # type: ignore[no-untyped-def]
    done = share / "done"
    per_sha = documents_per_sha(emulator)
    print(
        f"{len(files)} files: {len(_done(share))} done, {len(_failed(share))} failed, "
        f"{sum(per_sha.values()) - len(per_sha)} duplicate documents"
    )
    for name, data in files.items():
        assert (done / name).read_bytes() == data, f"{name} missing or changed in done/"
        assert (done / f"{name}.json").exists()
    assert len(_done(share)) == len(files), "an extra result in done/"
    assert sorted(p.name for p in (share / "failed").rglob("*")) == [], "a file failed"
    assert len(per_sha) == len(files) and max(per_sha.values()) == 1, f"uploaded twice: {per_sha}"


def test_smbd_stopped_while_results_are_placed_pauses_and_loses_nothing(
    samba, smb_mount, daemon_process, emulator, tmp_path: Path
):
    """On main: files failed as vanished ("the file vanished from .../.inbox.konfuzio-watch before it
    was placed"), then "cannot write into .../failed: Input/output error"."""
    emulator.knobs.processing_s = 2.0
    emulator.knobs.processing_jitter_s = 4.0  # results come in over 4 s, most of them during the outage
    daemon = _on_the_mount(daemon_process, smb_mount, tmp_path)
    daemon.start()
    files = _scan(samba, tmp_path, 20)
    share = smb_mount.share
    wait_until(lambda: len(emulator.uploads) == len(files), 15, "every file uploaded")
    wait_until(lambda: len(_done(share)) >= 2, 15, "the first results in done/")
    samba.stop()
    stopped = time.monotonic()
    wait_until(
        lambda: all(d["status_data"] == 2 for d in emulator.documents()),
        15,
        "every document processed while the share is away",
    )
    wait_until(
        lambda: _fetched_while_away(daemon, tmp_path / "state", len(files)),
        15,
        lambda: f"every result fetched while the share is away: {_states(daemon)}",
    )
    _hold_outage(stopped)
    emulator.reset_request_stats()
    samba.start()
    back = time.monotonic()
    print(f"smbd was stopped for {back - stopped:.1f} s")
    wait_until(
        lambda: len(_done(share)) + len(_failed(share)) >= len(files),
        30,
        lambda: f"all {len(files)} files done ({len(_done(share))}) or failed ({len(_failed(share))})",
    )
    print(f"all finished {time.monotonic() - back:.1f} s after smbd's return")
    wait_until(lambda: RESUMED.search(daemon.log.read_text()) or _failed(share), 15, "the end of the pause in the log")
    log = daemon.log.read_text()
    _assert_all_done_once(share, emulator, files)
    assert len(PAUSED.findall(log)) == 1 and len(RESUMED.findall(log)) == 1, log
    # The results were kept in the state folder: nothing was uploaded again, and placing them needed
    # no fetch. A few details requests may follow (under load the suite saw 3 and 6 of them: a
    # callback that came in meanwhile makes a done file due for one more look, as after any export).
    assert emulator.api_requests("upload") == 0
    assert emulator.api_requests("details") <= len(files)
    assert " -> failed" not in log and "vanished" not in log and "scheduling loop hit an error" not in log, log
    daemon.terminate()


def test_a_lazy_unmount_writes_nothing_into_the_bare_mountpoint_and_the_files_go_on(
    samba, smb_mount, daemon_process, emulator, tmp_path: Path
):
    """The share drops away under the daemon (``fusermount -u -z``) with files in flight, and is mounted
    again. On main: all 12 files failed ("the file disappeared from the processing folder"), and their
    12 reports and the processing folder were written under the bare mountpoint (hidden by the remount
    here; a FUSE that refuses a mountpoint that is not empty fails the remount)."""
    emulator.knobs.processing_s = 1.0
    emulator.knobs.processing_jitter_s = 2.0
    daemon = _on_the_mount(daemon_process, smb_mount, tmp_path)
    daemon.start()
    files = _scan(samba, tmp_path, 12)
    share = smb_mount.share
    wait_until(lambda: len(emulator.uploads) == len(files), 15, "every file uploaded")
    unmounted = time.monotonic()
    smb_mount.unmount(lazy=True)  # smbnetfs serves the daemon's open files for 10 s more, then is killed

    def nothing_under_the_mountpoint() -> None:
        bare = sorted(str(p.relative_to(smb_mount.mountpoint)) for p in smb_mount.mountpoint.rglob("*"))
        assert bare == [], f"written into the bare mountpoint: {bare}"

    nothing_under_the_mountpoint()
    _hold_outage(unmounted, nothing_under_the_mountpoint)
    smb_mount.mount()
    back = time.monotonic()
    print(f"the share was unmounted for {back - unmounted:.1f} s")
    wait_until(
        lambda: len(_done(share)) + len(_failed(share)) >= len(files),
        20,
        lambda: f"all {len(files)} files done ({len(_done(share))}) or failed ({len(_failed(share))})",
    )
    print(f"all finished {time.monotonic() - back:.1f} s after the remount")
    _assert_all_done_once(share, emulator, files)
    rows = daemon.journal("SELECT state, final_path FROM files")
    assert {state for state, _ in rows} == {"done"} and len(rows) == len(files)
    assert all(os.fsdecode(path).startswith(str(share / "done")) for _, path in rows)
    assert daemon.terminate() == 0
    before = len(daemon.log.read_text())
    daemon.start()
    wait_until(lambda: "ready: watching" in daemon.log.read_text()[before:], 10, "the restarted daemon ready")
    restarted = daemon.log.read_text()[before:]
    assert "had no journal row" not in restarted and " ERROR " not in restarted, restarted
    assert len(_done(share)) == len(files) and len(documents_per_sha(emulator)) == len(files)
    daemon.terminate()


def _hold_outage(since: float, check: Callable[[], None] = lambda: None) -> None:
    """Keep the share away until OUTAGE_S after ``since`` (a scenario's length, not a wait for
    something), running ``check`` every second meanwhile."""
    pause = threading.Event()
    while (left := since + OUTAGE_S - time.monotonic()) > 0:
        check()
        pause.wait(min(1.0, left))
