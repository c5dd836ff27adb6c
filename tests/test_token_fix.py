"""A fixed API token is noticed within seconds, not after the API gate's backoff (issue 23, item 4).

While Konfuzio rejects the token, the API gate is blocked and probed with ``backoff_cap_seconds`` as
its ceiling (300 s by default). A token file that changes (written in place, or replaced by a rename
as systemd's credentials and most admins' tools do), or a SIGHUP, has the token probed at once."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from konfuzio_watch.gates import Gate
from konfuzio_watch.policy import Limits, Scope
from konfuzio_watch.token_file import TokenWatch

from .conftest import TOKEN, drop, wait_until
from .helpers import DaemonProcess, FakeClock, assert_each_file_finished_exactly_once, sample_files

FILES = 10
BOUND_S = 15.0  # from the fix to every file done
# A token that has been wrong for a few minutes: the gate's next probe is 30-60 s away (the default
# base of 2 s reaches such delays after five failed probes). The default cap of 300 s.
SLOW_PROBES = {"backoff_base_seconds": 60, "backoff_cap_seconds": 300}


def write_in_place(path: Path, text: str) -> None:
    with open(path, "r+", encoding="utf-8") as f:
        f.truncate(0)
        f.write(text)


def write_and_rename(path: Path, text: str) -> None:
    new = path.with_name(path.name + ".new")
    new.write_text(text, encoding="utf-8")
    os.replace(new, path)


# -- the watch, on the test's thread: a fake clock, a real gate, a real file --------------------------


def probe() -> None:  # the gate's own probe (Pipeline.probe_account): only whether it is due matters here
    raise AssertionError("not called here")


def no_change(_path: Path) -> None:
    pass


def touch_same_size(path: Path) -> None:
    write_in_place(path, path.read_text(encoding="utf-8").upper())


def block_for_token(gate: Gate, now: float) -> None:
    gate.block(now, "Konfuzio rejected the API token (HTTP 401)", probe=probe)


def block_for_outage(gate: Gate, now: float) -> None:
    gate.block(now, "Konfuzio is unavailable (HTTP 503)")


def stay_open(_gate: Gate, _now: float) -> None:
    pass


@pytest.mark.parametrize(("state", "change", "hangup", "probed_now", "reloads"), [
    (block_for_token, no_change, False, False, 0),  # the backoff as before
    (block_for_token, lambda p: write_and_rename(p, TOKEN), False, True, 0),
    (block_for_token, lambda p: write_in_place(p, TOKEN + "-longer"), False, True, 0),
    (block_for_token, touch_same_size, False, True, 0),  # same size and inode: mtime and ctime moved
    (block_for_token, lambda p: p.unlink(), False, True, 0),  # the probe says the file cannot be read
    (block_for_token, no_change, True, True, 0),  # SIGHUP: the account unlocked on the server
    (block_for_outage, lambda p: write_and_rename(p, TOKEN), True, False, 1),  # not the token's fault
    (stay_open, lambda p: write_and_rename(p, TOKEN), False, False, 0),  # nothing waits for a token
    (stay_open, no_change, True, False, 1),  # SIGHUP with the token accepted: the file is read again
])
def test_a_changed_token_file_or_sighup_has_the_token_probed_now(tmp_path, state, change, hangup, probed_now,
                                                                   reloads):
    clock = FakeClock()
    token_file = tmp_path / "token"
    token_file.write_text("a-wrong-token", encoding="utf-8")
    gate = Gate(Scope.API, Limits(base_s=60, cap_s=300), rng=random.Random(1))
    reloaded: list[int] = []
    watch = TokenWatch(token_file, gate, lambda: reloaded.append(1))
    state(gate, clock.now())
    watch.look(clock.advance(1))
    change(token_file)
    if hangup:
        watch.hangup()
    watch.look(clock.advance(1))
    assert (gate.own_probe_due(clock.now()) is not None) == probed_now
    assert len(reloaded) == reloads
    watch.look(clock.advance(1))
    assert gate.is_blocked == (state is not stay_open), "the watch never opens or blocks the gate itself"


def test_a_change_while_a_probe_is_out_is_probed_after_it(tmp_path):
    """That probe may have read the file before the fix: if it fails, the fixed token is probed next."""
    clock = FakeClock()
    token_file = tmp_path / "token"
    token_file.write_text("a-wrong-token", encoding="utf-8")
    gate = Gate(Scope.API, Limits(base_s=60, cap_s=300), rng=random.Random(1))
    watch = TokenWatch(token_file, gate, lambda: None)
    block_for_token(gate, clock.now())
    gate.probe_now(clock.now())
    gate.probe_started()
    write_and_rename(token_file, TOKEN)
    watch.look(clock.advance(1))
    assert gate.own_probe_due(clock.now()) is None, "one probe at a time"
    block_for_token(gate, clock.now())  # it read the old token
    watch.look(clock.advance(1))
    assert gate.own_probe_due(clock.now()) is not None
    watch.look(clock.advance(1))
    gate.probe_started()
    block_for_token(gate, clock.now())  # and that failed too: now the backoff again, no loop
    watch.look(clock.advance(1))
    assert gate.own_probe_due(clock.now()) is None


def test_with_the_token_in_the_config_only_sighup_hurries_the_probe():
    clock = FakeClock()
    gate = Gate(Scope.API, Limits(base_s=60, cap_s=300), rng=random.Random(1))
    watch = TokenWatch(None, gate, lambda: None)
    block_for_token(gate, clock.now())
    watch.look(clock.advance(1))
    assert gate.own_probe_due(clock.now()) is None
    watch.hangup()
    watch.look(clock.advance(1))
    assert gate.own_probe_due(clock.now()) is not None


# -- end to end: the real daemon, the emulator rejecting the token -----------------------------------


def blocked_with_files_waiting(daemon: DaemonProcess, emulator) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    daemon.start()
    files = sample_files(FILES, "tok")
    for rel, data in files.items():
        drop(daemon.root / "inbox" / rel, data)
    wait_until(lambda: "Konfuzio rejected the API token" in daemon.log.read_text(), 20,
               lambda: f"the API gate blocked (log: {daemon.log.read_text()[-1500:]})")
    wait_until(lambda: daemon.journal("SELECT COUNT(*) FROM files")[0][0] == FILES, 20, f"{FILES} files claimed")
    assert emulator.uploads == []
    return files


def finished_within_bound(daemon: DaemonProcess) -> float:
    """Seconds until every file is done, from now; fails after ``BOUND_S``."""
    fixed_at = time.monotonic()
    wait_until(lambda: daemon.journal("SELECT COUNT(*) FROM files WHERE state = 'done'")[0][0] == FILES, BOUND_S,
               lambda: f"{FILES} files done within {BOUND_S:g} s of the fix (log: {daemon.log.read_text()[-1500:]})",
               interval_s=0.05)
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
