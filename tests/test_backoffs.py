"""The backoffs outside the file steps come from ``policy`` too: a blocked gate's probes, and the
exponent that no count of failures can overflow."""

from __future__ import annotations

import random

import pytest

from konfuzio_watch.policy import SUCCESSES_TO_RESET, Limits, backoff_s, draw_jitter, gate_backoff

LIMITS = Limits(base_s=0.25, cap_s=2.0)


def test_a_backoff_after_any_number_of_failures_is_the_cap():
    # A gate counts every failed probe of an outage: a journal unwritable for an hour is thousands.
    assert backoff_s(100_000, LIMITS) == LIMITS.cap_s
    assert backoff_s(100_000, LIMITS, jitter=0.5) == LIMITS.cap_s / 2


@pytest.mark.parametrize(
    ("failures", "was_blocked", "successes", "counted"),
    [
        (0, False, 0, 1),  # the first failure of an episode
        (3, True, 0, 4),  # a failed probe: the backoff keeps growing
        (3, False, SUCCESSES_TO_RESET - 1, 4),  # right after a probe passed: still the same episode
        (3, False, SUCCESSES_TO_RESET, 1),  # work went on in between: it starts over
    ],
)
def test_a_gates_failure_count(failures: int, was_blocked: bool, successes: int, counted: int):
    found, delay = gate_backoff(
        failures, was_blocked=was_blocked, successes=successes, limits=LIMITS, jitter=1.0, retry_after_s=None
    )
    assert (found, delay) == (counted, backoff_s(counted, LIMITS))


def test_a_gate_waits_at_least_the_retry_after():
    _, delay = gate_backoff(0, was_blocked=False, successes=0, limits=LIMITS, jitter=1.0, retry_after_s=1.5)
    assert delay == 1.5


def test_jitter_is_between_half_and_the_whole_ceiling():
    rng = random.Random(7)
    assert all(0.5 <= draw_jitter(rng) <= 1.0 for _ in range(1000))
