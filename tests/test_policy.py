"""The retry policy and the state table: pure, table-driven."""

from __future__ import annotations

import pytest

from konfuzio_watch import states
from konfuzio_watch.gates import CONFIRM_S, Gate
from konfuzio_watch.policy import (
    Blocked,
    Cause,
    Fail,
    Failure,
    Limits,
    Retry,
    Scope,
    Step,
    backoff_s,
    cap_retry_after,
    decide,
)
from konfuzio_watch.states import State

LIMITS = Limits(base_s=2.0, cap_s=300.0, max_attempts=8, max_failures=30)
NOW = 1000.0


def failure(cause: Cause, **kw: object) -> Failure:
    return Failure(cause, f"{cause} happened", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("step", "cause", "failures", "attempts", "expected"),
    [
        # the service as a whole: a gate, whatever the step, charging nobody
        (Step.UPLOAD, Cause.UNAVAILABLE, 0, 1, Blocked),
        (Step.FETCH, Cause.UNAVAILABLE, 5, 0, Blocked),
        (Step.UPLOAD, Cause.THROTTLED, 0, 1, Blocked),
        (Step.FETCH, Cause.THROTTLED, 0, 0, Blocked),
        (Step.UPLOAD, Cause.REJECTED, 0, 1, Blocked),
        (Step.FETCH, Cause.REJECTED, 0, 0, Blocked),  # a GET answered 401/403: not retried forever
        (Step.EXPORT, Cause.REJECTED, 0, 0, Blocked),  # the bbox request: never exported without boxes
        (Step.UPLOAD, Cause.NOT_FOUND, 0, 1, Blocked),  # the upload URL is not there: the host is wrong
        (Step.RECONCILE, Cause.NOT_FOUND, 0, 0, Blocked),
        (Step.EXPORT, Cause.DISK_FULL, 0, 0, Blocked),
        (Step.FAIL, Cause.DISK_FULL, 0, 0, Blocked),
        # a share that does not answer (EIO, ENOTCONN ... on the inbox, processing/, done/, failed/): never the
        # file's fault, in any step, however many failures or attempts it had
        (Step.CLAIM, Cause.SHARE_UNAVAILABLE, 0, 0, Blocked),
        (Step.UPLOAD, Cause.SHARE_UNAVAILABLE, 7, 8, Blocked),
        (Step.EXPORT, Cause.SHARE_UNAVAILABLE, 29, 0, Blocked),
        (Step.FAIL, Cause.SHARE_UNAVAILABLE, 1000, 0, Blocked),
        # the file's own trouble
        (Step.UPLOAD, Cause.INVALID, 0, 1, Fail),
        (Step.FETCH, Cause.INVALID, 0, 0, Fail),  # a GET answered 400: not retried forever
        (Step.FETCH, Cause.NOT_FOUND, 0, 0, Fail),
        (Step.UPLOAD, Cause.TRANSIENT, 0, 1, Retry),
        (Step.UPLOAD, Cause.TRANSIENT, 7, 8, Fail),  # max_attempts used up
        (Step.UPLOAD, Cause.UNREADABLE, 0, 0, Retry),
        (Step.UPLOAD, Cause.UNREADABLE, 7, 0, Fail),  # an unreadable file ends, it does not spin
        (Step.FETCH, Cause.TRANSIENT, 0, 0, Retry),
        (Step.FETCH, Cause.TRANSIENT, 29, 0, Fail),  # max_failures used up
        (Step.EXPORT, Cause.LOCAL_IO, 3, 0, Retry),
        (Step.EXPORT, Cause.LOCAL_IO, 29, 0, Fail),
        (Step.FETCH, Cause.INTERNAL, 0, 0, Retry),  # a bug backs off like anything else
        (Step.FETCH, Cause.INTERNAL, 29, 0, Fail),
        # failed/ itself: nowhere further to go, so it backs off to the cap forever
        (Step.FAIL, Cause.LOCAL_IO, 1000, 0, Retry),
        (Step.FAIL, Cause.INTERNAL, 1000, 0, Retry),
    ],
)
def test_what_the_policy_decides(step, cause, failures, attempts, expected):
    decision = decide(step, failure(cause), failures, NOW, LIMITS, attempts=attempts)
    assert type(decision) is expected, decision


def test_an_upload_the_server_may_hold_is_looked_for_before_it_fails():
    failure = Failure(Cause.TRANSIENT, "ReadTimeout", maybe_received=True)
    assert isinstance(decide(Step.UPLOAD, failure, 7, NOW, LIMITS, attempts=8), Retry)


def test_blocked_scopes():
    assert decide(Step.FETCH, failure(Cause.UNAVAILABLE), 0, NOW, LIMITS).scope == Scope.API  # type: ignore[union-attr]
    assert decide(Step.EXPORT, failure(Cause.DISK_FULL), 0, NOW, LIMITS).scope == Scope.OUTPUT  # type: ignore[union-attr]
    shares = decide(Step.EXPORT, failure(Cause.SHARE_UNAVAILABLE), 0, NOW, LIMITS)
    assert isinstance(shares, Blocked) and shares.scope == Scope.SHARES and shares.retry_after_s is None
    rejected = decide(Step.FETCH, failure(Cause.REJECTED, status=401), 0, NOW, LIMITS)
    assert isinstance(rejected, Blocked) and "rejected the API token" in rejected.reason


@pytest.mark.parametrize(("failures", "delay"), [(0, 2), (1, 4), (2, 8), (5, 64), (7, 256), (8, 300), (60, 300)])
def test_backoff_doubles_to_the_cap(failures, delay):
    decision = decide(Step.FETCH, failure(Cause.TRANSIENT), failures, NOW, Limits(max_failures=100))
    assert isinstance(decision, Retry)
    assert decision.delay_s == delay and decision.at == NOW + delay


def test_jitter_spreads_below_the_ceiling():
    assert backoff_s(3, LIMITS, jitter=0.5) == 4.0
    assert backoff_s(3, LIMITS, jitter=1.0) == 8.0


@pytest.mark.parametrize(
    ("retry_after", "expected", "noted"),
    [
        (None, None, False),
        (0.0, 0.0, False),
        (30.0, 30.0, False),
        (300.0, 300.0, False),
        (999_999_999.0, 300.0, True),  # a far-future Retry-After is cut to the cap, and it says so
    ],
)
def test_retry_after_is_capped_and_noted(retry_after, expected, noted):
    capped, note = cap_retry_after(retry_after, LIMITS)
    assert capped == expected and bool(note) == noted
    decision = decide(Step.UPLOAD, failure(Cause.THROTTLED, retry_after_s=retry_after), 0, NOW, LIMITS, attempts=1)
    assert isinstance(decision, Blocked) and decision.retry_after_s == expected and bool(decision.note) == noted


def test_retry_after_on_a_transient_failure_lengthens_the_delay_up_to_the_cap():
    decision = decide(Step.FETCH, failure(Cause.TRANSIENT, retry_after_s=10_000.0), 0, NOW, LIMITS)
    assert isinstance(decision, Retry) and decision.delay_s == 300.0


# -- gates ----------------------------------------------------------------------------------------


def test_a_blocked_gate_admits_one_probe_after_its_delay_and_opens_on_success():
    gate = Gate(Scope.API, Limits(base_s=2.0, cap_s=10.0))
    assert gate.admits(NOW) is None  # open: no limit
    delay = gate.block(NOW, "Konfuzio is unavailable")
    assert 1.0 <= delay <= 2.0
    assert gate.admits(NOW) == 0 and gate.admits(NOW + delay) == 1
    gate.probe_started()
    assert gate.admits(NOW + delay) == 0, "one probe at a time"
    second = gate.block(NOW + delay, "still unavailable")  # the probe failed: longer
    assert 2.0 <= second <= 4.0 and gate.state.failures == 2
    gate.probe_started()
    assert gate.open(NOW + 10) is True
    assert gate.admits(NOW + 10) is None and gate.state.failures == 0
    assert gate.open(NOW + 11) is False


def test_a_gate_honours_a_capped_retry_after():
    gate = Gate(Scope.API, Limits(base_s=0.1, cap_s=5.0))
    assert gate.block(NOW, "throttled", retry_after_s=5.0) == 5.0
    assert gate.admits(NOW + 4.9) == 0 and gate.admits(NOW + 5.0) == 1


# -- the state table ------------------------------------------------------------------------------


def test_the_diagram_in_the_docstring_is_drawn_from_the_table():
    drawn = "\n".join("    " + line for line in states.diagram().splitlines())
    assert drawn in (states.__doc__ or "")


def test_every_state_has_a_row_and_finished_states_lead_nowhere_but_retry():
    assert set(states.TRANSITIONS) == set(State)
    assert states.TRANSITIONS[State.DONE] == frozenset()
    assert states.TRANSITIONS[State.FAILED] == {State.RETRIED}
    for state in states.ACTIVE:
        assert states.TRANSITIONS[state], f"{state} is a dead end"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.CLAIMED, State.DONE),
        (State.DONE, State.FAILING),
        (State.UPLOADED, State.CLAIMED),
        (State.FAILED, State.DONE),
    ],
)
def test_illegal_moves_are_refused(old, new):
    with pytest.raises(states.IllegalTransition):
        states.check_transition(old, new)


def test_a_gate_that_flaps_is_one_episode_with_two_log_lines(caplog):
    caplog.set_level("DEBUG", logger="konfuzio_watch")
    gate = Gate(Scope.JOURNAL, Limits(base_s=0.25, cap_s=2.0))
    t = NOW
    for _ in range(20):  # a disk with a few bytes free: a probe passes, the next real write fails
        t += gate.block(t, "the journal cannot be written (database or disk is full)")
        gate.open(t)
        gate.tend(t + 0.5)
        t += 0.5
    assert gate.state.blocked is False
    told = [r.levelname for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    assert told == ["ERROR"], "no recovery is announced while it keeps failing"
    assert gate.block(t, "still full") >= 1.0, "the backoff grew over the episode"
    assert gate.state.since == NOW
    gate.open(t + 2)
    gate.tend(t + 2 + CONFIRM_S - 0.1)
    assert [r.levelname for r in caplog.records if r.levelname in ("ERROR", "WARNING")] == ["ERROR"]
    gate.tend(t + 2 + CONFIRM_S)
    told = [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    assert [r.levelname for r in told] == ["ERROR", "WARNING"]
    assert "the journal is writable again" in told[-1].getMessage()


def test_throttling_now_and_then_does_not_grow_the_pause_while_work_goes_on():
    gate = Gate(Scope.API, Limits(base_s=1.0, cap_s=300.0))
    t = NOW
    for _ in range(30):  # a 429 after every few successes, for minutes
        t += gate.block(t, "Konfuzio is throttling requests")
        gate.open(t)
        for _ in range(5):
            gate.open(t)  # uploads that went through
        t += 1
    assert gate.block(t, "throttled again") <= 1.0, "the pause stays at the base, not the cap"
