"""An upload answered 500 is an answer from the application, whose handler has finished: one look
at the document list settles whether it stored the file. Only answers that may come while the server
is still storing (timeouts, resets, a gateway's 502/503/504) wait out upload.reconcile_window_seconds."""

from __future__ import annotations

import logging
import time

import pytest

from konfuzio_watch import policy
from konfuzio_watch.emulator.faults import UPLOAD_PATH, FaultRule
from konfuzio_watch.policy import Cause, Failure, Limits, Retry, Step
from konfuzio_watch.samples import make_pdf

from .conftest import drop
from .helpers import FakeClock, assert_own_result, documents_per_sha, drop_batch

WINDOW_S = 120.0  # the default upload.reconcile_window_seconds (konfuzio.timeout_seconds)

ANSWERS = [  # (what the POST got, the server may still store it afterwards?)
    (Failure(Cause.TRANSIENT, "HTTP 500: Server Error", status=500, maybe_received=True), False),
    (Failure(Cause.TRANSIENT, "HTTP 507: Insufficient Storage", status=507, maybe_received=True), False),
    (Failure(Cause.UNAVAILABLE, "HTTP 502: Bad Gateway", status=502, maybe_received=True), True),
    (Failure(Cause.UNAVAILABLE, "HTTP 503", status=503, maybe_received=True), True),
    (Failure(Cause.UNAVAILABLE, "HTTP 504: Gateway Time-out", status=504, maybe_received=True), True),
    (Failure(Cause.TRANSIENT, "no answer in time (read timeout)", maybe_received=True), True),
    (Failure(Cause.TRANSIENT, "Connection reset by peer", maybe_received=True), True),
    (Failure(Cause.TRANSIENT, "unexpected response: not JSON", maybe_received=True), True),
]


@pytest.mark.parametrize(("failure", "still_storing"), ANSWERS, ids=[f.message[:24] for f, _ in ANSWERS])
def test_only_answers_that_may_come_while_the_server_stores_wait_the_window(failure, still_storing):
    clock = FakeClock()
    limits = Limits(base_s=2.0, cap_s=300.0)
    window = policy.reconcile_window_s(failure, WINDOW_S)
    assert window == (WINDOW_S if still_storing else 0.0)
    decision = policy.decide(Step.UPLOAD, failure, 0, clock.now(), limits, attempts=1)
    if isinstance(decision, Retry):  # the first look comes after the backoff, the window never shortens it
        assert decision.at == clock.now() + 2.0
        assert policy.upload_again_at(clock.now(), decision.at, window) == clock.now() + max(2.0, window)


@pytest.mark.slow
def test_a_500_after_the_handler_stored_the_file_is_found_by_the_one_look(start_daemon, emulator):
    emulator.knobs.fault_rules = [FaultRule("POST", UPLOAD_PATH, 500, forward_after_s=0, count=1)]
    running = start_daemon(upload={"reconcile_window_seconds": WINDOW_S})
    data = make_pdf(label="stored, then 500")
    started = time.monotonic()
    drop(running.inbox / "stored.pdf", data)
    running.wait_finished(1, timeout_s=30)
    assert time.monotonic() - started < 30
    assert emulator.knobs.fault_rules[0].hits == 1
    assert_own_result(running.done, "stored.pdf", data)
    assert len(emulator.uploads) == 1, f"{len(emulator.uploads)} documents for 1 file"


@pytest.mark.slow
def test_a_throttled_burst_with_500s_is_done_without_waiting_the_reconcile_window(start_daemon, emulator, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    emulator.knobs.rate_429 = 0.3
    emulator.knobs.upload_500_rate = 0.1
    emulator.knobs.fault_rules = [FaultRule("POST", UPLOAD_PATH, 500, count=2)]  # some 500s, whatever the dice say
    running = start_daemon(upload={"reconcile_window_seconds": WINDOW_S})
    started = time.monotonic()
    files = drop_batch(running, 30, prefix="burst")
    running.wait_finished(30, timeout_s=WINDOW_S + 30)
    took_s = time.monotonic() - started
    failed_500 = [
        r.getMessage() for r in caplog.records if "upload failed" in r.getMessage() and "HTTP 500" in r.getMessage()
    ]
    print(f"burst of 30: all done in {took_s:.1f} s, {len(failed_500)} uploads answered 500; {failed_500[:1]}")
    assert failed_500, "the emulator answered no upload 500: the test shows nothing"
    for name, data in files.items():
        assert_own_result(running.done, name, data)
    assert set(documents_per_sha(emulator).values()) == {1}, "a file was uploaded twice"
    # The 429s alone make the burst take a while (every one pauses all API work); files answered 500
    # that waited the whole reconcile window would take longer than this bound.
    assert took_s < WINDOW_S * 0.75, f"took {took_s:.1f} s: the files answered 500 waited the reconcile window"
    assert "one look at the server's documents" in failed_500[0]
