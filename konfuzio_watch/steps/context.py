"""What every step shares: the parts it works with, and the three things every step does the same
way: move a row (and log the move), fail a file, and apply the retry policy's decision.

Each step takes a journal row, does one irreversible thing at most, and records the new state
before the next one may start. When a step fails it classifies the failure and asks the retry
policy (``decide`` here, the one caller of ``policy.decide``) what to do; ``handle`` applies the
answer (a retry at a time, a failed file, or a blocked gate) in one journal transaction with the
row's failure count. Steps run on worker threads; they never share mutable state except through
the journal.

A step that moves its row into a state whose step may run at once (exporting after a fetch,
failing, uploading after the claimed file was validated) returns ``Then``: ``pipeline.run`` runs
that state's step next, on the same thread, with what this step already holds for it.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import policy, processing
from ..clock import Clock
from ..config import Config
from ..gates import Gates
from ..journal import BaseJournal, Row, State, display_name
from ..kept_results import KeptResults
from ..konfuzio import KonfuzioClient
from ..metrics import Metrics
from ..policy import Blocked, Cause, Fail, Failure, Retry, Scope, Step
from ..project_catalog import CatalogCache
from ..reachability import CallbackWatch
from ..shares import ABSENT_ERRNOS, Folders, ShareUnavailable, is_share_error
from ..states import Stage

if TYPE_CHECKING:
    from ..delivery import Deliveries
    from ..placing import KeyedLocks
    from ..recovery import NodeStrategy

log = logging.getLogger("konfuzio_watch")

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
SEARCHABLE_PDF = "searchable_pdf"  # a results.outputs entry


@dataclass(frozen=True)
class Then:
    """``row`` was moved into a state whose step runs at once (``pipeline.run``), handed what this
    step already holds for it (an open file, fetched details): no wait, no second fetch."""

    row: Row
    carry: dict[str, Any] = field(default_factory=dict)


Outcome = Row | Then


def limits_from(config: Config) -> policy.Limits:
    u = config.upload
    return policy.Limits(
        base_s=u.backoff_base_seconds,
        cap_s=u.backoff_cap_seconds,
        max_attempts=u.max_attempts,
        max_failures=config.results.max_failures,
    )


class Context:
    def __init__(
        self,
        config: Config,
        journal: BaseJournal,
        client: KonfuzioClient,
        *,
        clock: Clock,
        gates: Gates,
        metrics: Metrics,
        callback_base: Callable[[], str],
        processing_dir: Path,
        node: NodeStrategy,
        placing_locks: KeyedLocks,
        on_transition: Callable[[Row, State], None] | None = None,
        rng: random.Random | None = None,
        folders: Folders | None = None,
    ):
        self.config = config
        self.processing_dir = processing_dir
        # On a network or FUSE mount, stat may not see another client's swap of a file: smbnetfs numbers
        # inodes by path and shows the mtime as the ctime. There a file's content is always compared
        # with what was uploaded before it is placed in done/ (one more read of it over the network).
        self.stat_is_blind = processing.is_remote(processing_dir)
        # The folders the files live in, as they were at start-up: a share's error pauses the work on
        # them (``Scope.SHARES``), and only a folder that answers as itself proves a file gone.
        self.folders = folders or Folders(
            [config.folders.inbox, processing_dir, config.folders.done, config.folders.failed]
        )
        self.kept = KeptResults(config.folders.state)  # results fetched while done/ did not answer
        self.waiting_claims: set[int] = set()  # claims a share's error left half done, finished when it answers
        self.waiting_lock = threading.Lock()
        # Are callbacks expected? Not in poll-only mode, nor while the daemon's verdict is that they do not
        # arrive (reachability.CallbackWatch): then results are polled soon after the upload instead of
        # after results.callback_timeout.
        self.expect_callbacks = config.callback.enabled
        self.started_at = clock.now()
        self.callback_watch: CallbackWatch | None = None  # set by the daemon when callbacks are expected
        # Set by the daemon: does it still hold the processing folder's lock (locks.ProcessingLock)?
        self.holds_processing_dir: Callable[[], bool] = lambda: True
        self.on_callbacks_missing: Callable[[str], None] | None = None
        # The probes of a blocked gate (``steps/probes.py``), set by whoever builds the steps.
        self.probe_account: Callable[[], bool] | None = None
        self.probe_shares: Callable[[], bool] | None = None
        self.journal = journal
        # One node, or a node of a cluster (a journal several daemons share): what differs between them
        # (recovery, a file's identity) is this strategy's, chosen once (``recovery.node_strategy``).
        self.node = node
        self.lease_s = config.node.lease_seconds
        self.client = client
        self.clock = clock
        self.gates = gates
        self.metrics = metrics
        self.callback_base = callback_base
        self.on_transition = on_transition
        self.limits = limits_from(config)
        self.rng = rng or random.Random()
        self.placing_locks = placing_locks  # one per target path in done/ and failed/ (``placing``)
        self.catalogs = CatalogCache()  # each project's label, label set and category names
        self.no_catalog: set[int] = set()  # projects whose catalog the server would not give (logged once)
        # What a move into done/ or failed/ (or a new revision) hands on (``delivery.py``); None: nothing.
        self.deliveries: Deliveries | None = None

    # -- paths ---------------------------------------------------------------------------------

    def inbox_path(self, row: Row) -> Path:
        return self.config.folders.inbox / row.rel_fspath

    def processing_path(self, row: Row) -> Path:
        name = row.claim_name if row.claim_name is not None else str(row.id).encode()
        return self.processing_dir / os.fsdecode(name)

    def root_of(self, path: Path) -> Path:
        """The output folder ``path`` is in (nothing below it is followed), else its own folder."""
        for folder in (self.config.folders.done, self.config.folders.failed):
            if path.is_relative_to(folder):
                return folder
        return path.parent

    @property
    def wants_pdf(self) -> bool:
        return SEARCHABLE_PDF in self.config.results.outputs

    # -- moves -----------------------------------------------------------------------------------

    def move(self, row: Row, state: State, *, durable: bool = True, **fields: Any) -> Row:
        new = self.journal.transition(row, state, self.clock.now(), durable=durable, **fields)
        self.log_transition(row, new)
        return new

    def log_transition(self, old: Row, new: Row) -> None:
        extra = ""
        if new.state == State.UPLOADED and new.document_id is not None:
            extra = f" (document {new.document_id})"
        elif new.state in (State.FAILING, State.FAILED) and new.error:
            extra = f" ({new.stage}: {new.error})"
        elif new.state == State.DONE and new.final_path:
            extra = f" ({export_display(new.final_path, self.config.folders.done)})"
        if old.failures and not new.failures:
            extra += f" after {old.failures} failure{'s' if old.failures > 1 else ''}"
        level = logging.WARNING if new.state == State.FAILED else logging.INFO
        log.log(
            level,
            "%s: %s -> %s%s",
            new.display_path,
            old.state,
            new.state,
            extra,
            extra={
                "file": new.display_path,
                "state": new.state.value,
                "old_state": old.state.value,
                "document_id": new.document_id,
                "stage": new.stage,
                "error": new.error if new.state in (State.FAILING, State.FAILED) else None,
            },
        )
        if self.on_transition:
            self.on_transition(new, old.state)

    def fail(self, row: Row, error: str, stage: Stage) -> Then:
        """Decided: the file goes to failed/ (``steps/fail.py`` runs at once)."""
        return Then(self.move(row, State.FAILING, error=error, stage=stage, next_at=self.clock.now()))

    # -- decisions -------------------------------------------------------------------------------

    def decide(
        self,
        step: Step,
        failure: Failure,
        failures: int = 0,
        attempts: int = 0,
        now: float | None = None,
        *,
        spread: bool = True,
    ) -> policy.Decision:
        """The retry policy's answer for ``failure`` in ``step``: the one place it is asked. ``spread``:
        a file's retry is jittered (a verdict on a gate or the account is not)."""
        now = self.clock.now() if now is None else now
        jitter = policy.draw_jitter(self.rng) if spread else 1.0
        return policy.decide(step, failure, failures, now, self.limits, attempts=attempts, jitter=jitter)

    def handle(
        self,
        row: Row,
        step: Step,
        failure: Failure,
        *,
        back_to: State | None = None,
        stage: Stage | None = None,
        **extra: Any,
    ) -> Outcome:
        """Apply the retry policy to one failed step. ``back_to``: the state the row returns to
        when it is to be tried again (default: it stays where it is)."""
        now = self.clock.now()
        decision = self.decide(step, failure, row.failures, row.attempts, now)
        if row.state == State.DONE:
            return self._refresh_failed(row, step, failure, decision, now)
        if isinstance(decision, Fail):
            return self.fail(row, decision.reason, stage=stage or Stage(step.value))
        # A failing row's error is the reason it fails for, which its .error.json will say: an error
        # met while placing it in failed/ (a share busy for a moment) is logged, never stored over it.
        keeps_reason = row.state == State.FAILING
        if isinstance(decision, Blocked):
            self.block(decision, now)
            fields: dict[str, Any] = {"error": failure.message, "next_at": now}  # due once the gate opens
            if row.state == State.UPLOADING and not failure.maybe_received:
                fields["attempts"] = row.attempts - 1  # the server does not have it: the attempt is free
            log.debug("%s: %s waits for the %s gate: %s", row.display_path, step, decision.scope, failure.message)
        else:
            assert isinstance(decision, Retry)
            fields = {
                "error": failure.message,
                "next_at": decision.at,
                "failures": row.failures + (1 if decision.charge else 0),
            }
            # Once per change of the error; a failing row's stored error never changes: each try is logged.
            level = logging.WARNING if failure.message != row.error or keeps_reason else logging.DEBUG
            log.log(
                level,
                "%s: %s failed (failure %d), %s: %s",
                row.display_path,
                step,
                fields["failures"],
                self._next_try(step, failure, decision, now),
                failure.message,
                extra={
                    "file": row.display_path,
                    "state": row.state.value,
                    "document_id": row.document_id,
                    "stage": step.value,
                    "error": failure.message,
                },
            )
        if keeps_reason:
            del fields["error"]
        fields.update(extra)
        if back_to is not None and back_to != row.state:
            fields.setdefault("failures", row.failures)
            return self.journal.transition(row, back_to, now, **fields)
        return self.journal.update(row, now, **fields)

    def _next_try(self, step: Step, failure: Failure, decision: Retry, now: float) -> str:
        """What the retry of a failed step really does, and when: an upload the server may hold is
        looked for before it is uploaded again."""
        if step != Step.UPLOAD or not failure.maybe_received:
            return f"next try in {decision.delay_s:.1f} s"
        window = policy.reconcile_window_s(failure, self.config.reconcile_window_s)
        if not window:
            return (
                f"one look at the server's documents in {decision.delay_s:.1f} s, "
                "then uploaded again at once if it is not there"
            )
        again_at = policy.upload_again_at(now, decision.at, window)
        return (
            f"the server may still be storing it: looking for it from {decision.delay_s:.1f} s on, "
            f"uploaded again no earlier than {clock_time(again_at)} (in {again_at - now:.0f} s, "
            f"upload.reconcile_window_seconds)"
        )

    def _refresh_failed(self, row: Row, step: Step, failure: Failure, decision: policy.Decision, now: float) -> Row:
        """The policy's answer for a done file whose new revision could not be fetched or written:
        the same backoff and gates, on ``refresh_at``; "fail" gives up the refresh, never the file
        (done/ keeps the revision it has)."""
        if isinstance(decision, Fail):
            log.warning(
                "%s: gave up fetching a new revision of document %s; done/ keeps revision %d: %s",
                row.display_path,
                row.document_id,
                row.revision,
                decision.reason,
            )
            return self.journal.update(row, now, refresh_at=None, failures=0, error=f"refresh: {decision.reason}")
        if isinstance(decision, Blocked):
            self.block(decision, now)
            return self.journal.update(row, now, error=failure.message, refresh_at=now)  # due once the gate opens
        level = logging.WARNING if failure.message != row.error else logging.DEBUG
        failures = row.failures + (1 if decision.charge else 0)
        log.log(
            level,
            "%s: %s of a new revision failed (failure %d), next try in %.1f s: %s",
            row.display_path,
            step,
            failures,
            decision.delay_s,
            failure.message,
        )
        return self.journal.update(row, now, error=failure.message, refresh_at=decision.at, failures=failures)

    def handle_internal_error(self, rows: list[Row], step: Step, exc: BaseException) -> list[Outcome]:
        """A bug in a step: log it with its traceback once, then the policy decides (backoff,
        and failed/ after ``results.max_failures``), so it neither spins nor kills the daemon."""
        out = []
        for row in rows:
            try:
                current = self.journal.get(row.id)
            except KeyError:
                continue
            if current.state != row.state:
                continue  # the step got as far as moving it
            failure = Failure(Cause.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            out.append(self.handle(current, step, failure))
        return out

    def block(self, decision: Blocked, now: float) -> None:
        """Block the decision's gate, with the probe that finds out when it is over: a project request
        for the token, a look at the folders for the shares, else the next task of the scope."""
        probe = (
            self.probe_account if decision.account else self.probe_shares if decision.scope == Scope.SHARES else None
        )
        self.gates[decision.scope].block(now, decision.reason, decision.retry_after_s, decision.note, probe=probe)

    def api_ok(self) -> None:
        self.gates[Scope.API].open(self.clock.now())

    # -- the shares and the output folders -------------------------------------------------------

    def share_failed(self, row: Row, step: Step, exc: OSError, doing: str, **extra: Any) -> Outcome:
        """A share did not answer while ``doing`` something with the file: the work on the shares pauses,
        and the row is due again once they answer; no failure or attempt is charged (``policy``)."""
        failure = Failure(Cause.SHARE_UNAVAILABLE, f"{doing}: {error_text(exc, doing)}")
        return self.handle(row, step, failure, **extra)

    def shares_blocked(self, exc: OSError, doing: str) -> None:
        """A share's error that no row carries (a claim, a look): block the gate by itself."""
        failure = Failure(Cause.SHARE_UNAVAILABLE, f"{doing}: {error_text(exc, doing)}")
        decision = self.decide(Step.CLAIM, failure, spread=False)
        assert isinstance(decision, Blocked)
        self.block(decision, self.clock.now())

    def share_error_of(self, exc: OSError, folder: Path) -> OSError | None:
        """The share's error behind ``exc`` met in the configured ``folder``, or None if there is none:
        an ENOENT from a folder that answers as itself proves the file absent; other errors are the
        file's own."""
        if is_share_error(exc):
            return exc
        if exc.errno not in ABSENT_ERRNOS:
            return None
        try:
            self.folders.look(folder)
        except OSError as look:
            return look if is_share_error(look) else None
        return None

    def output_failed(self, row: Row, step: Step, folder: Path, exc: OSError) -> Outcome:
        """Writing into done/ or failed/ failed: a share that does not answer pauses; a path too long for
        done/ fails the file (failed/ gives it a short name); a full disk blocks done/ and failed/; any
        other error is retried with backoff."""
        if is_share_error(exc):
            return self.share_failed(row, step, exc, f"cannot write into {folder}")
        if exc.errno == errno.ENAMETOOLONG and row.state == State.EXPORTING:
            return self.fail(row, f"its path does not fit into {folder} ({exc.strerror})", stage=Stage.TOO_LONG)
        cause = Cause.DISK_FULL if exc.errno in DISK_FULL_ERRNOS else Cause.LOCAL_IO
        return self.handle(row, step, Failure(cause, f"cannot write into {folder}: {exc.strerror or exc}"))


def error_text(exc: OSError, doing: str = "") -> str:
    """``Input/output error``, with the folder a folder's error is about if ``doing`` does not name it."""
    text = exc.strerror or str(exc)
    named = isinstance(exc, ShareUnavailable) and exc.filename and str(exc.filename) not in doing
    return f"{text} ({exc.filename})" if named else text


def export_display(final_path: bytes, done: Path) -> str:
    try:
        return display_name(os.fsencode(Path(os.fsdecode(final_path)).relative_to(done.parent)))
    except ValueError:
        return display_name(final_path)


def clock_time(at: float) -> str:
    return dt.datetime.fromtimestamp(at).astimezone().strftime("%H:%M:%S %Z")


def looking_until(at: float) -> str:
    """The stage of an upload the server may still be storing, as ``status`` shows it."""
    return f"the server may still be storing it: looking for it until {clock_time(at)}, then uploaded again"
