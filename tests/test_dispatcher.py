"""The dispatcher on the test's thread: a fake clock, held executors, the real pipeline, journal,
SDK and emulator."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from konfuzio_watch.dispatcher import RESULTS, UPLOADS, Dispatcher
from konfuzio_watch.events import Event, StepDone
from konfuzio_watch.gates import Gates
from konfuzio_watch.journal import Journal, State
from konfuzio_watch.konfuzio import KonfuzioClient
from konfuzio_watch.metrics import Metrics
from konfuzio_watch.pipeline import TABLE
from konfuzio_watch.policy import Scope
from konfuzio_watch.runner import Pipeline, limits_from
from konfuzio_watch.samples import make_pdf

from .conftest import TOKEN, make_config
from .helpers import FakeClock, HeldExecutor

pytestmark = pytest.mark.slow  # every test starts the real pipeline against the emulator


@dataclass
class Parts:
    clock: FakeClock
    journal: Journal
    pipeline: Pipeline
    gates: Gates
    dispatcher: Dispatcher
    executors: dict[str, HeldExecutor]
    events: list[Event]
    inbox: Path

    def claim(self, n: int) -> None:
        names = []
        for i in range(n):
            (self.inbox / f"{i}.pdf").write_bytes(make_pdf(label=f"dispatch {i}"))
            names.append(f"{i}.pdf".encode())
        self.pipeline.claim(names)

    def run(self, pool: str) -> int:
        """Run the held tasks of a pool, then hand their completions to the dispatcher."""
        ran = self.executors[pool].run_all()
        done, self.events[:] = [e for e in self.events if isinstance(e, StepDone)], []
        for event in done:
            self.dispatcher.finished(event)
        return ran

    def run_due(self, now: float) -> None:
        """Run what is due at ``now`` until nothing is: a step may leave its row due at once for the next."""
        for _ in range(10):
            self.dispatcher.tick(now)
            if not self.run(UPLOADS) + self.run(RESULTS):
                return
        raise AssertionError(f"still steps due at {now} after 10 rounds: {self.states()}")

    def states(self) -> dict[State, int]:
        return {s: n for s, n in self.journal.counts().items() if n}


@pytest.fixture
def parts(tmp_path, emulator) -> Iterator[Parts]:
    config = make_config(
        tmp_path,
        emulator,
        upload={"concurrency": 2, "backoff_base_seconds": 2, "backoff_cap_seconds": 8},
        results={"workers": 2, "callback_timeout": 30, "poll_interval": 5},
    )
    for folder in (config.folders.inbox, config.folders.done, config.folders.failed, config.folders.state):
        folder.mkdir(parents=True)
    clock = FakeClock(time.time())
    journal = Journal(config.journal_path)
    client = KonfuzioClient(emulator.url, TOKEN, timeout_s=10)
    gates = Gates(limits_from(config))
    processing_dir = tmp_path / "processing"
    processing_dir.mkdir(mode=0o700)
    pipeline = Pipeline(
        config,
        journal,
        client,
        clock=clock,
        gates=gates,
        metrics=Metrics(),
        callback_base=lambda: "http://127.0.0.1:9",  # callbacks never arrive: we poll
        processing_dir=processing_dir,
    )
    executors = {UPLOADS: HeldExecutor(), RESULTS: HeldExecutor()}
    events: list[Event] = []
    dispatcher = Dispatcher(journal, pipeline, gates, executors, {UPLOADS: 2, RESULTS: 2}, report=events.append)
    yield Parts(clock, journal, pipeline, gates, dispatcher, executors, events, config.folders.inbox)
    client.close()
    journal.close()


def test_due_rows_go_to_their_pool_up_to_its_size_and_only_once(parts):
    parts.claim(3)
    parts.dispatcher.tick(parts.clock.now())
    assert len(parts.executors[UPLOADS].pending) == 2, "the upload pool has two workers"
    parts.dispatcher.tick(parts.clock.now())
    assert len(parts.executors[UPLOADS].pending) == 2, "a row in hand is not dispatched again"

    assert parts.run(UPLOADS) == 2
    assert parts.states() == {State.CLAIMED: 1, State.UPLOADED: 2}
    parts.dispatcher.tick(parts.clock.now())
    assert parts.run(UPLOADS) == 1
    assert parts.states() == {State.UPLOADED: 3}


def test_a_row_due_later_waits_for_the_clock(parts, emulator):
    parts.claim(1)
    parts.dispatcher.tick(parts.clock.now())
    parts.run(UPLOADS)
    uploaded_at = parts.clock.now()

    parts.dispatcher.tick(parts.clock.advance(29.9))
    assert parts.executors[RESULTS].pending == [], "polled before callback_timeout"
    assert parts.dispatcher.next_due(parts.clock.now()) == pytest.approx(uploaded_at + 30)

    emulator_done = parts.clock.advance(0.1)
    parts.dispatcher.tick(emulator_done)
    assert len(parts.executors[RESULTS].pending) == 1
    assert emulator.wait_idle(10), "the emulator finished the document"
    parts.run(RESULTS)
    parts.run_due(emulator_done)
    assert parts.states() == {State.DONE: 1}


def test_throttling_blocks_all_uploads_and_one_probe_at_a_time_finds_it_over(parts, emulator):
    emulator.knobs.retry_after_s = 0
    emulator.knobs.rate_429 = 1.0  # a 429 never stored anything: the files go back to "claimed"
    parts.claim(4)
    parts.dispatcher.tick(parts.clock.now())
    parts.run(UPLOADS)  # two uploads answered 429
    gate = parts.gates[Scope.API]
    assert gate.is_blocked
    rows = parts.journal.rows()
    assert {r.state for r in rows} == {State.CLAIMED} and all(r.attempts == 0 for r in rows), (
        "an outage costs no attempt"
    )

    parts.dispatcher.tick(parts.clock.now())
    assert parts.executors[UPLOADS].pending == [], "nothing goes while the gate is shut"
    probe_at = parts.dispatcher.next_due(parts.clock.now())
    assert probe_at == gate.state.until

    parts.dispatcher.tick(parts.clock.advance(probe_at - parts.clock.now()))
    assert len(parts.executors[UPLOADS].pending) == 1, "one probe, although two workers are free"
    parts.dispatcher.tick(parts.clock.now())
    assert len(parts.executors[UPLOADS].pending) == 1, "and only one"
    emulator.knobs.rate_429 = 0.0
    parts.run(UPLOADS)
    assert not gate.is_blocked

    parts.dispatcher.tick(parts.clock.now())
    assert len(parts.executors[UPLOADS].pending) == 2, "open again: the whole pool"


def test_nothing_is_dispatched_while_the_journal_cannot_be_written(parts):
    parts.claim(2)
    parts.gates[Scope.JOURNAL].block(parts.clock.now(), "the journal cannot be written (disk full)")
    parts.dispatcher.tick(parts.clock.now())
    assert parts.executors[UPLOADS].pending == []
    assert parts.dispatcher.next_due(parts.clock.now()) is None


def test_a_bug_in_a_step_backs_off_through_the_policy_instead_of_spinning(parts, monkeypatch):
    parts.claim(1)

    def broken(ctx, row):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    monkeypatch.setitem(TABLE, State.CLAIMED, dataclasses.replace(TABLE[State.CLAIMED], run=broken))
    now = parts.clock.now()
    parts.dispatcher.tick(now)
    parts.run(UPLOADS)
    (row,) = parts.journal.rows()
    assert row.state == State.CLAIMED and row.failures == 1
    assert row.error == "internal error: RuntimeError: a bug"
    assert row.next_at is not None and row.next_at >= now + 1.0, "backed off, not due again at once"
    parts.dispatcher.tick(parts.clock.now())
    assert parts.executors[UPLOADS].pending == []


def test_a_tick_starts_due_steps_before_it_claims_the_next_batch(parts):
    """With a backlog, a batch of claims takes a while: a worker that is free must not wait for it."""
    from konfuzio_watch.scheduler import Scheduler
    from konfuzio_watch.tracker import CandidateTracker

    parts.claim(2)  # two files claimed, due for upload
    waiting = parts.inbox / "backlog"
    waiting.mkdir()
    for i in range(3):
        (waiting / f"b{i}.pdf").write_bytes(make_pdf(label=f"backlog {i}"))

    def scan(folder: str) -> list[str]:
        return sorted(str(p) for p in Path(folder).rglob("*.pdf"))

    tracker = CandidateTracker(0.5, 30.0, scan)
    scheduler = Scheduler(
        clock=parts.clock,
        journal=parts.journal,
        gates=parts.gates,
        pipeline=parts.pipeline,
        dispatcher=parts.dispatcher,
        tracker=tracker,
        inbox=str(parts.inbox),
        scan=lambda: [],
    )
    for path in scan(str(waiting)):
        tracker.seen(path, parts.clock.now())
    parts.clock.advance(1.0)  # settled: the three are ready to be claimed
    uploads_started_at_claim: list[int] = []
    claim = parts.pipeline.claim

    def recording_claim(*args, **kwargs):
        uploads_started_at_claim.append(len(parts.executors[UPLOADS].pending))
        return claim(*args, **kwargs)

    parts.pipeline.claim = recording_claim
    scheduler.tick(parts.clock.now())
    assert uploads_started_at_claim == [2], "the free upload workers got their files before the batch was claimed"
    assert parts.states() == {State.CLAIMED: 5}


def test_a_processing_folder_that_goes_away_pauses_the_files_and_one_look_at_a_time_finds_it_back(parts):
    """A share's folder missing (an unmounted share) is no proof that its files are gone: nothing fails,
    nothing is charged; the shares' gate is probed by a look at the folders, not by a file."""
    parts.claim(2)
    processing = parts.pipeline.processing_dir
    away = processing.with_name("processing.away")
    processing.rename(away)
    parts.dispatcher.tick(parts.clock.now())
    parts.run(UPLOADS)
    gate = parts.gates[Scope.SHARES]
    assert gate.is_blocked
    rows = parts.journal.rows()
    assert {r.state for r in rows} == {State.CLAIMED} and all(r.attempts == 0 and r.failures == 0 for r in rows)

    parts.dispatcher.tick(parts.clock.now())
    assert parts.executors[UPLOADS].pending == [] and parts.executors[RESULTS].pending == []
    probe_at = parts.dispatcher.next_due(parts.clock.now())
    assert probe_at == gate.state.until

    parts.dispatcher.tick(parts.clock.advance(probe_at - parts.clock.now()))
    assert parts.executors[UPLOADS].pending == [] and len(parts.executors[RESULTS].pending) == 1, "one look"
    tries, since = gate.state.failures, gate.state.since
    parts.run(RESULTS)
    assert gate.is_blocked and (gate.state.failures, gate.state.since) == (tries + 1, since), (
        "still away: the same episode, a longer wait"
    )

    away.rename(processing)
    parts.dispatcher.tick(parts.clock.advance(gate.state.until - parts.clock.now()))
    parts.run(RESULTS)
    assert not gate.is_blocked
    parts.dispatcher.tick(parts.clock.now())
    assert parts.run(UPLOADS) == 2
    assert parts.states() == {State.UPLOADED: 2}
    assert all(r.attempts == 1 and r.failures == 0 for r in parts.journal.rows())
