"""claimed -> uploading: validate the claimed file, and record the upload (its callback token's
hash) before anything is sent, so that a crash can always be reconciled. The POST is the next
state's step (``send``), run at once with the open file and the token."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import BinaryIO

from .. import changes, policy, readiness
from ..file_names import safe_upload_name
from ..files import NotRegularFile, open_regular_file
from ..journal import Row
from ..konfuzio import UnsupportedFile, UploadForm, sniff_file_type
from ..policy import Cause, Failure, Step
from ..shares import ABSENT_ERRNOS, is_share_error
from ..states import Stage
from ..tokens import hash_token, new_token
from .context import Context, Outcome, Then, export_display

log = logging.getLogger("konfuzio_watch")


class Invalid(Exception):
    """The file cannot be processed as it is (empty, too big)."""


def upload(ctx: Context, row: Row) -> Outcome:
    """Validate the claimed file and hand it to ``send``, open: memory does not grow with the file's
    size (hash, type sniff and completeness read it in chunks; the POST streams it)."""
    try:
        fd, st = open_regular_file(ctx.processing_path(row))
    except NotRegularFile as exc:
        return ctx.fail(row, str(exc), stage=Stage.VALIDATE)
    except OSError as exc:
        share_error = ctx.share_error_of(exc, ctx.processing_dir)
        if share_error is not None:  # not the file's fault, and no proof that it is gone
            return ctx.share_failed(row, Step.UPLOAD, share_error, "cannot read the file", stage=Stage.VALIDATE)
        if exc.errno in ABSENT_ERRNOS:
            return ctx.fail(row, "the file disappeared from the processing folder", stage=Stage.VALIDATE)
        failure = Failure(Cause.UNREADABLE, f"cannot read the file: {exc.strerror}")
        return ctx.handle(row, Step.UPLOAD, failure, stage=Stage.VALIDATE)
    f = os.fdopen(fd, "rb")
    out: Outcome | None = None
    try:
        out = _start_upload(ctx, row, f, st)
    finally:
        if not (isinstance(out, Then) and out.carry.get("file") is f):  # ``send`` closes it
            f.close()
    return out


def _start_upload(ctx: Context, row: Row, f: BinaryIO, st: os.stat_result) -> Outcome:
    try:
        sha256 = _validate(ctx, f, st)
    except (UnsupportedFile, Invalid) as exc:
        return ctx.fail(row, str(exc), stage=Stage.VALIDATE)
    except OSError as exc:
        if is_share_error(exc):
            return ctx.share_failed(row, Step.UPLOAD, exc, "cannot read the file", stage=Stage.VALIDATE)
        failure = Failure(Cause.UNREADABLE, f"cannot read the file: {exc.strerror}")
        return ctx.handle(row, Step.UPLOAD, failure, stage=Stage.VALIDATE)
    if policy.attempts_used_up(row.attempts, ctx.limits):
        return ctx.fail(row, row.error or "too many attempts", stage=Stage.UPLOAD)
    if ctx.config.upload.on_duplicate == "fail":
        earlier = ctx.journal.find_same_content(sha256, row.id)
        if earlier is not None:
            row = ctx.journal.update(row, ctx.clock.now(), sha256=sha256, size=st.st_size)
            return ctx.fail(row, duplicate_message(earlier, ctx.config.folders.done), stage=Stage.DUPLICATE)
    token = new_token()
    name = safe_upload_name(os.path.basename(row.rel_path), fallback=f"document-{row.id}")
    project_id, category_id, dataset_status = ctx.config.route_for(row.rel_fspath)
    new = ctx.journal.start_upload(
        row,
        hash_token(token),
        ctx.clock.now(),
        sha256=sha256,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        upload_name=name,
        attempts=row.attempts + 1,
        stage=Stage.UPLOAD,
        project_id=project_id,
        next_at=ctx.clock.now(),
    )
    ctx.log_transition(row, new)
    form = UploadForm(project_id, callback_url(ctx, token), category_id, dataset_status)
    return Then(new, {"file": f, "name": name, "form": form})


def _validate(ctx: Context, f: BinaryIO, st: os.stat_result) -> str:
    """Size cap, type (the SDK's sniffer, on this descriptor), PDF completeness; the sha256,
    computed in chunks."""
    max_mb = ctx.config.upload.max_file_mb
    limit = int(max_mb * 1024 * 1024)
    if st.st_size == 0:
        raise Invalid("empty file (0 bytes)")
    if st.st_size > limit:
        raise Invalid(f"file is {st.st_size / 1048576:.1f} MiB, over upload.max_file_mb ({max_mb:g})")
    sniff_file_type(f.fileno())
    if not readiness.pdf_looks_complete(f.fileno(), st.st_size):
        raise Invalid(
            f"incomplete PDF: it does not end with %%EOF after waiting watch.incomplete_grace_seconds "
            f"({ctx.config.watch.incomplete_grace_seconds:g} s); was the scanner still writing it?"
        )
    f.seek(0)
    digest, size = changes.sha256_of(f)
    if size > limit:
        raise Invalid(f"file grew over upload.max_file_mb ({max_mb:g})")
    if size != st.st_size:
        raise OSError(errno.EAGAIN, "the file changed while it was read")
    return digest


def callback_url(ctx: Context, token: str) -> str:
    if not ctx.config.callback.enabled:
        return ""  # poll-only mode: Konfuzio sends nothing
    return f"{ctx.callback_base().rstrip('/')}/{ctx.config.callback.path.strip('/')}/{token}"


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
