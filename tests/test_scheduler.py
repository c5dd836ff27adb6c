"""The scheduling loop (scheduler.Scheduler) on the test's thread, driven by a fake clock.

The loop's parts are the real gates and the real candidate tracker on tmp_path; the journal, the
pipeline and the dispatcher are fakes that record what the loop asked of them (the dispatcher on the
real pipeline has its own tests in test_dispatcher.py). No server, no thread, no sleep: a test moves
the clock and calls ``tick``, ``next_wake`` or ``run``.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from konfuzio_watch import writers
from konfuzio_watch.events import CleanupWanted, FileSeen, FolderSeen, JournalFailed, RescanRequested, StepDone
from konfuzio_watch.gates import CONFIRM_S, LOCAL_LIMITS, Gates
from konfuzio_watch.journal import JournalWriteError
from konfuzio_watch.policy import Limits, Scope
from konfuzio_watch.runner import ClaimsPaused
from konfuzio_watch.scheduler import MAX_SLEEP_S, Duty, Scheduler
from konfuzio_watch.tracker import CandidateTracker

from .helpers import FakeClock

SETTLE_S, GRACE_S = 2.0, 30.0
JOURNAL_CAP_S = LOCAL_LIMITS[Scope.JOURNAL].cap_s


class FakeJournal:
    """The journal as the loop uses it: a probe write, which fails while ``full``."""

    def __init__(self) -> None:
        self.full = False
        self.probes: list[float] = []

    def probe(self, now: float) -> None:
        self.probes.append(now)
        if self.full:
            raise JournalWriteError("database or disk is full")


@dataclass
class FakeDispatcher:
    calls: list[tuple[str, object]]
    due: float | None = None
    inflight: dict[int, str] = field(default_factory=dict)
    cleanup_wanted: bool = False
    finished_events: list[StepDone] = field(default_factory=list)
    unreadable: bool = False  # the journal cannot be read: next_due raises

    def tick(self, now: float) -> None:
        self.calls.append(("tick", now))

    def next_due(self, now: float) -> float | None:
        if self.unreadable:
            raise JournalWriteError("the database server cannot be reached")
        return self.due

    def finished(self, event: StepDone) -> None:
        self.finished_events.append(event)


@dataclass
class FakePipeline:
    calls: list[tuple[str, object]]
    refuse: Exception | None = None  # raised by the next claim
    recovered: list[tuple[set[int], bool]] = field(default_factory=list)

    def claim(self, names: list[bytes], detected: dict[bytes, float] | None = None) -> None:
        if self.refuse is not None:
            refused, self.refuse = self.refuse, None
            raise refused
        self.calls.append(("claim", (sorted(names), detected)))

    def recover(self, in_hand: set[int], alone: bool) -> None:
        self.recovered.append((in_hand, alone))


@dataclass
class Loop:
    clock: FakeClock
    inbox: Path
    journal: FakeJournal
    pipeline: FakePipeline
    dispatcher: FakeDispatcher
    tracker: CandidateTracker
    gates: Gates
    scheduler: Scheduler
    calls: list[tuple[str, object]]

    def drop(self, *names: str) -> None:
        """Files in the inbox, seen now."""
        for name in names:
            path = self.inbox / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x89PNG " + name.encode())
            self.tracker.seen(str(path), self.clock.now())

    def claimed(self) -> list[list[bytes]]:
        return [payload[0] for kind, payload in self.calls if kind == "claim"]  # type: ignore[index]

    def ticks(self) -> int:
        return sum(1 for kind, _ in self.calls if kind == "tick")


def scan(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())


def make_loop(tmp_path: Path, duties: Iterable[Duty] = (), scan_inbox: Iterable[str] = ()) -> Loop:
    clock = FakeClock()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    calls: list[tuple[str, object]] = []
    journal, pipeline, dispatcher = FakeJournal(), FakePipeline(calls), FakeDispatcher(calls)
    # no look through /proc: nothing here holds the files open
    tracker = CandidateTracker(SETTLE_S, GRACE_S, scan, inbox=str(inbox), find_writers=lambda files: writers.Look())
    gates = Gates(Limits(base_s=1.0, cap_s=60.0), rng=random.Random(24))
    scheduler = Scheduler(
        clock=clock,
        journal=journal,  # type: ignore[arg-type]
        gates=gates,
        pipeline=pipeline,  # type: ignore[arg-type]
        dispatcher=dispatcher,  # type: ignore[arg-type]
        tracker=tracker,
        inbox=str(inbox),
        scan=lambda: list(scan_inbox),
        duties=duties,
    )
    return Loop(clock, inbox, journal, pipeline, dispatcher, tracker, gates, scheduler, calls)


@pytest.fixture
def loop(tmp_path: Path) -> Loop:
    return make_loop(tmp_path)


# -- duties --------------------------------------------------------------------------------------


def test_a_duty_runs_at_the_first_tick_and_then_every_interval(tmp_path: Path):
    ran: list[float] = []
    status = Duty("status", 10.0, ran.append)
    off = Duty("tunnel check", None, ran.append)
    loop = make_loop(tmp_path, duties=[status, off])
    start = loop.clock.now()

    loop.scheduler.tick(start)
    loop.scheduler.tick(loop.clock.advance(9.0))
    loop.scheduler.tick(loop.clock.advance(1.0))
    loop.scheduler.tick(loop.clock.advance(25.0))

    assert ran == [start, start + 10.0, start + 35.0], "due at start, then 10 s after each run"
    assert (status.runs, off.runs) == (3, 0), "a duty without an interval never runs"
    assert loop.scheduler.next_wake(loop.clock.now()) == start + 45.0


def test_a_duty_that_cannot_write_the_journal_blocks_the_journal_gate_and_the_next_still_runs(tmp_path: Path):
    def heartbeat(now: float) -> None:
        raise JournalWriteError("disk I/O error")

    ran: list[float] = []
    loop = make_loop(tmp_path, duties=[Duty("heartbeat", 5.0, heartbeat), Duty("status", 5.0, ran.append)])

    loop.scheduler.tick(loop.clock.now())

    gate = loop.gates[Scope.JOURNAL]
    assert gate.is_blocked and gate.state.reason == "the journal cannot be written (disk I/O error)"
    assert ran == [loop.clock.now()]
    assert loop.ticks() == 0, "with the journal gate shut, no step starts"


# -- when the loop wakes -------------------------------------------------------------------------


def test_an_idle_loop_sleeps_the_longest_sleep(loop: Loop):
    now = loop.clock.now()
    assert loop.scheduler.next_wake(now) == now + MAX_SLEEP_S


def test_the_loop_wakes_for_the_first_announcement_due_step_or_candidate(loop: Loop):
    now = loop.clock.now()
    loop.gates[Scope.API].block(now, "Konfuzio is unavailable")
    loop.gates[Scope.API].open(now + 0.5)
    assert loop.scheduler.next_wake(now) == now + 0.5 + CONFIRM_S, "the recovery is announced on time"

    loop.dispatcher.due = now + 3.0
    assert loop.scheduler.next_wake(now) == now + 3.0, "a step is due first"

    loop.drop("scan.png")
    assert loop.scheduler.next_wake(now) == now + SETTLE_S, "the candidate settles first"


# -- claims --------------------------------------------------------------------------------------


def test_settled_files_are_claimed_in_one_batch_after_the_due_steps_started(loop: Loop):
    start = loop.clock.now()
    loop.drop("a.png", "sub/b.png")

    loop.scheduler.tick(loop.clock.advance(SETTLE_S - 0.1))
    assert loop.claimed() == [], "not settled yet"

    loop.scheduler.tick(loop.clock.advance(0.1))
    assert [kind for kind, _ in loop.calls] == ["tick", "tick", "claim", "tick"], (
        "steps first, then the claim, then the steps of the files just claimed"
    )
    [(_, (names, detected))] = [c for c in loop.calls if c[0] == "claim"]
    assert names == [b"a.png", b"sub/b.png"], "names relative to the inbox, as bytes"
    assert detected == {b"a.png": start, b"sub/b.png": start}, "each with its first sighting"
    assert len(loop.tracker) == 0, "claimed: no longer a candidate"


def test_nothing_is_claimed_while_a_share_does_not_answer(loop: Loop):
    loop.drop("a.png")
    shares = loop.gates[Scope.SHARES]
    shares.block(loop.clock.now(), "the inbox does not answer (Input/output error)")

    loop.scheduler.tick(loop.clock.advance(SETTLE_S))
    assert loop.claimed() == [] and loop.ticks() == 1, "the steps go on; the claims wait"
    now = loop.clock.now()
    assert loop.scheduler.next_wake(now) == now + MAX_SLEEP_S, "a settled candidate does not wake the loop"

    shares.open(loop.clock.now())
    loop.scheduler.tick(loop.clock.now())
    assert loop.claimed() == [[b"a.png"]]


def test_a_claim_the_journal_cannot_record_keeps_the_files_and_pauses_everything(loop: Loop):
    loop.drop("a.png", "b.png")
    loop.pipeline.refuse = JournalWriteError("database or disk is full")

    loop.scheduler.tick(loop.clock.advance(SETTLE_S))

    assert loop.gates[Scope.JOURNAL].is_blocked
    assert loop.claimed() == [] and len(loop.tracker) == 2, "still candidates"
    assert loop.tracker.next_due() == loop.clock.now(), "due again at once, not at the next rescan"


def test_claims_cut_short_by_a_share_keep_only_the_files_left(loop: Loop):
    loop.drop("a.png", "b.png")
    loop.pipeline.refuse = ClaimsPaused([b"b.png"])

    loop.scheduler.tick(loop.clock.advance(SETTLE_S))

    assert list(loop.tracker.candidates) == [str(loop.inbox / "b.png")]


# -- a journal that cannot be written: the fake-clock proof of test_failure_handling's full disk -------


def test_a_full_journal_pauses_everything_probes_with_backoff_says_it_once_and_resumes_within_the_cap(
    loop: Loop, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG, logger="konfuzio_watch")
    loop.journal.full = True
    loop.dispatcher.inflight = {7: "results"}
    loop.drop("waiting.png")
    start = loop.clock.now()
    loop.scheduler.report(JournalFailed("database or disk is full"))
    loop.scheduler.drain(start)
    gate = loop.gates[Scope.JOURNAL]
    assert gate.is_blocked

    wakes = 0
    while loop.clock.now() < start + 3.0:  # the 3 s of the end-to-end test, as often as the loop wakes
        now = loop.clock.now()
        wake_at = loop.scheduler.next_wake(now)
        assert wake_at == gate.state.until, "asleep until the probe"
        loop.scheduler.tick(loop.clock.advance_to(wake_at))
        wakes += 1

    assert loop.ticks() == 0 and loop.claimed() == [], "no step, no claim while it is full"
    gaps = [b - a for a, b in zip([start, *loop.journal.probes], loop.journal.probes, strict=False)]
    assert wakes == len(loop.journal.probes) <= 6, f"probes at {gaps}: not backing off"
    assert all(gap >= LOCAL_LIMITS[Scope.JOURNAL].base_s / 2 for gap in gaps), gaps
    said = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.levelname for r in said] == ["ERROR"], [r.getMessage() for r in said]
    assert said[0].getMessage().startswith("the journal cannot be written (database or disk is full); pausing all work")
    assert not [r for r in caplog.records if r.exc_info], "no traceback per failed write"

    loop.journal.full = False
    freed = loop.clock.now()
    loop.scheduler.tick(loop.clock.advance_to(loop.scheduler.next_wake(freed)))

    assert not gate.is_blocked and loop.clock.now() - freed <= JOURNAL_CAP_S, "the next probe finds it writable"
    assert loop.pipeline.recovered == [({7}, False)], "recovery, leaving the steps in hand alone"
    now = loop.clock.now()
    assert loop.scheduler.next_wake(now) <= now, "the candidate kept all along is due at once"
    loop.scheduler.tick(now)
    assert loop.claimed() == [[b"waiting.png"]] and loop.ticks() == 2
    loop.scheduler.tick(loop.clock.advance(CONFIRM_S))
    said = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.levelname for r in said] == ["ERROR", "WARNING"]
    assert said[1].getMessage().startswith("the journal is writable again after ")


# -- facts reported by other threads ---------------------------------------------------------------


def test_each_reported_fact_reaches_its_part(tmp_path: Path):
    loop = make_loop(tmp_path, scan_inbox=[str(tmp_path / "inbox" / "rescanned.png")])
    (loop.inbox / "rescanned.png").write_bytes(b"\x89PNG rescanned")
    (loop.inbox / "seen.png").write_bytes(b"\x89PNG seen")
    (loop.inbox / "folder").mkdir()
    (loop.inbox / "folder" / "inside.png").write_bytes(b"\x89PNG inside")
    done = StepDone((1, 2), "uploads")

    for event in (
        FileSeen(str(loop.inbox / "seen.png")),
        FolderSeen(str(loop.inbox / "folder")),
        RescanRequested(),
        StepDone((1, 2), "uploads"),
        CleanupWanted(),
        JournalFailed("disk I/O error"),
    ):
        loop.scheduler.report(event)  # as a watcher, a worker or a handler would, from its thread
    loop.scheduler.drain(loop.clock.now())

    assert sorted(Path(p).name for p in loop.tracker.candidates) == ["inside.png", "rescanned.png", "seen.png"]
    assert loop.dispatcher.finished_events == [done]
    assert loop.dispatcher.cleanup_wanted
    assert loop.gates[Scope.JOURNAL].is_blocked


# -- the loop itself -------------------------------------------------------------------------------


def test_the_loop_handles_what_was_reported_then_ticks_until_stopped(loop: Loop):
    stopping = threading.Event()
    loop.scheduler.duties.append(Duty("stop", 60.0, lambda now: stopping.set()))
    (loop.inbox / "a.png").write_bytes(b"\x89PNG a")
    loop.scheduler.report(FileSeen(str(loop.inbox / "a.png")))

    loop.scheduler.run(stopping)  # on this thread: the duty is due at once, so nothing waits

    assert list(loop.tracker.candidates) == [str(loop.inbox / "a.png")]
    assert loop.ticks() == 1 and loop.scheduler.duties[-1].runs == 1


def test_a_journal_that_cannot_be_read_while_the_loop_plans_its_sleep_blocks_the_gate(loop: Loop):
    stopping = threading.Event()
    loop.dispatcher.unreadable = True
    loop.scheduler.duties.append(Duty("stop", 60.0, lambda now: stopping.set()))

    loop.scheduler.run(stopping)

    gate = loop.gates[Scope.JOURNAL]
    assert gate.is_blocked and "the database server cannot be reached" in gate.state.reason
    assert loop.scheduler.duties[-1].runs == 1, "the loop planned its sleep without the journal, and went on"


def test_an_error_in_a_pass_is_logged_and_the_loop_goes_on(loop: Loop, caplog: pytest.LogCaptureFixture):
    stopping = threading.Event()

    def broken(now: float) -> None:
        stopping.set()  # (so that the loop's pause after the error ends at once)
        raise RuntimeError("a bug")

    loop.scheduler.duties.append(Duty("broken", 60.0, broken))

    loop.scheduler.run(stopping)

    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "the scheduling loop hit an error (1 in a row); going on in 1 s"
    assert record.exc_info and str(record.exc_info[1]) == "a bug"
