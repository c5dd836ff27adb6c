"""Hands due journal rows to the worker pools, one task per row at a time, within the gates.

``tick(now)`` runs on the scheduling loop's thread (or a test's): it asks the journal for rows
whose time has come, checks each kind of work against its gates (a blocked gate admits nothing,
then one probe), and submits steps to the injected executors. A worker's completion comes back
as a ``StepDone`` event through ``report``; ``finished`` frees the row for the next tick.

In a cluster (a journal several nodes share) the rows come leased to this node (``take_due``):
no other node works on them while their steps run here. ``renew_leases`` (a duty of the loop)
keeps the leases of the rows in hand; a finished row's lease is given up at the next tick, so that
any node may take its next step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future

from .events import Event, JournalFailed, StepDone
from .gates import Gates
from .journal import BaseJournal, IllegalTransition, JournalWriteError, Row, State
from .pipeline import RESULTS, TABLE, UPLOADS, Work
from .policy import Scope, Step
from .runner import Pipeline

log = logging.getLogger("konfuzio_watch")

RECONCILE_BATCH = 200
OWN_PROBES = (Scope.API, Scope.SHARES)  # gates that may be probed by a function of their own
RESULT_STATES = (State.UPLOADED, State.EXPORTING, State.FAILING)


class Dispatcher:
    def __init__(
        self,
        journal: BaseJournal,
        pipeline: Pipeline,
        gates: Gates,
        executors: Mapping[str, Executor],
        sizes: Mapping[str, int],
        report: Callable[[Event], None],
        lease_s: float = 60.0,
    ):
        self.journal = journal
        self.lease_s = lease_s
        self._finished: set[int] = set()  # rows whose step ended: their leases go at the next tick
        self._lost: set[int] = set()  # rows in hand whose lease another node took over (said once)
        self.pipeline = pipeline
        self.gates = gates
        self.executors = executors
        self.sizes = sizes
        self.report = report
        self.inflight: dict[int, str] = {}  # row id -> pool
        self.reconciling = False
        self.cleanup_wanted = False  # a callback revealed a second copy of a file on the server

    # -- admission -------------------------------------------------------------------------------

    def free(self, pool: str) -> int:
        size = self.sizes[pool] - (1 if pool == RESULTS and self.reconciling else 0)
        return size - sum(1 for p in self.inflight.values() if p == pool)

    def _budgets(self, now: float) -> dict[Scope, int | None]:
        return {scope: self.gates[scope].admits(now) for scope in (Scope.API, Scope.OUTPUT, Scope.SHARES)}

    @staticmethod
    def _fits(work: Work, budgets: dict[Scope, int | None]) -> bool:
        return all(budgets[s] is None or budgets[s] > 0 for s in work.scopes)

    def _take(self, work: Work, budgets: dict[Scope, int | None]) -> tuple[Scope, ...]:
        """Charge the budgets; returns the scopes this task is a probe for."""
        probes = []
        for scope in work.scopes:
            if budgets[scope] is not None:
                budgets[scope] -= 1  # type: ignore[operator]
                probes.append(scope)
                self.gates[scope].probe_started()
        return tuple(probes)

    # -- the tick --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self.gates[Scope.JOURNAL].is_blocked:
            return
        self._release_finished()
        for scope in OWN_PROBES:  # e.g. is the token accepted again? do the shares' folders answer?
            self._start_own_probe(scope, now)
        budgets = self._budgets(now)
        free = self.free(UPLOADS)
        upload = TABLE[State.CLAIMED]
        unused: list[int] = []  # taken (leased) but not started: given back at once
        if free > 0 and self._fits(upload, budgets):
            limit = free if budgets[Scope.API] is None else min(free, budgets[Scope.API] or 0)
            for row in self.journal.take_due([State.CLAIMED], now, self.inflight, limit, self.lease_s):
                self._submit(upload, row, budgets)
        free = self.free(RESULTS)
        reconcile = TABLE[State.UPLOADING]
        if free > 0 and not self.reconciling and self._fits(reconcile, budgets):
            due = self.journal.take_due([State.UPLOADING], now, self.inflight, RECONCILE_BATCH, self.lease_s)
            if due or self.cleanup_wanted:
                self._submit_reconcile(due, budgets)
                free -= 1
        if free > 0:
            states = [s for s in RESULT_STATES if self._fits(TABLE[s], budgets)]
            if states:
                for row in self.journal.take_due(states, now, self.inflight, free, self.lease_s):
                    work = TABLE[row.state]
                    if self._fits(work, budgets):
                        self._submit(work, row, budgets)
                    else:
                        unused.append(row.id)
        free = self.free(RESULTS)  # new revisions of done files last: files still on their way come first
        refresh = TABLE[State.DONE]
        if free > 0 and self._fits(refresh, budgets):
            for row in self.journal.take_due_refreshes(now, self.inflight, free, self.lease_s):
                if self._fits(refresh, budgets):
                    self._submit(refresh, row, budgets)
                else:
                    unused.append(row.id)
        if unused:
            self.journal.release_leases(unused)

    def _start_own_probe(self, scope: Scope, now: float) -> None:
        gate = self.gates[scope]
        own_probe = gate.own_probe_due(now)
        if own_probe is None or self.free(RESULTS) <= 0:
            return
        gate.probe_started()
        step = Step.FETCH if scope == Scope.API else Step.CLAIM
        future: Future = self.executors[RESULTS].submit(self._guard, step, lambda _rows: own_probe(), [], single=False)
        future.add_done_callback(lambda _f: self.report(StepDone((), RESULTS, (scope,))))

    def _release_finished(self) -> None:
        """Give up the leases of the rows whose steps ended (not of one taken again meanwhile)."""
        done = self._finished - self.inflight.keys()
        self._finished.clear()
        if done:
            try:
                self.journal.release_leases(done)
            except JournalWriteError:
                self._finished |= done  # next time; they expire anyway
                raise

    def renew_leases(self) -> None:
        """Keep the leases of the rows in hand (a duty of the loop, every quarter of a lease). A row
        whose lease another node took over (this node could not renew in time) is no longer this
        node's: its step here stops at its next journal write; said once."""
        in_hand = set(self.inflight)
        if not in_hand:
            return
        lost = in_hand - self.journal.renew_leases(in_hand, self.lease_s) - self._lost
        self._lost = (self._lost | lost) & in_hand
        if lost:
            log.warning(
                "lost the lease on %d file(s) in hand (this node could not renew it in time; another node "
                "took them over): their steps here stop at their next journal write (rows %s)",
                len(lost),
                ", ".join(map(str, sorted(lost)[:20])),
            )

    def next_due(self, now: float) -> float | None:
        """When the next row may be dispatched (or a gate may be probed); None: nothing waits."""
        if self.gates[Scope.JOURNAL].is_blocked:
            return None
        # A gate probed by a function of its own is probed when its time comes, whatever rows are due
        # (one that waits for a worker: a worker's end wakes the loop).
        times = [
            t
            for s in OWN_PROBES
            if self.gates[s].probe_fn is not None
            and (t := self.gates[s].next_probe_at()) is not None
            and (t > now or self.free(RESULTS) > 0)
        ]
        budgets = self._budgets(now)
        wanted = [
            work
            for work in TABLE.values()
            if self.free(work.pool) > 0
            and not (work.pool == RESULTS and work.state == State.UPLOADING and self.reconciling)
        ]
        states = [work.state for work in wanted if work.state != State.DONE]
        dues = self.journal.next_due_by_state(states, self.inflight) if states else {}
        for work in wanted:
            due = self.journal.next_refresh_at(self.inflight) if work.state == State.DONE else dues.get(work.state)
            if work.state == State.UPLOADING and self.cleanup_wanted:
                due = now
            if due is None:
                continue
            if not self._fits(work, budgets):  # the gate decides when it may be tried again
                gate_times = [self.gates[s].next_probe_at() for s in work.scopes if budgets[s] == 0]
                gate_times = [None if t is not None and t <= now else t for t in gate_times]  # its own probe is out
                if any(t is None for t in gate_times):
                    continue  # a probe is out: its completion wakes the loop
                due = max([due, *[t for t in gate_times if t is not None]])
            times.append(due)
        return min(times) if times else None

    def finished(self, event: StepDone) -> None:
        for row_id in event.row_ids:
            self.inflight.pop(row_id, None)
            self._finished.add(row_id)
        if event.is_reconcile:
            self.reconciling = False
        for scope in event.probes:
            self.gates[scope].probe_finished()

    # -- running steps -------------------------------------------------------------------------

    def _submit(self, work: Work, row: Row, budgets: dict[Scope, int | None]) -> None:
        probes = self._take(work, budgets)
        self.inflight[row.id] = work.pool
        future: Future = self.executors[work.pool].submit(
            self._guard, work.step, self.pipeline.work, [row], single=True
        )
        future.add_done_callback(lambda _f: self.report(StepDone((row.id,), work.pool, probes)))

    def _submit_reconcile(self, rows: list[Row], budgets: dict[Scope, int | None]) -> None:
        work = TABLE[State.UPLOADING]
        probes = self._take(work, budgets)
        self.reconciling = True
        for row in rows:
            self.inflight[row.id] = "reconcile"
        ids = tuple(r.id for r in rows)
        self.cleanup_wanted = False
        future: Future = self.executors[RESULTS].submit(
            self._guard, work.step, self.pipeline.reconcile, rows, single=False
        )
        future.add_done_callback(lambda _f: self.report(StepDone(ids, RESULTS, probes, is_reconcile=True)))

    def _guard(self, step: Step, fn: Callable, rows: list[Row], single: bool) -> None:
        """No step may kill a worker or make the loop spin: journal trouble pauses everything,
        a bug goes through the retry policy like any other failure."""
        try:
            fn(rows[0] if single else rows)
        except JournalWriteError as exc:
            self.report(JournalFailed(str(exc)))
        except IllegalTransition as exc:  # moved meanwhile (e.g. by `retry`): the journal has it right
            log.warning("%s", exc)
        except Exception as exc:
            log.exception("unexpected error in step %s for %s", step, ", ".join(r.display_path for r in rows))
            try:
                self.pipeline.handle_internal_error(rows, step, exc)
            except JournalWriteError as again:
                self.report(JournalFailed(str(again)))
            except Exception:
                log.exception("could not record the error for %s", ", ".join(r.display_path for r in rows))
