"""The one answer to "are callbacks arriving?" (reachability.CallbackWatch), driven by a fake clock."""

from __future__ import annotations

import time

import pytest

from konfuzio_watch.reachability import MISSES_BEFORE_WARNING, CallbackWatch, Reachability, clock_time

from .helpers import FakeClock

URL = "https://scans.example.com"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


def test_until_the_probe_answers_it_is_not_known(clock: FakeClock) -> None:
    watch = CallbackWatch(clock)
    assert watch.verdict().arriving is None and not watch.missing
    assert watch.verdict().text == "not known yet: the start-up probe has not answered"


def test_a_failed_probe_is_no_with_its_reason_and_time(clock: FakeClock) -> None:
    watch = CallbackWatch(clock)
    verdict = watch.probed(Reachability(False, URL, "cannot connect to scans.example.com:443: connection refused"))
    assert verdict == watch.verdict() and verdict.arriving is False and watch.missing
    assert verdict.text == (
        f"no: a probe through {URL} failed at {clock_time(clock.t)}: cannot connect to "
        "scans.example.com:443: connection refused; results are polled"
    )
    assert verdict.since == clock.t and verdict.to_dict()["url"] == URL


def test_a_callback_after_a_failed_probe_is_yes_and_says_when_the_last_one_came(clock: FakeClock) -> None:
    watch = CallbackWatch(clock)
    watch.probed(Reachability(False, URL, "HTTP 502"))
    clock.advance(60)
    assert watch.callback_arrived() is True  # the answer changed: the daemon says so
    first = clock.t
    clock.advance(12)
    assert watch.callback_arrived() is False  # still yes: nothing new to say
    verdict = watch.verdict()
    assert verdict.arriving is True and verdict.since == first
    assert verdict.text == f"yes: the last callback arrived at {clock_time(clock.t)}"


def test_a_callback_before_the_probe_answered_is_not_overruled_by_it(clock: FakeClock) -> None:
    watch = CallbackWatch(clock)
    watch.callback_arrived()
    verdict = watch.probed(Reachability(False, URL, "timed out"))
    assert verdict.arriving is True and verdict.text.startswith("yes: the last callback arrived at ")


def test_results_found_by_polling_in_a_row_turn_it_to_no_once(clock: FakeClock) -> None:
    watch = CallbackWatch(clock)
    watch.probed(Reachability(True, URL, ""))
    assert watch.verdict().text == f"yes: a probe through {URL} arrived at {clock_time(clock.t)}"
    said = [watch.found_by_polling() for _ in range(MISSES_BEFORE_WARNING + 2)]
    assert said == [False] * (MISSES_BEFORE_WARNING - 1) + [True, False, False]
    assert watch.verdict().arriving is False
    assert watch.verdict().text == (
        f"no: {MISSES_BEFORE_WARNING} results in a row were found by polling, their "
        f"callbacks never came (since {clock_time(clock.t)}); results are polled"
    )
    assert watch.callback_arrived() is True and watch.verdict().arriving is True
    assert [watch.found_by_polling() for _ in range(MISSES_BEFORE_WARNING - 1)] == [False, False], (
        "a callback starts the count again"
    )


def test_an_earlier_day_is_written_with_its_date() -> None:
    assert clock_time(time.time()).count(":") == 2 and "-" not in clock_time(time.time())
    assert clock_time(time.time() - 3 * 86400).startswith(
        time.strftime("%Y-%m-%d", time.localtime(time.time() - 3 * 86400))
    )
