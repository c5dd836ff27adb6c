"""The life of a file, one step per state (the moves are listed in ``states.py``). Read top to bottom:

    claiming -> claimed -> uploading -> uploaded -> exporting -> done
                   \\           \\            \\
                    +-----------+------------+---> failing -> failed

Each step takes a journal row, does one irreversible thing at most, and records the new state
before the next one may start. When a step fails it classifies the failure and asks the retry
policy (``policy.decide``) what to do; ``_handle`` applies the answer — a retry at a time, a
failed file, or a blocked gate — in one journal transaction with the row's failure count.
Steps run on worker threads; they never share mutable state except through the journal.

A share the files are on (the inbox, the processing folder, done/, failed/) that does not answer
is never a file's fault: the work on the shares pauses as one blocked episode (``shares.py``), a
result fetched meanwhile is kept in the state folder (``kept_results.py``), and a file counts as
gone only when that is proven (ENOENT from a folder that answers as itself).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from . import changes, export, layout, policy, processing, readiness, results
from .clock import Clock
from .config import Config
from .dirfd import FolderInTheWay
from .files import (
    NotRegularFile,
    fits_path_max,
    free_target,
    fsync_dir,
    lstat_any,
    lstat_below,
    move_no_clobber,
    open_regular_file,
    rename_any,
    replace_file,
    safe_upload_name,
    shortened_name,
    sidecar_for,
    unlink_below,
    write_json_no_clobber,
    write_temp,
)
from .gates import Gates
from .journal import ACTIVE, BaseJournal, IllegalTransition, NewClaim, Row, State, display_name
from .kept_results import KeptResults
from .konfuzio import ApiError, KonfuzioClient, UnsupportedFile, UploadForm, sniff_file_type
from .metrics import Metrics
from .policy import Blocked, Cause, Fail, Failure, Retry, Scope, Step
from .reachability import CallbackWatch
from .shares import ABSENT_ERRNOS, Folders, ShareUnavailable, caused_by_share_error, is_share_error
from .tokens import hash_token, new_token, token_hash_of

log = logging.getLogger("konfuzio_watch")

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
HASH_CHUNK = 1024 * 1024
CLOCK_SKEW_S = 600.0  # the server's clock may differ from ours: list this much further back
SEARCHABLE_PDF = "searchable_pdf"  # a results.outputs entry
OCR_PDF_SUFFIX = ".ocr.pdf"  # done/<name>.ocr.pdf next to done/<name> and done/<name>.json
# An upload the application answered with an error (500): its handler has finished, so one look at the
# document list settles whether it stored the file; no reconcile window (policy.reconcile_window_s).
ANSWERED_STAGE = "upload answered an error: one look on the server, then uploaded again if not there"
REVIEW_STAGE = "waiting for review in Konfuzio"  # results.require_review: done, not reviewed yet
# Statuses in which a document waits for a person in Konfuzio (the row's stage says so).
PERSON_STAGES = {41: "waiting for splitting confirmation in Konfuzio"}


def limits_from(config: Config) -> policy.Limits:
    u = config.upload
    return policy.Limits(
        base_s=u.backoff_base_seconds,
        cap_s=u.backoff_cap_seconds,
        max_attempts=u.max_attempts,
        max_failures=config.results.max_failures,
    )


class Pipeline:
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
        self._waiting_claims: set[int] = set()  # claims a share's error left half done, finished when it answers
        self._waiting_lock = threading.Lock()
        # Are callbacks expected? Not in poll-only mode, nor while the daemon's verdict is that they do not
        # arrive (reachability.CallbackWatch): then results are polled soon after the upload instead of
        # after results.callback_timeout.
        self.expect_callbacks = config.callback.enabled
        self.started_at = clock.now()
        self.callback_watch: CallbackWatch | None = None  # set by the daemon when callbacks are expected
        # Set by the daemon: does it still hold the processing folder's lock (locks.ProcessingLock)?
        self.holds_processing_dir: Callable[[], bool] = lambda: True
        self.on_callbacks_missing: Callable[[str], None] | None = None
        self.journal = journal
        # A node of a cluster (a journal several daemons share): rows are leased; a file's identity is
        # its inode alone (each machine's mount of the share has a device number of its own).
        self.cluster = journal.shared
        self.lease_s = config.node.lease_seconds
        self.client = client
        self.clock = clock
        self.gates = gates
        self.metrics = metrics
        self.callback_base = callback_base
        self.on_transition = on_transition
        self.limits = limits_from(config)
        self.rng = rng or random.Random()
        # Choosing a free name in done/ or failed/ and taking it is one step for files with the same
        # relative path (two workers may place two "scan.pdf" at once). Files with other paths are
        # placed in parallel: their fsyncs overlap. Should two of them still pick one name (a.pdf's
        # "a (2).pdf" and a file named so), the no-clobber link lets one of them have it and the
        # other picks the next free name.
        self._placing = KeyedLocks()
        self.catalogs = results.CatalogCache()  # each project's label, label set and category names
        self._no_catalog: set[int] = set()  # projects whose catalog the server would not give (logged once)

    # -- paths ---------------------------------------------------------------------------------

    def inbox_path(self, row: Row) -> Path:
        return self.config.folders.inbox / row.rel_fspath

    def processing_path(self, row: Row) -> Path:
        name = row.claim_name if row.claim_name is not None else str(row.id).encode()
        return self.processing_dir / os.fsdecode(name)

    def callback_url(self, token: str) -> str:
        if not self.config.callback.enabled:
            return ""  # poll-only mode: Konfuzio sends nothing
        return f"{self.callback_base().rstrip('/')}/{self.config.callback.path.strip('/')}/{token}"

    # -- transitions and failures ----------------------------------------------------------------

    def move(self, row: Row, state: State, *, durable: bool = True, **fields: Any) -> Row:
        new = self.journal.transition(row, state, self.clock.now(), durable=durable, **fields)
        self._log_transition(row, new)
        return new

    def _log_transition(self, old: Row, new: Row) -> None:
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

    def _handle(
        self,
        row: Row,
        step: Step,
        failure: Failure,
        *,
        back_to: State | None = None,
        stage: str | None = None,
        **extra: Any,
    ) -> Row:
        """Apply the retry policy to one failed step. ``back_to``: the state the row returns to
        when it is to be tried again (default: it stays where it is)."""
        now = self.clock.now()
        decision = policy.decide(
            step, failure, row.failures, now, self.limits, attempts=row.attempts, jitter=self.rng.uniform(0.5, 1.0)
        )
        if row.state == State.DONE:
            return self._refresh_failed(row, step, failure, decision, now)
        if isinstance(decision, Fail):
            return self.fail(row, decision.reason, stage=stage or step.value)
        # A failing row's error is the reason it fails for, which its .error.json will say: an error
        # met while placing it in failed/ (a share busy for a moment) is logged, never stored over it.
        keeps_reason = row.state == State.FAILING
        if isinstance(decision, Blocked):
            self._block(decision, now)
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
            f"uploaded again no earlier than {_clock_time(again_at)} (in {again_at - now:.0f} s, "
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
            self._block(decision, now)
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

    def handle_internal_error(self, rows: list[Row], step: Step, exc: BaseException) -> None:
        """A bug in a step: log it with its traceback once, then the policy decides (backoff,
        and failed/ after ``results.max_failures``), so it neither spins nor kills the daemon."""
        for row in rows:
            try:
                current = self.journal.get(row.id)
            except KeyError:
                continue
            if current.state != row.state:
                continue  # the step got as far as moving it
            self._handle(current, step, Failure(Cause.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"))

    def _block(self, decision: Blocked, now: float) -> None:
        """Block the decision's gate, with the probe that finds out when it is over: a project request
        for the token, a look at the folders for the shares, else the next task of the scope."""
        probe = (
            self.probe_account if decision.account else self.probe_shares if decision.scope == Scope.SHARES else None
        )
        self.gates[decision.scope].block(now, decision.reason, decision.retry_after_s, decision.note, probe=probe)

    def _share_failed(self, row: Row, step: Step, exc: OSError, doing: str, **extra: Any) -> Row:
        """A share did not answer while ``doing`` something with the file: the work on the shares pauses,
        and the row is due again once they answer; no failure or attempt is charged (``policy``)."""
        failure = Failure(Cause.SHARE_UNAVAILABLE, f"{doing}: {_error_text(exc, doing)}")
        return self._handle(row, step, failure, **extra)

    def _shares_blocked(self, exc: OSError, doing: str) -> None:
        """A share's error that no row carries (a claim, a look): block the gate by itself."""
        now = self.clock.now()
        decision = policy.decide(
            Step.CLAIM, Failure(Cause.SHARE_UNAVAILABLE, f"{doing}: {_error_text(exc, doing)}"), 0, now, self.limits
        )
        assert isinstance(decision, Blocked)
        self._block(decision, now)

    def probe_shares(self) -> bool:
        """The probe of the blocked shares: does every folder answer as itself (a stat and a listing
        each)? Then the claims a share's error left half done are finished, and the work goes on."""
        try:
            self.folders.look_all()
        except OSError as exc:
            if not is_share_error(exc):
                raise
            self._shares_blocked(exc, "the folders do not answer")
            return False
        if not self._finish_waiting_claims():
            return False
        self.gates[Scope.SHARES].open(self.clock.now())
        return True

    def fail(self, row: Row, error: str, stage: str) -> Row:
        row = self.move(row, State.FAILING, error=error, stage=stage, next_at=self.clock.now())
        return self.finish_failed(row)

    def _api_ok(self) -> None:
        self.gates[Scope.API].open(self.clock.now())

    def probe_account(self) -> bool:
        """Does Konfuzio accept our token, and does every configured project exist? One cheap
        request per project - at start-up, and as the probe while the API is blocked for the token
        or a project (a file would only be failed by it). The token file is read again first, so a
        rotated credential is picked up without a restart."""
        self.reload_token()
        now = self.clock.now()
        project_ids = [self.config.konfuzio.project_id, *(r.project_id for r in self.config.routes if r.project_id)]
        for project_id in dict.fromkeys(project_ids):
            try:
                self.client.project(project_id)
            except ApiError as exc:
                failure = exc.failure
                if failure.cause == Cause.NOT_FOUND:
                    failure = Failure(
                        Cause.NOT_FOUND, f"project {project_id} not found or not visible to this token", status=404
                    )
                decision = policy.decide(Step.RECONCILE, failure, 0, now, self.limits)
                if isinstance(decision, Blocked):
                    self._block(decision, now)
                else:  # a timeout or a 500: not a verdict on the token; the next tasks will tell
                    log.warning("could not check project %d: %s", project_id, failure.message)
                return False
        self._api_ok()
        return True

    def reload_token(self) -> None:
        """Read the token file again (a probe; a SIGHUP), keep the token we have if it cannot be read."""
        if self.config.konfuzio.token_file is None:
            return
        try:
            token = self.config.api_token()
        except Exception as exc:  # noqa: BLE001 - an unreadable file: keep the token we have, say why
            log.warning("%s", exc)
            return
        if self.client.set_token(token):
            log.info("the API token in %s changed; trying the new one", self.config.konfuzio.token_file)

    # -- recovery: finish what a crash (or an unwritable journal) left half done -----------------

    def recover(self, in_hand: Iterable[int] = (), alone: bool = True) -> int:
        """Journal rows are the truth. Returns the number of unfinished files.

        A node of a cluster recovers only what is its own: the rows its previous run (or writes lost
        with the database) left leased to it, except those ``in_hand`` (steps still running), and
        rows whose node died (``take_over``). ``alone``: no other node is alive, so callbacks that
        came while the cluster was down are lost: every waiting file is looked at once now."""
        self.kept.sweep(r.id for r in self.journal.rows([State.EXPORTING], limit=10_000_000))
        if self.cluster:
            return self._recover_node(set(in_hand), alone)
        claiming = self.journal.rows([State.CLAIMING], limit=10_000_000)
        if claiming:
            self.finish_claims(claiming)
        self.adopt_orphans()
        now = self.clock.now()
        # An upload in flight when we stopped may still be stored by the server: from now on, look
        # for it for the reconcile window before uploading again.
        in_flight = [r for r in self.journal.rows([State.UPLOADING], limit=10_000_000) if r.ambiguous_since is None]
        self.journal.update_many(in_flight, now, ambiguous_since=now)
        # Callbacks that came while we were down are lost: look at every waiting file once now.
        waiting = self.journal.rows([State.UPLOADED], limit=10_000_000)
        self.journal.update_many(waiting, now, next_at=now)
        r = self.config.results
        longest = max(self.limits.cap_s, r.poll_interval, r.callback_timeout) + 1.0
        clamped = self.journal.clamp_due(now, longest)
        if clamped:
            log.warning(
                "%d file(s) were due more than %.0f s ahead (the clock was set back?); due now", clamped, longest
            )
        return sum(n for state, n in self.journal.counts().items() if state in ACTIVE)

    def _recover_node(self, in_hand: set[int], alone: bool) -> int:
        self.take_over(own=True, exclude=in_hand)
        self.adopt_orphans()
        now = self.clock.now()
        if alone:
            self.journal.make_due([State.UPLOADED], now)
        r = self.config.results
        longest = max(self.limits.cap_s, r.poll_interval, r.callback_timeout) + 1.0
        clamped = self.journal.clamp_due(now, longest)
        if clamped:
            log.warning(
                "%d file(s) were due more than %.0f s ahead (a node's clock is ahead, or was set back?); due now",
                clamped,
                longest,
            )
        return sum(n for state, n in self.journal.counts().items() if state in ACTIVE)

    def take_over(self, *, own: bool = False, exclude: Iterable[int] = ()) -> list[Row]:
        """Lease to this node the rows whose node stopped renewing its leases (it died, hung, or lost the
        database) - with ``own``, also this node's own except ``exclude`` - and recover them as after a
        crash (``resume``). Returns them as they are now."""
        done: set[int] = set(exclude)
        out: list[Row] = []
        while batch := self.journal.take_over_expired(self.lease_s, 500, own=own, exclude=done):
            done.update(r.id for r in batch)
            out += self.resume(batch)
        return out

    def resume(self, rows: list[Row]) -> list[Row]:
        """What start-up recovery does, on these rows only (they are leased to this node): finish their
        claims, look for uploads that were in flight before uploading again (the reconcile window starts
        now), look at waiting documents at once. Then any node may go on with them."""
        names = ", ".join(r.display_path for r in rows[:10]) + (f", and {len(rows) - 10} more" if rows[10:] else "")
        log.warning(
            "took over %d file(s) whose node stopped renewing its lease (it stopped, died or lost the journal): %s",
            len(rows),
            names,
        )
        claiming = [r for r in rows if r.state == State.CLAIMING]
        if claiming:
            self.finish_claims(claiming)
        now = self.clock.now()
        self.journal.update_many(
            [r for r in rows if r.state == State.UPLOADING and r.ambiguous_since is None], now, ambiguous_since=now
        )
        self.journal.update_many([r for r in rows if r.state == State.UPLOADED], now, next_at=now)
        self.journal.release_leases(r.id for r in rows)
        return self.journal.get_many([r.id for r in rows])

    def adopt_orphans(self) -> list[Path]:
        """Files in processing/ that no row claims (the journal was lost, or restored from a backup)
        go back into the inbox under their base names, visibly; never matched to another row.

        The folder is listed before the journal is read: a claim writes its row before it moves the
        file, so a file another node is claiming right now has its row by the time it is read.

        Only while this daemon holds the folder's lock: a folder that is no longer the one it locked
        (removed or moved away, made again by another daemon) may hold another live daemon's files."""
        if not self.holds_processing_dir():
            log.warning(
                "%s is no longer the processing folder this daemon locked: files without a journal row there "
                "are left alone until it holds it again",
                self.processing_dir,
            )
            return []
        try:
            listed = processing.names(self.processing_dir)
            names = processing.orphans(listed, self.journal.claim_names(ACTIVE))
            names = self._drop_leftover_names(names)
        except OSError as exc:
            if not is_share_error(exc):
                raise
            log.warning(
                "cannot look for files without a journal row in %s (%s); looked for at the next start",
                self.processing_dir,
                _error_text(exc),
            )
            return []
        adopted = []
        for name in names:
            source = self.processing_dir / os.fsdecode(name)
            try:
                target = free_target(self.config.folders.inbox, os.fsdecode(processing.original_name(name)), "")
                move_no_clobber(source, target, src_root=self.processing_dir, dst_root=self.config.folders.inbox)
            except FileNotFoundError:
                continue  # finished (placed into done/ or failed/) since the folder was listed
            except OSError as exc:
                log.error(
                    "%s: found in %s with no journal row, and cannot move it back into the inbox: %s",
                    display_name(name),
                    self.processing_dir,
                    exc.strerror or exc,
                )
                continue
            adopted.append(target)
        if adopted:
            log.warning(
                "%d file(s) in %s had no journal row (a lost or restored journal?); moved back into the "
                "inbox to go through again: %s",
                len(adopted),
                self.processing_dir,
                ", ".join(display_name(os.fsencode(t.relative_to(self.config.folders.inbox))) for t in adopted[:20])
                + (" ..." if len(adopted) > 20 else ""),
            )
        return adopted

    def _drop_leftover_names(self, names: list[bytes]) -> list[bytes]:
        """Remove processing/ names of done or failed rows that are a second name of the very file in
        done/ or failed/ (same device and inode): the move's unlink is not fsynced (``_move_into_place``),
        so a power failure can bring it back. Nothing is lost by removing it; anything else under such
        a name (another file, a copy) is adopted like any orphan. Returns the names left to adopt."""
        finished = self.journal.finished_claims(names) if names else {}
        removed = []
        for name, row in finished.items():
            source = self.processing_dir / os.fsdecode(name)
            if row.final_path is None or not _same_file(source, Path(os.fsdecode(row.final_path))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(source)
            removed.append(name)
            log.info(
                "%s: removed its leftover name %s in %s (the file is in %s)",
                row.display_path,
                display_name(name),
                self.processing_dir,
                export_display(row.final_path, self.config.folders.done),
            )
        if removed:
            fsync_dir(self.processing_dir)
        gone = set(removed)
        return [n for n in names if n not in gone]

    # -- claiming: inbox -> processing/ (scheduler thread, in batches) ---------------------------

    def claim(self, rel_paths: list[bytes], detected_at: dict[bytes, float] | None = None) -> list[Row]:
        """Take files out of the inbox: journal first, then move, then confirm - one batch. A share
        that does not answer stops the batch: ``ClaimsPaused`` names the files not taken, for later."""
        if not rel_paths:
            return []
        claims: list[NewClaim] = []
        left: list[bytes] = []
        inbox = os.fsencode(self.config.folders.inbox)
        for index, rel in enumerate(rel_paths):
            path = os.path.join(inbox, rel)
            try:
                st = lstat_any(path)
            except OSError as exc:
                share_error = self._share_error_of(exc, self.config.folders.inbox)
                if share_error is None:
                    continue  # gone since the tracker looked
                self._shares_blocked(share_error, f"cannot look at {display_name(rel)} in the inbox")
                left = rel_paths[index:]
                break
            claims.append(
                NewClaim(rel, processing.new_claim_name(rel), st.st_dev, st.st_ino, (detected_at or {}).get(rel))
            )
        rows = self.journal.add_claims(claims, self.clock.now()) if claims else []
        claimed = self.finish_claims(rows)
        if left:
            raise ClaimsPaused(left)
        return claimed

    def _share_error_of(self, exc: OSError, folder: Path) -> OSError | None:
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

    def _is_claimed_file(self, found: os.stat_result, row: Row) -> bool | None:
        """Is the file found under a row's claim name the one it claimed? Its inode (and, with one node,
        its device: in a cluster each machine's mount of the share has a device number of its own; so
        has a share mounted anew, which keeps the server's inode numbers). None: the inode cannot tell,
        on FUSE (``Folders.inodes_are_stable``); then its name, an unpredictable one in a folder only
        the daemon writes, and its size, mtime and ctime (the content when that moved) tell."""
        if row.file_ino is None:
            return True
        if not self.folders.inodes_are_stable(self.processing_dir):
            return None
        if self.cluster:
            return found.st_ino == row.file_ino
        if found.st_dev != row.file_dev and found.st_dev == self.folders.device_of(self.processing_dir):
            return found.st_ino == row.file_ino  # the processing folder's share, mounted anew
        return (found.st_dev, found.st_ino) == (row.file_dev, row.file_ino)

    def finish_claims(self, rows: list[Row]) -> list[Row]:
        """Move each claimed file into the processing folder under its claim name (or find it there).
        A share's error leaves a row ``claiming`` (its rename may or may not have happened): it is
        finished once the shares answer again (``probe_shares``), as start-up recovery would."""
        taken, folders, waiting = [], {self.processing_dir}, []
        for row in rows:
            try:
                if self._finish_claim(row, folders):
                    taken.append(row)
            except OSError as exc:
                if not is_share_error(exc):
                    raise
                waiting.append((row, exc))
        if waiting:
            with self._waiting_lock:
                self._waiting_claims.update(row.id for row, _ in waiting)
            row, exc = waiting[0]
            self._shares_blocked(exc, f"cannot take {row.display_path} out of the inbox")
        for folder in folders:  # the renames must be durable before the journal says "claimed"
            fsync_dir(folder)
        now = self.clock.now()
        # Not durable (the upload's own durable write makes it so): lost in a power failure, the row is
        # ``claiming`` again and recovery finds the file under its claim name (its inode checked).
        try:
            claimed = self.journal.transition_many(taken, State.CLAIMED, now, durable=False, next_at=now)
        except IllegalTransition:  # a cluster: a row was taken over meanwhile; move the others one by one
            claimed, kept = [], []
            for row in taken:
                try:
                    claimed.append(self.journal.transition(row, State.CLAIMED, now, durable=False, next_at=now))
                    kept.append(row)
                except IllegalTransition as exc:
                    log.warning("%s", exc)
            taken = kept
        for old, new in zip(taken, claimed, strict=True):
            self._log_transition(old, new)
        self.journal.release_leases(r.id for r in claimed)  # any node may upload them
        return claimed

    def _finish_claim(self, row: Row, folders: set[Path]) -> bool:
        """One row's part of ``finish_claims``: True if its file is in the processing folder now;
        False if the row was discarded. A share's error is raised."""
        target = self.processing_path(row)
        try:
            found: os.stat_result | None = os.lstat(target)  # processing/ names are short
        except FileNotFoundError:
            found = None
        if found is not None and self._is_claimed_file(found, row) is False:
            log.error(
                "%s: %s holds another file than the one claimed; it is left to be adopted at start-up, "
                "and this file is claimed anew",
                row.display_path,
                target,
            )
            self._discard(row)
            return False
        if found is not None:
            return True
        source = self.inbox_path(row)
        try:
            rename_any(source, target)
        except FileNotFoundError as exc:
            if self._renamed_by_another(row, target):
                return True
            for folder in (self.config.folders.inbox, self.processing_dir):
                share_error = self._share_error_of(exc, folder)
                if share_error is not None:  # the inbox (or the processing folder) is away: no proof of anything
                    raise share_error from None
            log.info("%s: vanished from the inbox before it was claimed", row.display_path)
            self._discard(row)
            return False
        except OSError as exc:  # e.g. a folder the daemon may not write to: leave it be
            if is_share_error(exc):
                raise
            log.error(
                "%s: cannot take it out of the inbox (%s); it stays there and is tried again at the next rescan",
                row.display_path,
                exc.strerror or exc,
            )
            self._discard(row)
            return False
        folders.add(source.parent)
        return True

    def _finish_waiting_claims(self) -> bool:
        """Finish the claims a share's error left half done; False if a share failed again."""
        with self._waiting_lock:
            ids, self._waiting_claims = self._waiting_claims, set()
        if not ids:
            return True
        rows = [r for r in self.journal.get_many(sorted(ids)) if r.state == State.CLAIMING]
        self.finish_claims(rows)
        with self._waiting_lock:
            return not self._waiting_claims

    def _renamed_by_another(self, row: Row, target: Path) -> bool:
        """The claim's rename found no file in the inbox: did another node (a row taken over from it)
        rename this very claim a moment ago? Then the file is where the row says, and it is claimed."""
        if not self.cluster:
            return False
        try:
            found = os.lstat(target)
        except FileNotFoundError:
            return False
        return self._is_claimed_file(found, row) is not False

    def _discard(self, row: Row) -> None:
        try:
            self.journal.discard(row)
        except IllegalTransition as exc:  # a cluster: another node took this claim over meanwhile
            log.warning("%s", exc)

    # -- claimed -> uploading -> uploaded ---------------------------------------------------------

    def upload(self, row: Row) -> Row:
        """Validate the claimed file and POST it, streamed from its descriptor: memory does not
        grow with the file's size (hash, type sniff and completeness read it in chunks)."""
        try:
            fd, st = open_regular_file(self.processing_path(row))
        except NotRegularFile as exc:
            return self.fail(row, str(exc), stage="validate")
        except OSError as exc:
            share_error = self._share_error_of(exc, self.processing_dir)
            if share_error is not None:  # not the file's fault, and no proof that it is gone
                return self._share_failed(row, Step.UPLOAD, share_error, "cannot read the file", stage="validate")
            if exc.errno in ABSENT_ERRNOS:
                return self.fail(row, "the file disappeared from the processing folder", stage="validate")
            return self._handle(
                row, Step.UPLOAD, Failure(Cause.UNREADABLE, f"cannot read the file: {exc.strerror}"), stage="validate"
            )
        with os.fdopen(fd, "rb") as f:
            try:
                sha256 = self._validate(f, st)
            except (UnsupportedFile, _Invalid) as exc:
                return self.fail(row, str(exc), stage="validate")
            except OSError as exc:
                if is_share_error(exc):
                    return self._share_failed(row, Step.UPLOAD, exc, "cannot read the file", stage="validate")
                failure = Failure(Cause.UNREADABLE, f"cannot read the file: {exc.strerror}")
                return self._handle(row, Step.UPLOAD, failure, stage="validate")
            if row.attempts >= self.config.upload.max_attempts:
                return self.fail(row, row.error or "too many attempts", stage="upload")
            if self.config.upload.on_duplicate == "fail":
                earlier = self.journal.find_same_content(sha256, row.id)
                if earlier is not None:
                    row = self.journal.update(row, self.clock.now(), sha256=sha256, size=st.st_size)
                    return self.fail(row, duplicate_message(earlier, self.config.folders.done), stage="duplicate")
            token = new_token()
            name = safe_upload_name(os.path.basename(row.rel_path), fallback=f"document-{row.id}")
            project_id, category_id, dataset_status = self.config.route_for(row.rel_fspath)
            old = row
            row = self.journal.start_upload(
                row,
                hash_token(token),
                self.clock.now(),
                sha256=sha256,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns,
                upload_name=name,
                attempts=row.attempts + 1,
                stage="upload",
                project_id=project_id,
                next_at=self.clock.now(),
            )
            self._log_transition(old, row)
            form = UploadForm(project_id, self.callback_url(token), category_id, dataset_status)
            f.seek(0)
            try:
                details = self.client.upload(f, name, form)
                document_id = int(details["id"])
            except ApiError as exc:
                failure = exc.failure
                if caused_by_share_error(exc):  # the file's share failed while it was sent (the server may hold
                    failure = Failure(
                        Cause.SHARE_UNAVAILABLE,  # a part of it: it is looked for before a new upload)
                        f"cannot read the file while sending it: {failure.message}",
                        maybe_received=True,
                    )
                return self._upload_failed(row, failure)
            except (KeyError, TypeError, ValueError) as exc:
                return self._upload_failed(
                    row, Failure(Cause.TRANSIENT, f"unexpected upload response: {exc!r}", maybe_received=True)
                )
        self._api_ok()
        self.metrics.uploads.inc()
        now = self.clock.now()
        # Not durable when it returns: nothing outside acts on it before a durable write (the export's
        # final_path) covers it; lost in a power failure, the row is ``uploading`` again and is
        # reconciled by its token (already journaled) before any new upload: never uploaded twice.
        new = self.journal.mark_uploaded(row, document_id, now, poll_at=now + self._first_poll_delay(), durable=False)
        self._log_transition(row, new)
        if row.document_id is not None:  # uploaded again after it changed
            self._delete_superseded(new, row.document_id)
        return new

    def _delete_superseded(self, row: Row, document_id: int) -> None:
        """The document of the file's bytes before they changed goes, once the new one is stored: one
        document per file. (An UPLOADING row still names it: only a changed file's row goes back from
        exporting to be uploaded again; ``reconcile`` never takes it for the new upload's.)"""
        if self.journal.record_extra(
            document_id, row, row.project_id or self.config.konfuzio.project_id, self.clock.now()
        ):
            log.info(
                "%s: deleting document %d, the result of its bytes before they changed", row.display_path, document_id
            )
        self.delete_extras()

    def _validate(self, f: BinaryIO, st: os.stat_result) -> str:
        """Size cap, type (the SDK's sniffer, on this descriptor), PDF completeness; the sha256,
        computed in chunks."""
        limit = int(self.config.upload.max_file_mb * 1024 * 1024)
        if st.st_size == 0:
            raise _Invalid("empty file (0 bytes)")
        if st.st_size > limit:
            raise _Invalid(
                f"file is {st.st_size / 1048576:.1f} MiB, over upload.max_file_mb ({self.config.upload.max_file_mb:g})"
            )
        sniff_file_type(f.fileno())
        if not readiness.pdf_looks_complete(f.fileno(), st.st_size):
            raise _Invalid(
                f"incomplete PDF: it does not end with %%EOF after waiting watch.incomplete_grace_seconds "
                f"({self.config.watch.incomplete_grace_seconds:g} s); was the scanner still writing it?"
            )
        digest, size = hashlib.sha256(), 0
        f.seek(0)
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(block)
            size += len(block)
        if size > limit:
            raise _Invalid(f"file grew over upload.max_file_mb ({self.config.upload.max_file_mb:g})")
        if size != st.st_size:
            raise OSError(errno.EAGAIN, "the file changed while it was read")
        return digest.hexdigest()

    def _first_poll_delay(self) -> float:
        r = self.config.results
        return r.callback_timeout if self.expect_callbacks else r.first_poll_seconds

    def _upload_failed(self, row: Row, failure: Failure) -> Row:
        self.metrics.upload_retries.inc()
        # If the server may hold it, the row stays ``uploading`` and is reconciled (looked up by
        # its token) before any new upload; otherwise it goes back to ``claimed``.
        if failure.maybe_received:
            now = self.clock.now()
            new = self._handle(row, Step.UPLOAD, failure, stage="upload", ambiguous_since=now)
            if new.state == State.UPLOADING:  # (a crash before this write: the window, as for a timeout)
                answered = not policy.reconcile_window_s(failure, self.config.reconcile_window_s)
                new = self.journal.update(
                    new,
                    now,
                    stage=ANSWERED_STAGE
                    if answered
                    else _looking_until(
                        policy.upload_again_at(now, new.next_at or now, self.config.reconcile_window_s)
                    ),
                )
            return new
        return self._handle(row, Step.UPLOAD, failure, back_to=State.CLAIMED, stage="upload")

    # -- uploading (after a crash or an ambiguous error): does the server have it? ---------------

    def reconcile(self, rows: list[Row]) -> list[Row]:
        """Find documents the server already holds for these rows before any re-upload: matched by
        the callback token in their callback URL (every attempt's token), which no other file can
        have. A file not found is looked for again until its reconcile window has passed (a slow
        server may store it late); a second document of one file (a late earlier attempt) is deleted."""
        if not rows:  # a pass for the second copies that callbacks revealed
            self.delete_extras()
            return []
        now = self.clock.now()
        tokens = self.journal.tokens_of(r.id for r in rows)
        by_id = {r.id: r for r in rows}
        late = self.journal.tokens_with_documents(since=now - 86_400)
        found: dict[int, list[int]] = {}
        extras: list[tuple[int, int, int]] = []  # (document id, row id, project id)
        project_ids = {row.project_id or self.config.konfuzio.project_id for row in rows}
        first_sent = self.journal.first_sent_at(by_id)
        oldest_wanted = (first_sent if first_sent is not None else now) - CLOCK_SKEW_S
        try:
            for project_id in project_ids:
                for page in self.client.document_pages(project_id):  # newest first
                    for doc in page:
                        token = token_hash_of(doc.get("callback_url"))
                        if doc.get("id") is None or token is None:
                            continue
                        if token in tokens:
                            if int(doc["id"]) != by_id[tokens[token]].document_id:  # (not its bytes before a change)
                                found.setdefault(tokens[token], []).append(int(doc["id"]))
                        elif token in late and late[token][1] != int(doc["id"]):
                            extras.append((int(doc["id"]), late[token][0], project_id))
                    if len(found) == len(rows) or _created_before(page, oldest_wanted):
                        break  # all found, or the list reached documents older than any of our uploads
        except ApiError as exc:
            failure = Failure(
                exc.failure.cause,
                f"cannot list documents to reconcile: {exc.failure.message}",
                status=exc.failure.status,
                retry_after_s=exc.failure.retry_after_s,
            )
            return [self._handle(row, Step.RECONCILE, failure) for row in rows]
        self._api_ok()
        out = []
        for row_id, documents in found.items():
            first, *others = sorted(documents)
            row = by_id[row_id]
            others += [row.document_id] if row.document_id is not None else []  # the result of its old bytes
            extras += [(d, row_id, row.project_id or self.config.konfuzio.project_id) for d in others]
            new = self.journal.mark_uploaded(row, first, self.clock.now(), poll_at=self.clock.now())
            log.info("%s: the server already had it as document %d", row.display_path, first)
            self._log_transition(row, new)
            out.append(new)
        for row in rows:
            if row.id in found:
                continue
            window = 0.0 if row.stage == ANSWERED_STAGE else self.config.reconcile_window_s
            # Written by whichever node's upload timed out, compared by this one's: in a cluster both
            # are the database's clock (clock.DatabaseClock), so the window is the same for every node.
            since = row.ambiguous_since if row.ambiguous_since is not None else row.updated_at
            if now < since + window:  # a slow server may still be storing it: look again, do not upload
                again = min(since + window, now + policy.backoff_s(row.failures + 1, self.limits))
                out.append(self.journal.update(row, now, next_at=again, stage=_looking_until(since + window)))
                log.debug(
                    "%s: not on the server yet; looking again in %.1f s (window ends in %.1f s)",
                    row.display_path,
                    again - now,
                    since + window - now,
                )
            elif row.attempts >= self.config.upload.max_attempts:
                out.append(self.fail(row, f"gave up after {row.attempts} attempts: {row.error}", stage="upload"))
            else:
                out.append(self.move(row, State.CLAIMED, next_at=now, failures=row.failures, error=row.error))
        for document_id, row_id, project_id in extras:
            row = by_id.get(row_id) or self.journal.get(row_id)
            if self.journal.record_extra(document_id, row, project_id, now):
                log.warning(
                    "%s: the server holds a second copy (document %d, from an earlier attempt); deleting it",
                    row.display_path,
                    document_id,
                )
        if extras:
            self.delete_extras()
        return out

    def delete_extras(self) -> int:
        """Delete second copies of our files on the server, after checking that each carries one of
        its file's earlier tokens (a forged callback cannot make us delete someone's document)."""
        deleted = 0
        for document_id, row_id, _project_id in self.journal.pending_extras():
            row = self.journal.get(row_id)
            try:
                details = self.client.document(document_id)
                if (
                    token_hash_of(details.get("callback_url")) not in self.journal.tokens_of([row_id])
                    or document_id == row.document_id
                ):
                    self.journal.settle_extra(document_id, self.clock.now(), error="not a copy of this file")
                    log.warning("%s: document %d is not a copy of it; not deleted", row.display_path, document_id)
                    continue
                self.client.delete_document(document_id)
            except ApiError as exc:
                if exc.failure.cause == Cause.NOT_FOUND:
                    self.journal.settle_extra(document_id, self.clock.now())  # gone already
                    continue
                log.warning(
                    "%s: could not delete the extra document %d: %s; will try again",
                    row.display_path,
                    document_id,
                    exc.failure.message,
                )
                continue
            self.journal.settle_extra(document_id, self.clock.now())
            self.metrics.extra_documents.inc()
            log.info("%s: deleted document %d, a second copy from an earlier attempt", row.display_path, document_id)
            deleted += 1
        return deleted

    # -- uploaded: confirm the outcome with the API (after a callback, or by polling) -----------

    def check_result(self, row: Row) -> Row:
        assert row.document_id is not None
        checked_at = self.clock.now()
        try:
            details = self.client.document(row.document_id)
        except ApiError as exc:
            return self._fetch_failed(row, exc.failure)
        if details.get("id") != row.document_id:
            return self._fetch_failed(
                row, Failure(Cause.TRANSIENT, f"details of document {details.get('id')} returned for {row.document_id}")
            )
        self._api_ok()
        status = details.get("status_data")
        if status == export.STATUS_DONE:
            if row.callback_at is None and self.expect_callbacks and row.stage != REVIEW_STAGE:
                self._callback_missing(row)  # (once per file, not at each look while it waits for review)
            if self.config.results.require_review and not details.get("is_reviewed"):
                return self._wait_for_person(row, checked_at, REVIEW_STAGE)
            # Not durable: the export's first write into done/ waits for its durable final_path, which
            # covers this; lost in a power failure, the row is ``uploaded`` and is looked at again.
            row = self.move(row, State.EXPORTING, durable=False, stage="export", next_at=self.clock.now(), failures=0)
            return self.export(row, details, checked_at=checked_at)
        if status == export.STATUS_FAILED:
            return self.fail(row, "Konfuzio could not process the document (status 111)", stage="processing")
        if status in PERSON_STAGES:
            return self._wait_for_person(row, checked_at, PERSON_STAGES[status])
        name = export.STATUS_NAMES.get(status, f"status {status}")
        now = self.clock.now()
        return self.journal.schedule_poll(row, checked_at, now, now + self._poll_delay(row, now), stage=name)

    def _poll_delay(self, row: Row, now: float) -> float:
        """With callbacks: every ``results.poll_interval``. Poll-only: as long as the document has
        been processing so far (5, 5, 10, 20, 40 s ...), up to ``poll_interval``: a document done in
        20 s is in done/ a few seconds later, one that takes an hour costs few requests."""
        r = self.config.results
        if self.expect_callbacks:
            return r.poll_interval
        return min(r.poll_interval, max(r.first_poll_seconds, now - (row.uploaded_at or now)))

    def _callback_missing(self, row: Row) -> None:
        """A result found done by polling whose callback never came, although it had time to
        (uploaded by this run: after a restart, callbacks sent while we were down are lost)."""
        now = self.clock.now()
        if (
            row.uploaded_at is None
            or row.uploaded_at < self.started_at
            or now - row.uploaded_at < self.config.results.callback_timeout
        ):
            return
        journal = self.gates[Scope.JOURNAL]
        if journal.is_blocked or journal.opened_at >= row.uploaded_at:
            return  # its callback came while the journal could not be written: refused, not missing
        # The verdict turned to no: the daemon says so, and has results polled soon from now on.
        if self.callback_watch is not None and self.callback_watch.found_by_polling() and self.on_callbacks_missing:
            self.on_callbacks_missing(self.callback_base().rstrip("/"))

    def _wait_for_person(self, row: Row, checked_at: float, stage: str) -> Row:
        """Done by the machine, waiting for a person in Konfuzio (a review, a split to confirm). The
        server calls back when it is done; until then it is looked at every ``callback_timeout``
        (a lost callback), not every ``poll_interval``: a person may take days. Poll-only mode
        (no callbacks) looks every ``poll_interval``."""
        if row.stage != stage:
            log.info("%s: %s (document %d: %s)", row.display_path, stage, row.document_id, self.web_url(row))
        now = self.clock.now()
        r = self.config.results
        wait = max(r.poll_interval, r.callback_timeout) if self.expect_callbacks else r.poll_interval
        return self.journal.schedule_poll(row, checked_at, now, now + wait, stage=stage)

    def web_url(self, row: Row) -> str | None:
        """The document in the Konfuzio web app (for logs and ``status``)."""
        return None if row.document_id is None else results.web_url(self.config.konfuzio.host, row.document_id)

    def _fetch_failed(self, row: Row, failure: Failure) -> Row:
        self.metrics.fetch_retries.inc()
        if failure.cause == Cause.NOT_FOUND:
            failure = Failure(Cause.NOT_FOUND, f"document {row.document_id} no longer exists on the server", status=404)
        return self._handle(row, Step.FETCH, failure, stage="result")

    # -- exporting: JSON (and the searchable PDF) next to the file in done/ ----------------------

    def export(self, row: Row, details: dict[str, Any] | None = None, checked_at: float | None = None) -> Row:
        assert row.document_id is not None
        kept = self.kept.take(row)  # fetched before, while done/ did not answer
        changed = None  # (while a share does not answer: looked at when the file is placed)
        if not self.gates[Scope.SHARES].is_blocked:
            try:
                changed = self._changed_since_upload(row)
            except OSError as exc:
                if not is_share_error(exc):
                    raise
        if changed:
            self.kept.drop(row.id)
            return self._upload_again(row, changed)
        if kept is not None:
            result, checked_at = kept
        else:
            if checked_at is None or details is None:
                checked_at = self.clock.now()
            try:
                if details is None:
                    details = self.client.document(row.document_id)
                result = self._build_result(row, details, revision=1)
            except ApiError as exc:
                return self._fetch_failed(row, exc.failure)
            self._api_ok()
            if self.gates[Scope.SHARES].is_blocked:  # not placed now: kept until the shares answer
                return self._keep_result(row, result, checked_at)
        done = self.config.folders.done
        rel_path = self._done_rel_path(row, result)
        staged = None
        if self.wants_pdf:
            try:
                self.folders.check(done)
                staged = self._download_pdf(row)
            except ApiError as exc:
                return self._pdf_failed(row, exc.failure)
            except OSError as exc:
                if is_share_error(exc):
                    self._keep_result(row, result, checked_at)
                return self._output_failed(row, Step.EXPORT, done, exc)
        try:
            placed = self._place(row, done, export.RESULT_SUFFIX, result,
                                 lambda existing: export.result_is_for(row, existing), State.DONE, Step.EXPORT,
                                 rel_path=rel_path, pdf=staged, done_fields={"revision": 1},
                                 checked_at=checked_at)  # fmt: skip
        finally:
            if staged is not None:
                _unlink_quietly(staged)
        if kept is not None and placed.state != State.EXPORTING:
            self.kept.drop(row.id)
        return placed

    def _keep_result(self, row: Row, result: dict[str, Any], checked_at: float | None) -> Row:
        """A share does not answer: keep the fetched result in the state folder until it can be placed
        (the export then needs nothing from Konfuzio). The row stays ``exporting``, due once the
        shares answer again."""
        try:
            self.kept.keep(row, result, checked_at)
        except OSError as exc:  # the state folder's disk: the export fetches the result again then
            log.warning(
                "%s: cannot keep its result in %s (%s); it is fetched again once the shares answer",
                row.display_path,
                self.kept.folder,
                exc.strerror or exc,
            )
        return row

    @property
    def wants_pdf(self) -> bool:
        return SEARCHABLE_PDF in self.config.results.outputs

    def _build_result(self, row: Row, details: dict[str, Any], revision: int) -> dict[str, Any]:
        """The result file's content from the details and the further calls it needs (annotations,
        character boxes unless ``results.bbox: false``, the project's catalog); raises ``ApiError``."""
        assert row.document_id is not None
        annotations = self.client.annotations(row.document_id)
        catalog = self._catalog(row, details, annotations)
        bbox = self._bbox(row.document_id) if self.config.results.bbox else None
        return results.build_result(row, details, bbox, self.clock.now(), annotations=annotations, catalog=catalog,
                                    host=self.config.konfuzio.host, revision=revision,
                                    include_bbox=self.config.results.bbox)  # fmt: skip

    def _catalog(self, row: Row, details: dict[str, Any], annotations: list[dict]) -> results.ProjectCatalog | None:
        """The project's names of labels, label sets and categories: cached, fetched again when the
        document refers to an id the cache does not know. A server without these lists (404, 400)
        gives results with the names the answers carry; other errors are retried like any fetch."""
        project = details.get("project")
        project_id = project if isinstance(project, int) else row.project_id or self.config.konfuzio.project_id
        try:
            return self.catalogs.catalog_for(project_id, results.references(details, annotations),
                                             self.client.project_catalog)  # fmt: skip
        except ApiError as exc:
            if exc.failure.cause not in (Cause.NOT_FOUND, Cause.INVALID):
                raise
            if project_id not in self._no_catalog:
                self._no_catalog.add(project_id)
                log.warning(
                    "project %d: cannot read its labels and categories (%s); results name what the "
                    "answers name, categories by id",
                    project_id,
                    exc.failure.message,
                )
            return None

    def _done_rel_path(self, row: Row, result: dict[str, Any]) -> str:
        """Where in done/ the file goes: ``results.layout`` (default: its path in the inbox)."""
        template = self.config.results.layout
        if template == layout.DEFAULT_TEMPLATE:
            return row.rel_fspath
        category = result.get("category")
        name = None
        if category:
            name = category.get("name") or f"category {category.get('id')}"
        return layout.render(
            template, path=row.rel_path, category=name, document_id=row.document_id, uploaded_at=row.uploaded_at
        )

    def _download_pdf(self, row: Row) -> Path:
        """The searchable PDF, downloaded into a new hidden file (a random name) in done/ itself: on
        the file system of the folders below it, so that it is placed by a link; never in a subfolder,
        which may be a planted link. The caller removes it."""
        assert row.document_id is not None
        document_id = row.document_id
        staged = write_temp(self.config.folders.done, lambda out: self.client.write_searchable_pdf(document_id, out))
        self._api_ok()
        return staged

    def _pdf_failed(self, row: Row, failure: Failure) -> Row:
        """A 404 on the searchable PDF of a document the details just showed: not there yet (the
        server makes it after the OCR), never "document gone"; retried like a transient error."""
        if failure.cause == Cause.NOT_FOUND:
            failure = Failure(Cause.TRANSIENT, f"the searchable PDF of document {row.document_id} is not available "
                                               f"yet ({failure.message})", status=failure.status)  # fmt: skip
        self.metrics.fetch_retries.inc()
        return self._handle(row, Step.FETCH, failure, stage="result")

    def _output_failed(self, row: Row, step: Step, folder: Path, exc: OSError) -> Row:
        if is_share_error(exc):
            return self._share_failed(row, step, exc, f"cannot write into {folder}")
        if exc.errno == errno.ENAMETOOLONG and row.state == State.EXPORTING:
            return self.fail(row, f"its path does not fit into {folder} ({exc.strerror})", stage="too_long")
        cause = Cause.DISK_FULL if exc.errno in DISK_FULL_ERRNOS else Cause.LOCAL_IO
        return self._handle(row, step, Failure(cause, f"cannot write into {folder}: {exc.strerror or exc}"))

    def _changed_since_upload(self, row: Row) -> str | None:
        """Is the file in processing/ still the one that was uploaded? Its size, mtime and inode; and if
        its ctime moved (a rewrite that kept the size and put the mtime back, or only a link or chmod),
        or on a mount whose stat cannot tell (``stat_is_blind``), its content against the uploaded
        sha256 (``changes``)."""
        path = self.processing_path(row)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None  # gone, or a share away: placing it proves which (any other error is raised)
        changed = changes.change_since_upload(row, st, same_inode=self._is_claimed_file(st, row) is not False)
        compare = self.stat_is_blind or changes.ctime_moved(row, st)
        if changed is None and compare and changes.content_differs(path, row.sha256):
            changed = "it was rewritten (same size and modification time)"
        return changed

    def _upload_again(self, row: Row, changed: str) -> Row:
        """The result describes what was uploaded, not what the file is now: upload it again as it is.
        A result an earlier try of this export left in done/ goes (it describes the old bytes)."""
        try:
            self._remove_own_result(row)
        except OSError as exc:  # a share does not answer: looked at again (and taken out) once it does
            return self._output_failed(row, Step.EXPORT, self.config.folders.done, exc)
        log.warning("%s: %s after it was uploaded; uploading it again as it is now", row.display_path, changed)
        return self.move(
            row,
            State.CLAIMED,
            next_at=self.clock.now(),
            error=f"{changed} after it was uploaded",
            stage="upload",
            final_path=None,
        )

    def _remove_own_result(self, row: Row) -> None:
        """Take this row's result (and the searchable PDF it names) out of done/, if it is there and ours
        (reached without following a link; a link by those names is removed, never followed)."""
        if row.final_path is None:
            return
        target = Path(os.fsdecode(row.final_path))
        root = self._root_of(target)
        json_path, pdf_path = sidecar_for(target, export.RESULT_SUFFIX), sidecar_for(target, OCR_PDF_SUFFIX)
        found = _read_json(json_path, root)
        if found is None or not export.result_is_for(row, found):
            return
        names = [pdf_path.name] if found.get("searchable_pdf") == pdf_path.name else []
        unlink_below(root, target.parent, [*names, json_path.name])

    def _move_checked(self, row: Row, target: Path, final_state: State) -> str | None:
        """Move the file into place. Into done/: only if it is still the file that was uploaded (the
        export took its time, and its writer may have gone on), and checked again once there; returns
        what changed (then the caller takes it back, ``_take_back``), else None."""
        if final_state != State.DONE:
            self._move_into_place(row, target)
            return None
        changed = self._changed_since_upload(row)
        if changed is None:
            self._move_into_place(row, target)
            changed = self._placed_file_changed(row, target)
        return changed

    def _placed_file_changed(self, row: Row, target: Path) -> str | None:
        """Is the file just placed in done/ the one its result describes? Its ctime is the daemon's own
        now (the link and the unlink): size, mtime and inode tell; a copy (done/ on another file system)
        is compared by content."""
        root = self._root_of(target)
        try:
            st = lstat_below(root, target)
        except OSError as exc:
            if is_share_error(exc):  # looked at again when the placement is tried again
                raise
            return None  # taken out of done/ at once (or its folder replaced): nothing placed to be wrong
        if row.file_ino is not None and not self.folders.inodes_are_stable(self.processing_dir):
            same_inode = st.st_dev == self.folders.device_of(self.processing_dir)  # renamed on FUSE, or a copy
        else:
            same_inode = row.file_ino is not None and self._is_claimed_file(st, row) is True  # unknown: a copy
        changed = changes.placed_change(row, st, same_inode=same_inode)
        if changed is None and not same_inode and changes.content_differs(target, row.sha256, root=root):
            changed = "it was rewritten"
        return changed

    def _take_back(self, row: Row, target: Path, changed: str) -> Row:
        """The file changed while it was placed in done/: back into processing/ (if it got into done/),
        its result out of done/, and uploaded again as it now is. A crash in between: the export runs
        again, finds the file changed again, and ends here or in ``_upload_again``."""
        source = self.processing_path(row)
        try:
            if self.folders.is_absent(source, self.processing_dir):
                move_no_clobber(target, source, src_root=self._root_of(target))
            return self._upload_again(row, changed)
        except OSError as exc:
            return self._output_failed(row, Step.EXPORT, target.parent, exc)

    def _bbox(self, document_id: int) -> dict[str, Any] | None:
        try:
            return self.client.bbox(document_id).get("bbox")
        except ApiError as exc:
            if exc.failure.cause == Cause.NOT_FOUND:
                return None  # the server has no boxes for this document
            raise

    # -- done: a later callback (review, re-extraction) -> the next revision in done/ ------------

    def refresh(self, row: Row) -> Row:
        """Konfuzio called again for a done document: fetch it again and, if its content changed
        (``results.content_fingerprint``), replace the result in done/ with the next revision. The
        original is never touched; a callback for an unchanged document costs one fetch.

        The export stores no fingerprint (encoding the character boxes sorted for it was 1-5 % of the
        daemon's CPU with 32 uploads in flight, for a look few files ever get): the first look takes
        it from the result in done/, which is what revision 1 said (a read-back result has the same
        fingerprint). One that someone edited there counts as changed, and is replaced if it is still
        ours; one taken away is not written again."""
        assert row.state == State.DONE and row.document_id is not None and row.final_path is not None
        checked_at = self.clock.now()
        try:
            details = self.client.document(row.document_id)
            if details.get("id") != row.document_id:
                return self._fetch_failed(
                    row,
                    Failure(Cause.TRANSIENT, f"details of document {details.get('id')} returned for {row.document_id}"),
                )
            status = details.get("status_data")
            if status != export.STATUS_DONE:
                return self._refresh_later(row, checked_at, status)
            if self.config.results.require_review and not details.get("is_reviewed"):
                log.info(
                    "%s: document %d is no longer marked reviewed; done/ keeps revision %d",
                    row.display_path,
                    row.document_id,
                    row.revision,
                )
                return self.journal.finish_refresh(row, checked_at, self.clock.now())
            result = self._build_result(row, details, revision=row.revision + 1)
        except ApiError as exc:
            return self._fetch_failed(row, exc.failure)
        self._api_ok()
        try:
            stored = row.fingerprint if row.fingerprint is not None else self._fingerprint_in_done(row)
            if results.fingerprint_matches(result, stored):
                log.debug(
                    "%s: document %d unchanged; done/ keeps revision %d",
                    row.display_path,
                    row.document_id,
                    row.revision,
                )
                return self.journal.finish_refresh(row, checked_at, self.clock.now())
            return self._replace_result(row, result, results.content_fingerprint(result), checked_at)
        except OSError as exc:  # looking at the result in done/: a share that does not answer says nothing
            return self._output_failed(row, Step.EXPORT, self._root_of(Path(os.fsdecode(row.final_path))), exc)

    def _fingerprint_in_done(self, row: Row) -> str | None:
        """The fingerprint of the result in done/ if it is there and ours; else None."""
        target = Path(os.fsdecode(row.final_path or b""))
        existing = _read_json(sidecar_for(target, export.RESULT_SUFFIX), self._root_of(target))
        if existing is None or not export.result_is_for(row, existing):
            return None
        return results.content_fingerprint(existing)

    def _refresh_later(self, row: Row, checked_at: float, status: Any) -> Row:
        now = self.clock.now()
        if status == export.STATUS_FAILED or status not in export.STATUS_NAMES:
            log.warning(
                "%s: document %d is %s on the server now; done/ keeps revision %d",
                row.display_path,
                row.document_id,
                export.STATUS_NAMES.get(status, f"in status {status}"),
                row.revision,
            )
            return self.journal.finish_refresh(row, checked_at, now)
        # Processed again (a re-extraction): it calls back when it is done; look again meanwhile.
        r = self.config.results
        wait = max(r.poll_interval, r.callback_timeout) if status in PERSON_STAGES else r.poll_interval
        return self.journal.update(row, now, refresh_at=now + wait)

    def _replace_result(self, row: Row, result: dict[str, Any], fingerprint: str, checked_at: float) -> Row:
        """Write the new revision over our own result (temp + fsync + rename; only a file that is
        ours, never the original), the searchable PDF first; then record it. A crash in between
        writes it again. A result someone took out of done/ is not written again."""
        target = Path(os.fsdecode(row.final_path or b""))
        folder, root = target.parent, self._root_of(target)
        json_path, pdf_path = sidecar_for(target, export.RESULT_SUFFIX), sidecar_for(target, OCR_PDF_SUFFIX)
        existing = _read_json(json_path, root)
        if existing is None and self.folders.is_absent_below(root, json_path):  # taken away: not brought back alone
            log.info(
                "%s: %s is no longer there; revision %d of document %d not written",
                row.display_path,
                json_path,
                row.revision + 1,
                row.document_id,
            )
            return self.journal.finish_refresh(row, checked_at, self.clock.now())
        if existing is None or not export.result_is_for(row, existing):
            log.warning(
                "%s: %s is not konfuzio-watch's result of this file; revision %d of document %d not written",
                row.display_path,
                json_path,
                row.revision + 1,
                row.document_id,
            )
            return self.journal.finish_refresh(row, checked_at, self.clock.now())
        pdf_name = existing.get("searchable_pdf")
        ours = pdf_name == pdf_path.name
        staging = None
        try:
            if self.wants_pdf and (ours or self.folders.is_absent_below(root, pdf_path)):
                try:
                    staging = self._download_pdf(row)
                except ApiError as exc:
                    return self._pdf_failed(row, exc.failure)
                if ours:  # the name is replaced; a link someone put there is never followed
                    replace_file(staging, pdf_path, root=root, sync_dir=True)
                else:
                    move_no_clobber(staging, pdf_path, src_root=root, dst_root=root)
                pdf_name = pdf_path.name
            elif self.wants_pdf and not ours:
                log.warning(
                    "%s: %s is not konfuzio-watch's; the searchable PDF of revision %d is not written",
                    row.display_path,
                    pdf_path,
                    row.revision + 1,
                )
            write_json_no_clobber(
                json_path,
                _with_pdf_name(result, pdf_name if ours or staging else None),
                lambda found: export.result_is_for(row, found),
                root=root,
            )
        except FileExistsError:  # someone else's file took a name between our look and our write
            log.warning(
                "%s: a file not written by konfuzio-watch took the place of its result; revision %d of "
                "document %d not written",
                row.display_path,
                row.revision + 1,
                row.document_id,
            )
            return self.journal.finish_refresh(row, checked_at, self.clock.now())
        except OSError as exc:
            return self._output_failed(row, Step.EXPORT, folder, exc)
        finally:
            if staging is not None:
                _unlink_quietly(staging)
        self.gates[Scope.OUTPUT].open(self.clock.now())
        new = self.journal.finish_refresh(
            row, checked_at, self.clock.now(), revision=row.revision + 1, fingerprint=fingerprint
        )
        log.info(
            "%s: document %d changed on the server%s; %s is revision %d",
            row.display_path,
            row.document_id,
            " (reviewed)" if (result.get("konfuzio") or {}).get("is_reviewed") else "",
            export_display(os.fsencode(json_path), self.config.folders.done),
            new.revision,
        )
        return new

    # -- failing: .error.json next to the file in failed/ -----------------------------------------

    def finish_failed(self, row: Row) -> Row:
        report = export.build_error(row, self.clock.now())
        return self._place(
            row,
            self.config.folders.failed,
            export.ERROR_SUFFIX,
            report,
            lambda existing: export.error_is_for(row, existing),
            State.FAILED,
            Step.FAIL,
        )

    def _place(
        self,
        row: Row,
        folder: Path,
        suffix: str,
        sidecar: dict[str, Any],
        is_ours: Callable[[dict], bool],
        final_state: State,
        step: Step,
        **done: Any,
    ) -> Row:
        """Write the sidecar JSON, then move the file next to it; both never overwrite."""
        # One lock per target folder and path (case-folded, for a share that ignores case). Failing
        # a file while placing it in done/ places its report in failed/: the only nesting, always in
        # this order, so two workers never wait for each other's lock.
        with self._placing.hold((str(folder), str(done.get("rel_path") or row.rel_fspath).casefold())):
            return self._place_locked(row, folder, suffix, sidecar, is_ours, final_state, step, **done)

    def _place_locked(self, row: Row, folder: Path, suffix: str, sidecar: dict[str, Any],
                      is_ours: Callable[[dict], bool], final_state: State, step: Step, *,
                      rel_path: str | None = None, pdf: Path | None = None, done_fields: dict[str, Any] | None = None,
                      checked_at: float | None = None) -> Row:  # fmt: skip
        """``rel_path``: where in ``folder`` (default: the inbox's path); ``pdf``: a downloaded searchable
        PDF to place next to it first; ``done_fields``: recorded with the final move."""
        source = self.processing_path(row)
        suffixes = (suffix, OCR_PDF_SUFFIX) if pdf is not None else (suffix,)
        if final_state == State.DONE:
            sidecar = _with_pdf_name(sidecar, None)
        for _ in range(5):
            try:
                self.folders.check(folder)  # there, on the file system it was on: never a bare mountpoint
                if row.final_path is None or not Path(os.fsdecode(row.final_path)).is_relative_to(folder):
                    target = self._free_target(folder, row, suffixes, rel_path)
                    row = self.journal.update(row, self.clock.now(), final_path=os.fsencode(target))
                target = Path(os.fsdecode(row.final_path))
                # Gone only if proven: ENOENT from folders that answer as themselves (``shares``).
                gone = self.folders.is_absent(source, self.processing_dir) and self.folders.is_absent_below(
                    folder, target
                )
            except OSError as exc:
                return self._placing_failed(row, step, folder, exc, final_state, sidecar, checked_at)
            if gone and final_state == State.DONE:  # never report done what is not there
                return self.fail(
                    row,
                    f"the file vanished from {self.processing_dir} before it was placed in "
                    f"{folder}; its result was not kept (document {row.document_id})",
                    stage="vanished",
                )
            placed_pdf = None
            try:
                if pdf is not None:  # first: the JSON says where it is, and the original comes last
                    pdf_path = sidecar_for(target, OCR_PDF_SUFFIX)
                    if self._place_pdf(pdf, pdf_path, sidecar_for(target, suffix), is_ours, folder):
                        placed_pdf = pdf_path
                    sidecar = _with_pdf_name(sidecar, pdf_path.name)
                # The JSON's name is made durable by the one fsync of the folder that the move of the
                # file next to it makes before the source goes (``_move_into_place``).
                write_json_no_clobber(sidecar_for(target, suffix), sidecar, is_ours, root=folder, sync_dir=gone)
                changed = None if gone else self._move_checked(row, target, final_state)
            except FileExistsError as exc:
                if placed_pdf is not None:  # ours, placed a moment ago: it goes with us to the next name
                    replace_file(placed_pdf, pdf, root=folder)  # type: ignore[arg-type]
                if isinstance(exc, FolderInTheWay):
                    log.warning(
                        "%s: %s is %s; the file goes elsewhere in %s",
                        row.display_path,
                        exc.filename,
                        exc.strerror,
                        folder,
                    )
                row = self.journal.update(row, self.clock.now(), final_path=None)
                continue  # someone else's file took the name: pick another
            except OSError as exc:
                return self._placing_failed(row, step, folder, exc, final_state, sidecar, checked_at)
            if changed:
                return self._take_back(row, target, changed)
            self.gates[Scope.OUTPUT].open(self.clock.now())
            # ``done`` is not durable when it returns: the result and the file are durable in done/
            # before it is committed, and nothing outside acts on it; lost in a power failure, the row
            # is ``exporting`` with its durable final_path, and the export runs again: the JSON (ours)
            # is rewritten, the file is found in place (a name of it left in processing/ is unlinked).
            # ``failed`` stays durable (its notification goes out at once). A callback that came in
            # after the details were fetched (``checked_at``: a review may have beaten the export)
            # makes the done row due for a second look, in the same transaction (then durable).
            armed = {"refresh_if_called_back_since": checked_at} if final_state == State.DONE else {}
            return self.move(
                row, final_state, durable=final_state != State.DONE, next_at=None, **armed, **(done_fields or {})
            )
        raise RuntimeError(f"{row.display_path}: no free name in {folder}")

    def _placing_failed(
        self,
        row: Row,
        step: Step,
        folder: Path,
        exc: OSError,
        final_state: State,
        sidecar: dict[str, Any],
        checked_at: float | None,
    ) -> Row:
        """A placement that failed: a share that does not answer pauses (a result is kept until it can
        be placed); a path too long fails the file; a full disk blocks done/ and failed/; any other
        error is retried with backoff."""
        if is_share_error(exc):
            if final_state == State.DONE:
                self._keep_result(row, sidecar, checked_at)
            return self._share_failed(row, step, exc, f"cannot write into {folder}")
        if exc.errno == errno.ENAMETOOLONG and final_state == State.DONE:
            return self.fail(row, f"its path does not fit into {folder} ({exc.strerror})", stage="too_long")
        cause = Cause.DISK_FULL if exc.errno in DISK_FULL_ERRNOS else Cause.LOCAL_IO
        return self._handle(row, step, Failure(cause, f"cannot write into {folder}: {exc.strerror or exc}"))

    def _place_pdf(
        self, staged: Path, target: Path, json_path: Path, is_ours: Callable[[dict], bool], root: Path
    ) -> bool:
        """Give the downloaded PDF its name next to the file, never replacing another file; True if
        it was moved there. A PDF already there is ours if it has the same bytes, or if the JSON next
        to it is ours (an earlier try of this export got that far); else ``FileExistsError``."""
        try:
            move_no_clobber(staged, target, src_root=root, dst_root=root)
            return True
        except FolderInTheWay:
            raise
        except FileExistsError:
            if _has_content(target, _sha256_of(staged), root):
                return False
            existing = _read_json(json_path, root)
            if existing is None or not is_ours(existing):
                raise
        replace_file(staged, target, root=root, sync_dir=True)
        return True

    def _free_target(self, folder: Path, row: Row, suffixes: tuple[str, ...], rel_path: str | None = None) -> Path:
        """``folder/<its path>`` (or ``name (2).pdf``), free for the file and each of its sidecars; in
        failed/, a path too long for the file system becomes a short unique name (the error report
        keeps the whole path). A folder on the path that is a symbolic link (or a file) is gone
        around (``sub (2)/``), never followed, and the log says so."""
        wanted = rel_path or row.rel_fspath
        target = free_target(folder, wanted, suffixes)
        self._say_if_gone_around(row, folder, Path(wanted), target)
        suffix = suffixes[0]
        if folder == self.config.folders.failed and (
            row.stage == "too_long" or not fits_path_max(sidecar_for(target, suffix))
        ):
            target = free_target(folder, shortened_name(row.rel_path, suffix), suffixes)
        return target

    @staticmethod
    def _say_if_gone_around(row: Row, folder: Path, wanted: Path, target: Path) -> None:
        chosen = target.relative_to(folder).parts
        for index, part in enumerate(wanted.parts[:-1]):
            if chosen[index] != part:
                log.warning(
                    "%s: %s is not a folder (a symbolic link, or a file); not followed: the file goes into %s",
                    row.display_path,
                    folder.joinpath(*wanted.parts[: index + 1]),
                    target.parent,
                )
                return

    def _move_into_place(self, row: Row, target: Path) -> None:
        """Move the file from processing/ to ``target`` (no link below done/ or failed/ followed); the
        target's folder (which holds its JSON, written just before) is fsynced before the source is
        unlinked."""
        root = self._root_of(target)
        source = self.processing_path(row)
        if self.folders.is_absent(source, self.processing_dir):
            fsync_dir(target.parent, root=root)  # moved before a crash (the caller checked that one of the two exists)
            return
        try:
            found: os.stat_result | None = lstat_below(root, target)
        except (FileNotFoundError, NotADirectoryError, FolderInTheWay):
            found = None  # (any other error, a share's, is the placement's)
        linked = found is not None and _same_stat(found, source)
        if found is not None and (linked or _has_content(target, row.sha256, root)):
            fsync_dir(target.parent, root=root)  # moved before a crash that came before the source was unlinked
            os.unlink(source)
            if not linked:
                fsync_dir(source.parent)
            return
        # The unlink from processing/ is not fsynced when the move was a hard link: a power failure may
        # bring that name back, a second name of the file now in done/ (or failed/), which start-up
        # recognises by its inode and removes (``_drop_leftover_names``), never adopts.
        move_no_clobber(source, target, src_root=self.processing_dir, dst_root=root, sync_unlink=False)

    def _root_of(self, path: Path) -> Path:
        """The output folder ``path`` is in (nothing below it is followed), else its own folder."""
        for folder in (self.config.folders.done, self.config.folders.failed):
            if path.is_relative_to(folder):
                return folder
        return path.parent


class KeyedLocks:
    """A re-entrant lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Any, list[Any]] = {}  # key -> [RLock, holders and waiters]

    @contextmanager
    def hold(self, key: Any) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.RLock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]


class _Invalid(Exception):
    """The file cannot be processed as it is (empty, too big)."""


class ClaimsPaused(Exception):
    """A share did not answer while a batch was claimed: ``left`` (paths relative to the inbox) were not
    taken; the shares' gate is blocked, and they are claimed once it opens."""

    def __init__(self, left: list[bytes]):
        super().__init__(f"{len(left)} file(s) not claimed: a share does not answer")
        self.left = left


def _error_text(exc: OSError, doing: str = "") -> str:
    """``Input/output error``, with the folder a folder's error is about if ``doing`` does not name it."""
    text = exc.strerror or str(exc)
    named = isinstance(exc, ShareUnavailable) and exc.filename and str(exc.filename) not in doing
    return f"{text} ({exc.filename})" if named else text


def duplicate_message(earlier: Row, done: Path) -> str:
    where = (
        f"its result is {export_display(earlier.final_path, done)}.json"
        if earlier.final_path
        else f"it is {earlier.state.value}"
    )
    return (
        f"duplicate: the same content (sha256 {earlier.sha256}) was already sent as {earlier.display_path} "
        f"(document {earlier.document_id}); {where}"
    )


def _created_before(page: list[dict[str, Any]], limit: float) -> bool:
    """Is the oldest document of a (newest-first) page older than ``limit``? An unreadable date
    proves nothing."""
    if not page:
        return True
    oldest = page[-1].get("created_at")
    try:
        return dt.datetime.fromisoformat(str(oldest).replace("Z", "+00:00")).timestamp() < limit
    except ValueError:
        return False


def _with_pdf_name(result: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The result with ``searchable_pdf`` (the PDF's file name next to it, or None) after ``web_url``."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if key != "searchable_pdf":
            out[key] = value
        if key == "web_url":
            out["searchable_pdf"] = name
    out.setdefault("searchable_pdf", name)
    return out


def _read_json(path: Path, root: Path) -> dict[str, Any] | None:
    """A JSON object from a regular file below ``root`` (no link followed), or None (missing,
    unreadable, not an object)."""
    try:
        fd, _ = open_regular_file(path, root=root)
        with os.fdopen(fd, "rb") as f:
            found = json.loads(f.read())
    except OSError as exc:
        if is_share_error(exc):  # not an answer about the file
            raise
        return None
    except (ValueError, NotRegularFile):
        return None
    return found if isinstance(found, dict) else None


def _sha256_of(path: Path) -> str | None:
    """The content's sha256 of a regular file (no link followed), or None. A share's error is raised."""
    try:
        fd, _ = open_regular_file(path)
    except OSError as exc:
        if is_share_error(exc):
            raise
        return None
    except NotRegularFile:
        return None
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror or exc)


def _same_file(a: Path, b: Path) -> bool:
    """Are ``a`` and ``b`` (not followed) one file? A share's error is raised, never taken for "no"."""
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError as exc:
        if is_share_error(exc):
            raise
        return False


def _same_stat(found: os.stat_result, path: Path) -> bool:
    """Is ``path`` (not followed) the file ``found`` describes?"""
    try:
        return os.path.samestat(found, os.lstat(path))
    except OSError:
        return False


def _has_content(path: Path, sha256: str | None, root: Path) -> bool:
    """Is ``path`` (below ``root``, no link followed) a regular file with exactly this content (a
    cross-device copy of ours)?"""
    if sha256 is None:
        return False
    try:
        fd, _ = open_regular_file(path, root=root)
    except OSError as exc:
        if is_share_error(exc):  # not an answer about the file
            raise
        return False
    except NotRegularFile:
        return False
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest() == sha256


def export_display(final_path: bytes, done: Path) -> str:
    try:
        return display_name(os.fsencode(Path(os.fsdecode(final_path)).relative_to(done.parent)))
    except ValueError:
        return display_name(final_path)


def _clock_time(at: float) -> str:
    return dt.datetime.fromtimestamp(at).astimezone().strftime("%H:%M:%S %Z")


def _looking_until(at: float) -> str:
    """The stage of an upload the server may still be storing, as ``status`` shows it."""
    return f"the server may still be storing it: looking for it until {_clock_time(at)}, then uploaded again"
