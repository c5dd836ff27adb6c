"""Konfuzio down for a while, on a fake clock.

test_reliability's outage test watches a daemon for 3 s of real time while every upload fails, and
finds few attempts, no spinning and no file charged. What decides that is the policy's verdict on
each failed upload and the API gate that paces the probes: here they are driven through the same
3 s, and more, by a fake clock, with the end-to-end test's upload settings.
"""

from __future__ import annotations

import random

from konfuzio_watch import policy
from konfuzio_watch.gates import Gate
from konfuzio_watch.policy import Blocked, Cause, Failure, Limits, Scope, Step

from .helpers import FakeClock

LIMITS = Limits(base_s=0.1, cap_s=0.5, max_attempts=2)  # upload.backoff_base/cap_seconds, max_attempts
DOWN = Failure(Cause.UNAVAILABLE, "cannot connect to 127.0.0.1: connection refused")
STEP_S = 0.01  # how finely the test looks: far more often than any real loop wakes


def outage(gate: Gate, clock: FakeClock, seconds: float) -> list[float]:
    """Every upload the gate lets go during ``seconds`` of outage, each failing as the server is down,
    with the policy's verdict applied as a worker does; returns when each went."""
    tried: list[float] = []
    end = clock.now() + seconds
    while clock.now() < end:
        admitted = gate.admits(clock.now())
        if admitted is None or admitted > 0:  # open: files go; blocked: one probe once its delay is over
            tried.append(clock.now())
            decision = policy.decide(Step.UPLOAD, DOWN, 0, clock.now(), LIMITS, attempts=len(tried))
            assert isinstance(decision, Blocked) and decision.scope == Scope.API, f"charged to the file: {decision}"
            gate.block(clock.now(), decision.reason, decision.retry_after_s, decision.note)
        clock.advance(STEP_S)
    return tried


def test_an_outage_is_probed_at_a_growing_backoff_and_charges_no_file():
    clock = FakeClock()
    gate = Gate(Scope.API, LIMITS, rng=random.Random(24))

    tried = outage(gate, clock, 3.0)

    assert len(tried) <= 3.0 / 0.25 + 4, f"{len(tried)} upload attempts in 3 s: not backing off"
    assert len(tried) >= 3.0 / LIMITS.cap_s - 1, f"{len(tried)} attempts in 3 s: the probes stopped"
    gaps = [later - earlier for earlier, later in zip(tried, tried[1:], strict=False)]
    assert all(gap >= LIMITS.base_s / 2 - STEP_S for gap in gaps), f"probes closer than the backoff: {gaps}"
    assert all(gap <= LIMITS.cap_s + STEP_S for gap in gaps), f"a probe waited past the cap: {gaps}"
    assert gate.state.since == tried[0], "one episode from the first failure on"


def test_the_first_upload_after_the_outage_goes_within_the_cap_and_opens_the_gate():
    clock = FakeClock()
    gate = Gate(Scope.API, LIMITS, rng=random.Random(24))
    outage(gate, clock, 3.0)
    over = clock.now()

    while not gate.admits(clock.now()):
        clock.advance(STEP_S)
    gate.open(clock.now())  # the probe's upload succeeded

    assert clock.now() - over <= LIMITS.cap_s + STEP_S
    assert gate.admits(clock.now()) is None, "open: every worker takes files again"
