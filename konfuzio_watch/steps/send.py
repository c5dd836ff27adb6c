"""uploading -> uploaded: the upload's POST, streamed from the open file ``upload`` hands over.

An answer with a document id moves the row to ``uploaded``. An error that the server may have
received the file despite (a timeout, a reset, a 5xx) keeps it ``uploading``: it is looked for on
the server (``reconcile``) before any new upload. Any other error sends it back to ``claimed``.
"""

from __future__ import annotations

import logging
from typing import BinaryIO

from .. import policy
from ..journal import Row, State
from ..konfuzio import ApiError, UploadForm
from ..policy import Cause, Failure, Step
from ..shares import caused_by_share_error
from ..states import Stage
from .context import Context, Outcome, looking_until
from .reconcile import delete_extras

log = logging.getLogger("konfuzio_watch")


def send(ctx: Context, row: Row, *, file: BinaryIO, name: str, form: UploadForm) -> Outcome:
    with file:
        file.seek(0)
        try:
            details = ctx.client.upload(file, name, form)
            document_id = int(details["id"])
        except ApiError as exc:
            failure = exc.failure
            if caused_by_share_error(exc):  # the file's share failed while it was sent (the server may hold
                failure = Failure(
                    Cause.SHARE_UNAVAILABLE,  # a part of it: it is looked for before a new upload)
                    f"cannot read the file while sending it: {failure.message}",
                    maybe_received=True,
                )
            return _upload_failed(ctx, row, failure)
        except (KeyError, TypeError, ValueError) as exc:
            failure = Failure(Cause.TRANSIENT, f"unexpected upload response: {exc!r}", maybe_received=True)
            return _upload_failed(ctx, row, failure)
    ctx.api_ok()
    ctx.metrics.uploads.inc()
    now = ctx.clock.now()
    # Not durable when it returns: nothing outside acts on it before a durable write (the export's
    # final_path) covers it; lost in a power failure, the row is ``uploading`` again and is
    # reconciled by its token (already journaled) before any new upload: never uploaded twice.
    new = ctx.journal.mark_uploaded(row, document_id, now, poll_at=now + _first_poll_delay(ctx), durable=False)
    ctx.log_transition(row, new)
    if row.document_id is not None:  # uploaded again after it changed
        _delete_superseded(ctx, new, row.document_id)
    return new


def _first_poll_delay(ctx: Context) -> float:
    r = ctx.config.results
    return r.callback_timeout if ctx.expect_callbacks else r.first_poll_seconds


def _upload_failed(ctx: Context, row: Row, failure: Failure) -> Outcome:
    ctx.metrics.upload_retries.inc()
    # If the server may hold it, the row stays ``uploading`` and is reconciled (looked up by
    # its token) before any new upload; otherwise it goes back to ``claimed``.
    if not failure.maybe_received:
        return ctx.handle(row, Step.UPLOAD, failure, back_to=State.CLAIMED, stage=Stage.UPLOAD)
    now = ctx.clock.now()
    new = ctx.handle(row, Step.UPLOAD, failure, stage=Stage.UPLOAD, ambiguous_since=now)
    if (
        isinstance(new, Row) and new.state == State.UPLOADING
    ):  # (a crash before this write: the window, as for a timeout)
        window_s = ctx.config.reconcile_window_s
        answered = not policy.reconcile_window_s(failure, window_s)
        stage = Stage.ANSWERED if answered else looking_until(policy.upload_again_at(now, new.next_at or now, window_s))
        new = ctx.journal.update(new, now, stage=stage)
    return new


def _delete_superseded(ctx: Context, row: Row, document_id: int) -> None:
    """The document of the file's bytes before they changed goes, once the new one is stored: one
    document per file. (An UPLOADING row still names it: only a changed file's row goes back from
    exporting to be uploaded again; ``reconcile`` never takes it for the new upload's.)"""
    if ctx.journal.record_extra(document_id, row, row.project_id or ctx.config.konfuzio.project_id, ctx.clock.now()):
        log.info("%s: deleting document %d, the result of its bytes before they changed", row.display_path, document_id)
    delete_extras(ctx)
