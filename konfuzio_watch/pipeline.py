"""The life of a file, one step per state (the moves are listed in ``states.py``). Read top to bottom:

    claiming -> claimed -> uploading -> uploaded -> exporting -> done
                   \\           \\            \\
                    +-----------+------------+---> failing -> failed

Each step takes a journal row, does one irreversible thing at most, and records the new state
before the next one may start. When a step fails it classifies the failure and asks the retry
policy (``policy.decide``) what to do; ``_handle`` applies the answer — a retry at a time, a
failed file, or a blocked gate — in one journal transaction with the row's failure count.
Steps run on worker threads; they never share mutable state except through the journal.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import export, policy
from .clock import Clock
from .config import Config
from .files import (
    NotRegularFile,
    free_target,
    fsync_dir,
    move_no_clobber,
    open_regular_file,
    safe_upload_name,
    same_file,
    sidecar_for,
    write_json_no_clobber,
)
from .gates import Gates
from .journal import ACTIVE, Journal, Row, State, display_name
from .konfuzio import ApiError, KonfuzioClient, UnsupportedFile, UploadForm, sniff_file_type
from .metrics import Metrics
from .policy import Blocked, Cause, Fail, Failure, Retry, Scope, Step
from .tokens import hash_token, new_token, token_hash_of

log = logging.getLogger("konfuzio_watch")

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def limits_from(config: Config) -> policy.Limits:
    u = config.upload
    return policy.Limits(base_s=u.backoff_base_seconds, cap_s=u.backoff_cap_seconds, max_attempts=u.max_attempts,
                         max_failures=config.results.max_failures)


class Pipeline:
    def __init__(self, config: Config, journal: Journal, client: KonfuzioClient, *, clock: Clock, gates: Gates,
                 metrics: Metrics, callback_base: Callable[[], str],
                 on_transition: Callable[[Row, State], None] | None = None, rng: random.Random | None = None):
        self.config = config
        self.journal = journal
        self.client = client
        self.clock = clock
        self.gates = gates
        self.metrics = metrics
        self.callback_base = callback_base
        self.on_transition = on_transition
        self.limits = limits_from(config)
        self.rng = rng or random.Random()
        # Choosing a free name in done/ or failed/ and taking it must be one step: two files
        # with the same relative path may be placed by two workers at once.
        self._placing = threading.Lock()

    # -- paths ---------------------------------------------------------------------------------

    def inbox_path(self, row: Row) -> Path:
        return self.config.folders.inbox / row.rel_fspath

    def processing_path(self, row: Row) -> Path:
        return self.config.processing_dir / str(row.id)

    def callback_url(self, token: str) -> str:
        return f"{self.callback_base().rstrip('/')}/{self.config.callback.path.strip('/')}/{token}"

    # -- transitions and failures ----------------------------------------------------------------

    def move(self, row: Row, state: State, **fields: Any) -> Row:
        new = self.journal.transition(row, state, self.clock.now(), **fields)
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
        log.log(level, "%s: %s -> %s%s", new.display_path, old.state, new.state, extra)
        if self.on_transition:
            self.on_transition(new, old.state)

    def _handle(self, row: Row, step: Step, failure: Failure, *, back_to: State | None = None,
                stage: str | None = None) -> Row:
        """Apply the retry policy to one failed step. ``back_to``: the state the row returns to
        when it is to be tried again (default: it stays where it is)."""
        now = self.clock.now()
        decision = policy.decide(step, failure, row.failures, now, self.limits, attempts=row.attempts,
                                 jitter=self.rng.uniform(0.5, 1.0))
        if isinstance(decision, Fail):
            return self.fail(row, decision.reason, stage=stage or step.value)
        if isinstance(decision, Blocked):
            self.gates[decision.scope].block(now, decision.reason, decision.retry_after_s, decision.note)
            fields: dict[str, Any] = {"error": failure.message, "next_at": now}  # due once the gate opens
            if row.state == State.UPLOADING and not failure.maybe_received:
                fields["attempts"] = row.attempts - 1  # the server does not have it: the attempt is free
            log.debug("%s: %s waits for the %s gate: %s", row.display_path, step, decision.scope, failure.message)
        else:
            assert isinstance(decision, Retry)
            fields = {"error": failure.message, "next_at": decision.at,
                      "failures": row.failures + (1 if decision.charge else 0)}
            level = logging.WARNING if failure.message != row.error else logging.DEBUG  # once per change
            log.log(level, "%s: %s failed (failure %d), next try in %.1f s: %s", row.display_path, step,
                    fields["failures"], decision.delay_s, failure.message)
        if back_to is not None and back_to != row.state:
            fields.setdefault("failures", row.failures)
            return self.journal.transition(row, back_to, now, **fields)
        return self.journal.update(row, now, **fields)

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

    def fail(self, row: Row, error: str, stage: str) -> Row:
        row = self.move(row, State.FAILING, error=error, stage=stage, next_at=self.clock.now())
        return self.finish_failed(row)

    def _api_ok(self) -> None:
        self.gates[Scope.API].open(self.clock.now())

    # -- recovery: finish what a crash (or an unwritable journal) left half done -----------------

    def recover(self) -> int:
        """Journal rows are the truth. Returns the number of unfinished files."""
        claiming = self.journal.rows([State.CLAIMING], limit=10_000_000)
        if claiming:
            self.finish_claims(claiming)
        now = self.clock.now()
        # Callbacks that came while we were down are lost: look at every waiting file once now.
        waiting = self.journal.rows([State.UPLOADED], limit=10_000_000)
        self.journal.update_many(waiting, now, next_at=now)
        r = self.config.results
        longest = max(self.limits.cap_s, r.poll_interval, r.callback_timeout) + 1.0
        clamped = self.journal.clamp_due(now, longest)
        if clamped:
            log.warning("%d file(s) were due more than %.0f s ahead (the clock was set back?); due now",
                        clamped, longest)
        return sum(n for state, n in self.journal.counts().items() if state in ACTIVE)

    # -- claiming: inbox -> processing/ (scheduler thread, in batches) ---------------------------

    def claim(self, rel_paths: list[bytes]) -> list[Row]:
        """Take files out of the inbox: journal first, then move, then confirm - one batch."""
        if not rel_paths:
            return []
        self.config.processing_dir.mkdir(parents=True, exist_ok=True)
        rows = self.journal.add_claims(rel_paths, self.clock.now())
        return self.finish_claims(rows)

    def finish_claims(self, rows: list[Row]) -> list[Row]:
        taken, folders = [], {self.config.processing_dir}
        for row in rows:
            target = self.processing_path(row)
            if not os.path.lexists(target):
                source = self.inbox_path(row)
                try:
                    os.rename(source, target)
                except FileNotFoundError:
                    log.info("%s: vanished from the inbox before it was claimed", row.display_path)
                    self.journal.discard(row)
                    continue
                except OSError as exc:  # e.g. a folder the daemon may not write to: leave it be
                    log.error("%s: cannot take it out of the inbox (%s); it stays there and is tried again "
                              "at the next rescan", row.display_path, exc.strerror or exc)
                    self.journal.discard(row)
                    continue
                folders.add(source.parent)
            taken.append(row)
        for folder in folders:  # the renames must be durable before the journal says "claimed"
            fsync_dir(folder)
        now = self.clock.now()
        claimed = self.journal.transition_many(taken, State.CLAIMED, now, next_at=now)
        for old, new in zip(taken, claimed, strict=True):
            self._log_transition(old, new)
        return claimed

    # -- claimed -> uploading -> uploaded ---------------------------------------------------------

    def upload(self, row: Row) -> Row:
        try:
            data = self.read_claimed(row)
            sniff_file_type(data)
        except (NotRegularFile, UnsupportedFile, _Invalid) as exc:
            return self.fail(row, str(exc), stage="validate")
        except FileNotFoundError:
            return self.fail(row, "the file disappeared from the processing folder", stage="validate")
        except OSError as exc:
            return self._handle(row, Step.UPLOAD, Failure(Cause.UNREADABLE, f"cannot read the file: {exc.strerror}"),
                                stage="validate")
        if row.attempts >= self.config.upload.max_attempts:
            return self.fail(row, row.error or "too many attempts", stage="upload")
        sha256 = hashlib.sha256(data).hexdigest()
        if self.config.upload.on_duplicate == "fail":
            earlier = self.journal.find_same_content(sha256, row.id)
            if earlier is not None:
                row = self.journal.update(row, self.clock.now(), sha256=sha256, size=len(data))
                return self.fail(row, duplicate_message(earlier, self.config.folders.done), stage="duplicate")
        token = new_token()
        name = safe_upload_name(os.path.basename(row.rel_path), fallback=f"document-{row.id}")
        project_id, category_id, dataset_status = self.config.route_for(row.rel_fspath)
        row = self.move(row, State.UPLOADING, token_hash=hash_token(token), sha256=sha256,
                        size=len(data), upload_name=name, attempts=row.attempts + 1, stage="upload",
                        project_id=project_id, next_at=self.clock.now(), failures=row.failures)
        form = UploadForm(project_id, self.callback_url(token), category_id, dataset_status)
        try:
            details = self.client.upload(data, name, form)
            document_id = int(details["id"])
        except ApiError as exc:
            return self._upload_failed(row, exc.failure)
        except (KeyError, TypeError, ValueError) as exc:
            return self._upload_failed(row, Failure(Cause.TRANSIENT, f"unexpected upload response: {exc!r}",
                                                    maybe_received=True))
        self._api_ok()
        self.metrics.uploads.inc()
        now = self.clock.now()
        new = self.journal.mark_uploaded(row, document_id, now, poll_at=now + self.config.results.callback_timeout)
        self._log_transition(row, new)
        return new

    def read_claimed(self, row: Row) -> bytes:
        """Read the claimed file through a descriptor that cannot be a symlink, FIFO or device."""
        fd, st = open_regular_file(self.processing_path(row))
        with os.fdopen(fd, "rb") as f:
            limit = int(self.config.upload.max_file_mb * 1024 * 1024)
            if st.st_size == 0:
                raise _Invalid("empty file (0 bytes)")
            if st.st_size > limit:
                raise _Invalid(f"file is {st.st_size / 1048576:.1f} MiB, over upload.max_file_mb "
                               f"({self.config.upload.max_file_mb:g})")
            data = f.read(limit + 1)
        if not data:
            raise _Invalid("empty file (0 bytes)")
        if len(data) > limit:
            raise _Invalid(f"file grew over upload.max_file_mb ({self.config.upload.max_file_mb:g})")
        return data

    def _upload_failed(self, row: Row, failure: Failure) -> Row:
        self.metrics.upload_retries.inc()
        # If the server may hold it, the row stays ``uploading`` and is reconciled (looked up by
        # its token) before any new upload; otherwise it goes back to ``claimed``.
        back_to = None if failure.maybe_received else State.CLAIMED
        return self._handle(row, Step.UPLOAD, failure, back_to=back_to, stage="upload")

    # -- uploading (after a crash or an ambiguous error): does the server have it? ---------------

    def reconcile(self, rows: list[Row]) -> list[Row]:
        """Find documents the server already holds for these rows (matched by the callback
        token in their callback URL, which no other file can have) before any re-upload."""
        wanted = {row.token_hash: row for row in rows if row.token_hash}
        found: dict[int, int] = {}
        project_ids = {row.project_id or self.config.konfuzio.project_id for row in rows}
        try:
            for project_id in project_ids:
                for doc in self.client.documents(project_id):
                    row = wanted.get(token_hash_of(doc.get("callback_url")))
                    if row is not None and doc.get("id") is not None:
                        found[row.id] = int(doc["id"])
        except ApiError as exc:
            failure = Failure(exc.failure.cause, f"cannot list documents to reconcile: {exc.failure.message}",
                              status=exc.failure.status, retry_after_s=exc.failure.retry_after_s)
            return [self._handle(row, Step.RECONCILE, failure) for row in rows]
        self._api_ok()
        out = []
        for row in rows:
            if row.id in found:
                now = self.clock.now()
                new = self.journal.mark_uploaded(row, found[row.id], now, poll_at=now)
                log.info("%s: the server already had it as document %d", row.display_path, found[row.id])
                self._log_transition(row, new)
            elif row.attempts >= self.config.upload.max_attempts:
                new = self.fail(row, f"gave up after {row.attempts} attempts: {row.error}", stage="upload")
            else:
                new = self.move(row, State.CLAIMED, next_at=self.clock.now(), failures=row.failures, error=row.error)
            out.append(new)
        return out

    # -- uploaded: confirm the outcome with the API (after a callback, or by polling) -----------

    def check_result(self, row: Row) -> Row:
        assert row.document_id is not None
        checked_at = self.clock.now()
        try:
            details = self.client.document(row.document_id)
        except ApiError as exc:
            return self._fetch_failed(row, exc.failure)
        if details.get("id") != row.document_id:
            return self._fetch_failed(row, Failure(Cause.TRANSIENT, f"details of document {details.get('id')} "
                                                                    f"returned for {row.document_id}"))
        self._api_ok()
        status = details.get("status_data")
        if status == export.STATUS_DONE:
            row = self.move(row, State.EXPORTING, stage="export", next_at=self.clock.now(), failures=0)
            return self.export(row, details)
        if status == export.STATUS_FAILED:
            return self.fail(row, "Konfuzio could not process the document (status 111)", stage="processing")
        name = export.STATUS_NAMES.get(status, f"status {status}")
        now = self.clock.now()
        return self.journal.schedule_poll(row, checked_at, now, now + self.config.results.poll_interval, stage=name)

    def _fetch_failed(self, row: Row, failure: Failure) -> Row:
        self.metrics.fetch_retries.inc()
        if failure.cause == Cause.NOT_FOUND:
            failure = Failure(Cause.NOT_FOUND, f"document {row.document_id} no longer exists on the server",
                              status=404)
        return self._handle(row, Step.FETCH, failure, stage="result")

    # -- exporting: JSON next to the file in done/ ------------------------------------------------

    def export(self, row: Row, details: dict[str, Any] | None = None) -> Row:
        assert row.document_id is not None
        try:
            if details is None:
                details = self.client.document(row.document_id)
            bbox = self._bbox(row.document_id)
        except ApiError as exc:
            return self._fetch_failed(row, exc.failure)
        self._api_ok()
        result = export.build_result(row, details, bbox, self.clock.now())
        return self._place(row, self.config.folders.done, export.RESULT_SUFFIX, result,
                           lambda existing: export.result_is_for(row, existing), State.DONE, Step.EXPORT)

    def _bbox(self, document_id: int) -> dict[str, Any] | None:
        try:
            return self.client.bbox(document_id).get("bbox")
        except ApiError as exc:
            if exc.failure.cause == Cause.NOT_FOUND:
                return None  # the server has no boxes for this document
            raise

    # -- failing: .error.json next to the file in failed/ -----------------------------------------

    def finish_failed(self, row: Row) -> Row:
        report = export.build_error(row, self.clock.now())
        return self._place(row, self.config.folders.failed, export.ERROR_SUFFIX, report,
                           lambda existing: export.error_is_for(row, existing), State.FAILED, Step.FAIL)

    def _place(self, row: Row, folder: Path, suffix: str, sidecar: dict[str, Any],
               is_ours: Callable[[dict], bool], final_state: State, step: Step) -> Row:
        """Write the sidecar JSON, then move the file next to it; both never overwrite."""
        with self._placing:
            return self._place_locked(row, folder, suffix, sidecar, is_ours, final_state, step)

    def _place_locked(self, row: Row, folder: Path, suffix: str, sidecar: dict[str, Any],
                      is_ours: Callable[[dict], bool], final_state: State, step: Step) -> Row:
        for _ in range(5):
            if row.final_path is None or not Path(os.fsdecode(row.final_path)).is_relative_to(folder):
                target = free_target(folder, row.rel_fspath, suffix)
                row = self.journal.update(row, self.clock.now(), final_path=os.fsencode(target))
            target = Path(os.fsdecode(row.final_path))
            try:
                write_json_no_clobber(sidecar_for(target, suffix), sidecar, is_ours)
                self._move_into_place(row, target)
            except FileExistsError:
                row = self.journal.update(row, self.clock.now(), final_path=None)
                continue  # someone else's file took the name: pick another
            except _SourceGone:
                log.error("%s: the file vanished from %s; only its %s was written", row.display_path,
                          self.config.processing_dir, suffix)
            except OSError as exc:
                cause = Cause.DISK_FULL if exc.errno in DISK_FULL_ERRNOS else Cause.LOCAL_IO
                failure = Failure(cause, f"cannot write into {folder}: {exc.strerror or exc}")
                return self._handle(row, step, failure)
            self.gates[Scope.OUTPUT].open(self.clock.now())
            return self.move(row, final_state, next_at=None)
        raise RuntimeError(f"{row.display_path}: no free name in {folder}")

    def _move_into_place(self, row: Row, target: Path) -> None:
        source = self.processing_path(row)
        if not os.path.lexists(source):
            if os.path.lexists(target):
                return  # moved before a crash
            raise _SourceGone(str(source))
        if os.path.lexists(target) and (same_file(source, target) or _has_content(target, row.sha256)):
            os.unlink(source)  # moved before a crash that came before the source was unlinked
            return
        move_no_clobber(source, target)


class _SourceGone(Exception):
    """The claimed file was removed from processing/ by someone else."""


class _Invalid(Exception):
    """The file cannot be processed as it is (empty, too big)."""


def duplicate_message(earlier: Row, done: Path) -> str:
    where = f"its result is {export_display(earlier.final_path, done)}.json" if earlier.final_path else \
        f"it is {earlier.state.value}"
    return (f"duplicate: the same content (sha256 {earlier.sha256}) was already sent as {earlier.display_path} "
            f"(document {earlier.document_id}); {where}")


def _has_content(path: Path, sha256: str | None) -> bool:
    """Is ``path`` a regular file with exactly this content (a cross-device copy of ours)?"""
    if sha256 is None:
        return False
    try:
        fd, _ = open_regular_file(path)
    except OSError:
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
