"""The token file watch (``token_file.TokenWatch``) on the test's thread: a fake clock, a real gate, a
real file. End to end with the daemon: test_token_fix.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from konfuzio_watch.gates import Gate
from konfuzio_watch.policy import Limits, Scope
from konfuzio_watch.token_file import TokenWatch

from .conftest import TOKEN
from .helpers import FakeClock, write_and_rename, write_in_place


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


@pytest.mark.parametrize(
    ("state", "change", "hangup", "probed_now", "reloads"),
    [
        (block_for_token, no_change, False, False, 0),  # the backoff as before
        (block_for_token, lambda p: write_and_rename(p, TOKEN), False, True, 0),
        (block_for_token, lambda p: write_in_place(p, TOKEN + "-longer"), False, True, 0),
        (block_for_token, touch_same_size, False, True, 0),  # same size and inode: mtime and ctime moved
        (block_for_token, lambda p: p.unlink(), False, True, 0),  # the probe says the file cannot be read
        (block_for_token, no_change, True, True, 0),  # SIGHUP: the account unlocked on the server
        (block_for_outage, lambda p: write_and_rename(p, TOKEN), True, False, 1),  # not the token's fault
        (stay_open, lambda p: write_and_rename(p, TOKEN), False, False, 0),  # nothing waits for a token
        (stay_open, no_change, True, False, 1),  # SIGHUP with the token accepted: the file is read again
    ],
)
def test_a_changed_token_file_or_sighup_has_the_token_probed_now(tmp_path, state, change, hangup, probed_now, reloads):
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
