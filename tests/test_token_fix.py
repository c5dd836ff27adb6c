"""A fixed API token is noticed within seconds, not after the API gate's backoff (issue 23, item 4).

While Konfuzio rejects the token, the API gate is blocked and probed with ``backoff_cap_seconds`` as
its ceiling (300 s by default). A token file that changes (written in place, or replaced by a rename
as most tools do), or a SIGHUP, has the token probed at once."""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import TOKEN, drop, wait_until
from .helpers import (
    DaemonProcess,
    assert_each_file_finished_exactly_once,
    sample_files,
    write_and_rename,
    write_in_place,
)

FILES = 10
BOUND_S = 15.0  # from the fix to every file done
# A token that has been wrong for a few minutes: the gate's next probe is 30-60 s away (the default
# base of 2 s reaches such delays after five failed probes). The default cap of 300 s.
SLOW_PROBES = {"backoff_base_seconds": 60, "backoff_cap_seconds": 300}


def blocked_with_files_waiting(daemon: DaemonProcess, emulator) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    daemon.start()
    files = sample_files(FILES, "tok")
    for rel, data in files.items():
        drop(daemon.root / "inbox" / rel, data)
    wait_until(
        lambda: "Konfuzio rejected the API token" in daemon.log.read_text(),
        20,
        lambda: f"the API gate blocked (log: {daemon.log.read_text()[-1500:]})",
    )
    wait_until(lambda: daemon.journal("SELECT COUNT(*) FROM files")[0][0] == FILES, 20, f"{FILES} files claimed")
    assert emulator.uploads == []
    return files


def finished_within_bound(daemon: DaemonProcess) -> float:
    """Seconds until every file is done, from now; fails after ``BOUND_S``."""
    fixed_at = time.monotonic()
    wait_until(
        lambda: daemon.journal("SELECT COUNT(*) FROM files WHERE state = 'done'")[0][0] == FILES,
        BOUND_S,
        lambda: f"{FILES} files done within {BOUND_S:g} s of the fix (log: {daemon.log.read_text()[-1500:]})",
        interval_s=0.05,
    )
    took = time.monotonic() - fixed_at
    print(f"token fixed -> {FILES} files done: {took:.1f} s")
    return took


@pytest.mark.slow
@pytest.mark.parametrize("write", [write_and_rename, write_in_place], ids=["rename", "in-place"])
def test_a_fixed_token_file_is_tried_at_once(tmp_path, emulator, daemon_process, write):
    token_file = tmp_path / "konfuzio-token"
    token_file.write_text("a-wrong-token\n", encoding="utf-8")
    daemon = daemon_process(konfuzio={"token": None, "token_file": str(token_file)}, upload=SLOW_PROBES)
    files = blocked_with_files_waiting(daemon, emulator)

    write(token_file, TOKEN + "\n")
    finished_within_bound(daemon)
    assert_each_file_finished_exactly_once(tmp_path, emulator, files)
    log = daemon.log.read_text()
    assert f"the API token file {token_file} changed; trying the token now" in log
    assert daemon.terminate() == 0


@pytest.mark.slow
def test_sighup_tries_the_token_at_once(tmp_path, emulator, daemon_process):
    """The token is the same, but Konfuzio accepts it again (the account was unlocked)."""
    emulator.token = "the-account-is-locked"
    daemon = daemon_process(upload=SLOW_PROBES)
    files = blocked_with_files_waiting(daemon, emulator)

    emulator.token = TOKEN
    assert daemon.proc
    daemon.proc.send_signal(signal.SIGHUP)
    finished_within_bound(daemon)
    assert_each_file_finished_exactly_once(tmp_path, emulator, files)
    assert "SIGHUP: trying the API token now" in daemon.log.read_text()
    assert daemon.terminate() == 0
