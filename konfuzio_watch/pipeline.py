"""The life of a file, one step per state. Read top to bottom:

    claiming -> claimed -> uploading -> uploaded -> exporting -> done
                   \\           \\            \\
                    +-----------+------------+---> failing -> failed

Each step takes a journal row, does one irreversible thing at most, and records the new state
before the next one may start. Steps run on worker threads; they never share mutable state
except through the journal.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import export
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
from .journal import Journal, Row, State
from .konfuzio import ApiError, KonfuzioClient, UnsupportedFile, UploadForm, sniff_file_type

log = logging.getLogger("konfuzio_watch")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with jitter: attempt 1 -> ~base, doubling, never above cap."""
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return ceiling * rng.uniform(0.5, 1.0)


class UploadBreaker:
    """When the service is down or throttling, pause *all* uploads (not each file on its own
    clock), backing off while it stays down; the first success closes it again."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random):
        self.base_s, self.cap_s, self.rng = base_s, cap_s, rng
        self.paused_until = 0.0
        self.failures = 0
        self._lock = threading.Lock()

    def trip(self, now: float, retry_after_s: float | None) -> float:
        with self._lock:
            self.failures += 1
            delay = max(backoff_s(self.failures, self.base_s, self.cap_s, self.rng), retry_after_s or 0.0)
            self.paused_until = max(self.paused_until, now + delay)
            return self.paused_until - now

    def reset(self) -> None:
        with self._lock:
            self.failures = 0

    def allowed_in_flight(self, concurrency: int) -> int:
        """While the service is failing, a single upload probes whether it is back."""
        return 1 if self.failures else concurrency


class Pipeline:
    def __init__(self, config: Config, journal: Journal, client: KonfuzioClient,
                 callback_base: Callable[[], str], clock: Callable[[], float] = time.time,
                 on_transition: Callable[[Row, State], None] | None = None):
        self.config = config
        self.journal = journal
        self.client = client
        self.callback_base = callback_base
        self.clock = clock
        self.on_transition = on_transition
        self.rng = random.Random()
        self.breaker = UploadBreaker(config.upload.backoff_base_seconds, config.upload.backoff_cap_seconds, self.rng)
        self.retries = {"upload": 0, "fetch": 0}
        self._fetch_errors: dict[int, int] = {}
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

    # -- transitions ---------------------------------------------------------------------------

    def move(self, row: Row, state: State, **fields: Any) -> Row:
        now = self.clock()
        new = self.journal.update(row.id, now, state=state, **fields)
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
        log.info("%s: %s -> %s%s", new.display_path, old.state, new.state, extra)
        if self.on_transition:
            self.on_transition(new, old.state)

    def retry_later(self, row: Row, error: str, delay_s: float) -> Row:
        log.warning("%s: %s, retrying in %.1f s: %s", row.display_path, row.state, delay_s, error)
        return self.journal.update(row.id, self.clock(), error=error, next_at=self.clock() + delay_s)

    def fail(self, row: Row, error: str, stage: str) -> Row:
        row = self.move(row, State.FAILING, error=error, stage=stage, next_at=self.clock())
        return self.finish_failed(row)

    def _backoff(self, attempt: int) -> float:
        u = self.config.upload
        return backoff_s(attempt, u.backoff_base_seconds, u.backoff_cap_seconds, self.rng)

    # -- claiming: inbox -> processing/ (scheduler thread, in batches) ---------------------------

    def claim(self, rel_paths: list[bytes]) -> list[Row]:
        """Take files out of the inbox: journal first, then move, then confirm - one batch."""
        if not rel_paths:
            return []
        self.config.processing_dir.mkdir(parents=True, exist_ok=True)
        rows = self.journal.add_claims(rel_paths, self.clock())
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
                    self.journal.discard(row.id)
                    continue
                except OSError as exc:  # e.g. a folder the daemon may not write to: leave it be
                    log.error("%s: cannot take it out of the inbox (%s); it stays there and is tried again "
                              "at the next rescan", row.display_path, exc.strerror or exc)
                    self.journal.discard(row.id)
                    continue
                folders.add(source.parent)
            taken.append(row)
        for folder in folders:  # the renames must be durable before the journal says "claimed"
            fsync_dir(folder)
        claimed = self.journal.update_many([r.id for r in taken], self.clock(), state=State.CLAIMED,
                                           next_at=self.clock())
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
            return self.retry_later(row, f"cannot read the file: {exc.strerror}", self._backoff(row.attempts + 1))
        if row.attempts >= self.config.upload.max_attempts:
            return self.fail(row, row.error or "too many attempts", stage="upload")
        sha256 = hashlib.sha256(data).hexdigest()
        if self.config.upload.on_duplicate == "fail":
            earlier = self.journal.find_same_content(sha256, row.id)
            if earlier is not None:
                row = self.journal.update(row.id, self.clock(), sha256=sha256, size=len(data))
                return self.fail(row, duplicate_message(earlier, self.config.folders.done), stage="duplicate")
        token = secrets.token_urlsafe(32)
        name = safe_upload_name(os.path.basename(row.rel_path), fallback=f"document-{row.id}")
        project_id, category_id, dataset_status = self.config.route_for(row.rel_fspath)
        row = self.move(row, State.UPLOADING, token_hash=hash_token(token), sha256=sha256,
                        size=len(data), upload_name=name, attempts=row.attempts + 1, stage="upload",
                        project_id=project_id, next_at=self.clock())
        form = UploadForm(project_id, self.callback_url(token), category_id, dataset_status)
        try:
            details = self.client.upload(data, name, form)
            document_id = int(details["id"])
        except (ApiError, KeyError, TypeError, ValueError) as exc:
            return self._upload_failed(row, exc)
        self.breaker.reset()
        new = self.journal.mark_uploaded(row.id, document_id, self.clock(),
                                         poll_at=self.clock() + self.config.results.callback_timeout)
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

    def _upload_failed(self, row: Row, exc: Exception) -> Row:
        error = exc if isinstance(exc, ApiError) else ApiError(f"unexpected upload response: {exc!r}",
                                                                transient=True, maybe_received=True)
        self.retries["upload"] += 1
        attempts = row.attempts
        if error.outage:  # the service is unavailable: pause every upload ...
            if not error.maybe_received:
                attempts -= 1  # ... and charge the file nothing, unless the server may have it
            delay = self.breaker.trip(self.clock(), error.retry_after_s)
        else:
            delay = max(self._backoff(attempts), error.retry_after_s or 0)
        if error.maybe_received:  # the server may hold it: look before uploading again
            self.journal.update(row.id, self.clock(), attempts=attempts)
            return self.retry_later(row, str(error), delay)
        if not error.transient:
            return self.fail(row, str(error), stage="upload")
        if attempts >= self.config.upload.max_attempts:
            return self.fail(row, f"gave up after {attempts} attempts: {error}", stage="upload")
        row = self.journal.update(row.id, self.clock(), state=State.CLAIMED, error=str(error), attempts=attempts,
                                  next_at=self.clock() + delay)
        if error.outage:
            log.warning("%s: Konfuzio unavailable, uploads paused for %.1f s: %s", row.display_path, delay, error)
        else:
            log.warning("%s: upload failed (attempt %d of %d), retrying in %.1f s: %s", row.display_path,
                        attempts, self.config.upload.max_attempts, delay, error)
        return row

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
            return [self.retry_later(row, f"cannot list documents to reconcile: {exc}",
                                     self._backoff(row.attempts)) for row in rows]
        out = []
        for row in rows:
            if row.id in found:
                new = self.journal.mark_uploaded(row.id, found[row.id], self.clock(), poll_at=self.clock())
                log.info("%s: the server already had it as document %d", row.display_path, found[row.id])
                self._log_transition(row, new)
            elif row.attempts >= self.config.upload.max_attempts:
                new = self.fail(row, f"gave up after {row.attempts} attempts: {row.error}", stage="upload")
            else:
                new = self.move(row, State.CLAIMED, next_at=self.clock())
            out.append(new)
        return out

    # -- uploaded: confirm the outcome with the API (after a callback, or by polling) -----------

    def check_result(self, row: Row) -> Row:
        assert row.document_id is not None
        checked_at = self.clock()
        try:
            details = self.client.document(row.document_id)
        except ApiError as exc:
            return self._fetch_failed(row, exc)
        if details.get("id") != row.document_id:
            return self._fetch_failed(row, ApiError(f"details of document {details.get('id')} returned for "
                                                    f"{row.document_id}", transient=True))
        self._fetch_errors.pop(row.id, None)
        status = details.get("status_data")
        if status == export.STATUS_DONE:
            row = self.move(row, State.EXPORTING, stage="export", next_at=self.clock())
            return self.export(row, details)
        if status == export.STATUS_FAILED:
            return self.fail(row, "Konfuzio could not process the document (status 111)", stage="processing")
        name = export.STATUS_NAMES.get(status, f"status {status}")
        return self.journal.schedule_poll(row.id, checked_at, self.clock(),
                                          self.clock() + self.config.results.poll_interval, stage=name)

    def _fetch_failed(self, row: Row, exc: ApiError) -> Row:
        if exc.status == 404:
            return self.fail(row, f"document {row.document_id} no longer exists on the server", stage="result")
        self.retries["fetch"] += 1
        count = self._fetch_errors[row.id] = self._fetch_errors.get(row.id, 0) + 1
        return self.retry_later(row, str(exc), max(self._backoff(count), exc.retry_after_s or 0))

    # -- exporting: JSON next to the file in done/ ------------------------------------------------

    def export(self, row: Row, details: dict[str, Any] | None = None) -> Row:
        assert row.document_id is not None
        try:
            if details is None:
                details = self.client.document(row.document_id)
            bbox = self._bbox(row.document_id)
        except ApiError as exc:
            return self._fetch_failed(row, exc)
        result = export.build_result(row, details, bbox, self.clock())
        return self._place(row, self.config.folders.done, export.RESULT_SUFFIX, result,
                           lambda existing: export.result_is_for(row, existing), State.DONE)

    def _bbox(self, document_id: int) -> dict[str, Any] | None:
        try:
            return self.client.bbox(document_id).get("bbox")
        except ApiError as exc:
            if exc.transient:
                raise
            return None  # the server has no boxes for this document

    # -- failing: .error.json next to the file in failed/ -----------------------------------------

    def finish_failed(self, row: Row) -> Row:
        report = export.build_error(row, self.clock())
        return self._place(row, self.config.folders.failed, export.ERROR_SUFFIX, report,
                           lambda existing: export.error_is_for(row, existing), State.FAILED)

    def _place(self, row: Row, folder: Path, suffix: str, sidecar: dict[str, Any],
               is_ours: Callable[[dict], bool], final_state: State) -> Row:
        """Write the sidecar JSON, then move the file next to it; both never overwrite."""
        with self._placing:
            return self._place_locked(row, folder, suffix, sidecar, is_ours, final_state)

    def _place_locked(self, row: Row, folder: Path, suffix: str, sidecar: dict[str, Any],
                      is_ours: Callable[[dict], bool], final_state: State) -> Row:
        for _ in range(5):
            if row.final_path is None or not Path(os.fsdecode(row.final_path)).is_relative_to(folder):
                target = free_target(folder, row.rel_fspath, suffix)
                row = self.journal.update(row.id, self.clock(), final_path=os.fsencode(target))
            target = Path(os.fsdecode(row.final_path))
            try:
                write_json_no_clobber(sidecar_for(target, suffix), sidecar, is_ours)
                self._move_into_place(row, target)
            except FileExistsError:
                row = self.journal.update(row.id, self.clock(), final_path=None)
                continue  # someone else's file took the name: pick another
            except _SourceGone:
                log.error("%s: the file vanished from %s; only its %s was written", row.display_path,
                          self.config.processing_dir, suffix)
            except OSError as exc:
                delay = self._backoff(self._fetch_errors.get(row.id, 0) + 1)
                self._fetch_errors[row.id] = self._fetch_errors.get(row.id, 0) + 1
                log.error("%s: cannot write into %s: %s; the file stays safe in %s", row.display_path, folder,
                          exc.strerror or exc, self.config.processing_dir)
                return self.journal.update(row.id, self.clock(), error=f"cannot write into {folder}: "
                                           f"{exc.strerror or exc}", next_at=self.clock() + delay)
            self._fetch_errors.pop(row.id, None)
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


def token_hash_of(callback_url: Any) -> str | None:
    if not isinstance(callback_url, str) or "/" not in callback_url:
        return None
    token = callback_url.rstrip("/").rsplit("/", 1)[-1]
    return hash_token(token) if token else None


def export_display(final_path: bytes, done: Path) -> str:
    from .journal import display_name

    try:
        return display_name(os.fsencode(Path(os.fsdecode(final_path)).relative_to(done.parent)))
    except ValueError:
        return display_name(final_path)
