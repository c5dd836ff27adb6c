"""The scheduling loop: the one thread that decides.

It takes the facts other threads report (``events.py``), lets the candidate tracker hand out
settled files and claims them in batches, lets the dispatcher start due steps, and runs the
periodic duties (rescan, systemd watchdog and status, tunnel check). It sleeps until the next
thing is due, so an idle daemon costs nothing. ``tick(now)`` is one pass and can be called by
a test on its own thread with a fake clock.

While a share does not answer (the shares' gate is blocked) nothing is claimed: settled files stay
candidates until the gate's probe finds the folders answering again.

When the journal cannot be written (a full disk, a database that cannot be reached), everything
pauses: the journal gate is probed with backoff, and once a probe write succeeds the loop re-runs
start-up recovery (in a cluster: of what is this node's and not in hand) and claims the candidates
it kept, at full speed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .clock import Clock
from .dispatcher import Dispatcher
from .events import CleanupWanted, Event, FileSeen, FolderSeen, JournalFailed, RescanRequested, StepDone
from .gates import Gates
from .journal import BaseJournal, JournalWriteError
from .policy import Limits, Scope, backoff_s
from .runner import ClaimsPaused, Pipeline
from .tracker import CandidateTracker

log = logging.getLogger("konfuzio_watch")

MAX_SLEEP_S = 60.0
LOOP_ERROR_LIMITS = Limits(base_s=1.0, cap_s=60.0)


@dataclass
class Duty:
    """A periodic job of the loop thread; ``interval_s`` None: disabled."""

    name: str
    interval_s: float | None
    run: Callable[[float], None]
    next_at: float = 0.0
    runs: int = 0


class Scheduler:
    def __init__(
        self,
        *,
        clock: Clock,
        journal: BaseJournal,
        gates: Gates,
        pipeline: Pipeline,
        dispatcher: Dispatcher,
        tracker: CandidateTracker,
        inbox: str,
        scan: Callable[[], Iterable[str]],
        duties: Iterable[Duty] = (),
        events: queue.SimpleQueue[Event] | None = None,
    ):
        self.clock = clock
        self.journal = journal
        self.gates = gates
        self.pipeline = pipeline
        self.dispatcher = dispatcher
        self.tracker = tracker
        self.inbox = inbox
        self._scan = scan
        self.duties = list(duties)
        self.events: queue.SimpleQueue[Event] = events if events is not None else queue.SimpleQueue()
        self.sleeping_until = 0.0  # when the loop wakes next unless something is reported

    def report(self, event: Event) -> None:
        """Thread-safe: any thread may report a fact."""
        self.events.put(event)

    # -- one pass --------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> None:
        if isinstance(event, FileSeen):
            self.tracker.seen(event.path, now)
        elif isinstance(event, FolderSeen):
            self.tracker.folder_seen(event.path, now)
        elif isinstance(event, RescanRequested):
            self.rescan(now)
        elif isinstance(event, StepDone):
            self.dispatcher.finished(event)
        elif isinstance(event, JournalFailed):
            self._journal_failed(now, event.error)
        elif isinstance(event, CleanupWanted):
            self.dispatcher.cleanup_wanted = True

    def drain(self, now: float) -> None:
        """Handle every reported fact (a test's way to let the loop catch up)."""
        while True:
            try:
                self.handle(self.events.get_nowait(), now)
            except queue.Empty:
                return

    def tick(self, now: float) -> None:
        self.gates.tend(now)
        for duty in self.duties:
            if duty.interval_s is not None and now >= duty.next_at:
                duty.next_at = now + duty.interval_s
                try:
                    duty.run(now)
                except JournalWriteError as exc:  # e.g. the status line or a heartbeat: the journal gate says it
                    self._journal_failed(now, str(exc))
                duty.runs += 1
        journal_gate = self.gates[Scope.JOURNAL]
        if journal_gate.is_blocked:
            if journal_gate.admits(now):
                self._probe_journal(now)
            return
        try:
            # Steps first: a worker freed while the last batch was claimed starts its next file now,
            # not after this batch (a backlog of 100,000 files is claimed batch after batch).
            self.dispatcher.tick(now)
            if self._claim(now):
                self.dispatcher.tick(now)
        except JournalWriteError as exc:  # a database that cannot be reached fails reads too
            self._journal_failed(now, str(exc))

    def next_wake(self, now: float) -> float:
        times = [now + MAX_SLEEP_S]
        times += [d.next_at for d in self.duties if d.interval_s is not None]
        announce = self.gates.next_announcement()
        if announce is not None:
            times.append(announce)
        journal_gate = self.gates[Scope.JOURNAL]
        if journal_gate.is_blocked:
            times.append(journal_gate.state.until)
            return min(times)
        due = self.tracker.next_due()
        if due is not None and not self.gates[Scope.SHARES].is_blocked:  # (claims wait for the shares' probe)
            times.append(due)
        due = self.dispatcher.next_due(now)
        if due is not None:
            times.append(due)
        return min(times)

    def rescan(self, now: float) -> None:
        for path in self._scan():
            self.tracker.seen(path, now)

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stopping: threading.Event) -> None:
        """Until ``stopping`` is set: sleep until something is due or reported, then tick."""
        errors = 0
        while not stopping.is_set():
            try:
                now = self.clock.now()
                try:
                    self.sleeping_until = self.next_wake(now)
                except JournalWriteError as exc:
                    self._journal_failed(now, str(exc))
                    self.sleeping_until = self.next_wake(now)  # the blocked journal gate needs no journal
                self._wait(self.sleeping_until - now)
                if stopping.is_set():
                    break
                self.tick(self.clock.now())
                errors = 0
            except Exception:
                errors += 1
                delay = backoff_s(errors, LOOP_ERROR_LIMITS)
                log.exception("the scheduling loop hit an error (%d in a row); going on in %.0f s", errors, delay)
                stopping.wait(delay)

    def _wait(self, timeout_s: float) -> None:
        try:
            event = self.events.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return
        now = self.clock.now()
        self.handle(event, now)
        self.drain(now)

    # -- claims and the journal gate ------------------------------------------------------------

    def _claim(self, now: float) -> bool:
        """Claim the candidates that are ready (one batch); True if there were any. Not while a share
        does not answer: they stay candidates, claimed once its probe finds it answering."""
        if self.gates[Scope.SHARES].is_blocked:
            return False
        ready = self.tracker.step(now)
        if not ready:
            return False
        found = {os.fsencode(_relative(r.path, self.inbox)): r for r in ready}
        try:
            self.pipeline.claim(list(found), {rel: r.detected_at for rel, r in found.items()})
        except JournalWriteError as exc:
            self.tracker.keep(ready, now)
            self._journal_failed(now, str(exc))
            return False
        except ClaimsPaused as paused:
            left = [found[rel] for rel in paused.left]
            self.tracker.claimed([r for r in ready if r not in left])
            self.tracker.keep(left, now)
            return False
        self.tracker.claimed(ready)
        return True

    def _journal_failed(self, now: float, error: str) -> None:
        self.gates[Scope.JOURNAL].block(now, f"the journal cannot be written ({error})")

    def _probe_journal(self, now: float) -> None:
        gate = self.gates[Scope.JOURNAL]
        try:
            self.journal.probe(now)
            gate.open(now)
            # finish what the failed writes left half done (in a cluster: not what is still in hand)
            self.pipeline.recover(in_hand=set(self.dispatcher.inflight), alone=False)
        except JournalWriteError as exc:
            self._journal_failed(now, str(exc))


def _relative(path: str, inbox: str) -> str:
    """``path`` relative to ``inbox``; a plain cut for the paths the watcher reports (under the inbox,
    as it spells it): ``os.path.relpath`` normalises both paths again for each file of a batch."""
    prefix = inbox.rstrip(os.sep) + os.sep
    if path.startswith(prefix) and os.sep + os.curdir not in path[len(prefix) - 1 :]:
        return path[len(prefix) :]
    return os.path.relpath(path, inbox)
