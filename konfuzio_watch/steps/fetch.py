"""uploaded -> exporting: confirm the outcome with the API (after a callback, or by polling). A
document done is handed to ``export`` at once with its details; one still processing is looked at
again later; one waiting for a person (a review, a split to confirm) is looked at rarely."""

from __future__ import annotations

import logging

from .. import export, results
from ..journal import Row, State
from ..konfuzio import ApiError
from ..policy import Scope
from ..states import PERSON_STAGES, Stage
from . import documents
from .context import Context, Outcome, Then

log = logging.getLogger("konfuzio_watch")


def fetch(ctx: Context, row: Row) -> Outcome:
    assert row.document_id is not None
    checked_at = ctx.clock.now()
    try:
        details = ctx.client.document(row.document_id)
    except ApiError as exc:
        return documents.fetch_failed(ctx, row, exc.failure)
    wrong = documents.wrong_document(row, details)
    if wrong is not None:
        return documents.fetch_failed(ctx, row, wrong)
    ctx.api_ok()
    status = details.get("status_data")
    if status == export.STATUS_DONE:
        if row.callback_at is None and ctx.expect_callbacks and Stage.of(row.stage) is not Stage.REVIEW:
            _callback_missing(ctx, row)  # (once per file, not at each look while it waits for review)
        if ctx.config.results.require_review and not details.get("is_reviewed"):
            return _wait_for_person(ctx, row, checked_at, Stage.REVIEW)
        # Not durable: the export's first write into done/ waits for its durable final_path, which
        # covers this; lost in a power failure, the row is ``uploaded`` and is looked at again.
        row = ctx.move(row, State.EXPORTING, durable=False, stage=Stage.EXPORT, next_at=ctx.clock.now(), failures=0)
        return Then(row, {"details": details, "checked_at": checked_at})
    if status == export.STATUS_FAILED:
        return ctx.fail(row, "Konfuzio could not process the document (status 111)", stage=Stage.PROCESSING)
    if status in PERSON_STAGES:
        return _wait_for_person(ctx, row, checked_at, PERSON_STAGES[status])
    name = export.STATUS_NAMES.get(status, f"status {status}")
    now = ctx.clock.now()
    return ctx.journal.schedule_poll(row, checked_at, now, now + _poll_delay(ctx, row, now), stage=name)


def _poll_delay(ctx: Context, row: Row, now: float) -> float:
    """With callbacks: every ``results.poll_interval``. Poll-only: as long as the document has
    been processing so far, doubling from ``first_poll_seconds`` up to ``poll_interval``: a document
    done soon is in done/ a few seconds later, one that takes an hour costs few requests."""
    r = ctx.config.results
    if ctx.expect_callbacks:
        return r.poll_interval
    return min(r.poll_interval, max(r.first_poll_seconds, now - (row.uploaded_at or now)))


def _callback_missing(ctx: Context, row: Row) -> None:
    """A result found done by polling whose callback never came, although it had time to
    (uploaded by this run: after a restart, callbacks sent while we were down are lost)."""
    now = ctx.clock.now()
    if (
        row.uploaded_at is None
        or row.uploaded_at < ctx.started_at
        or now - row.uploaded_at < ctx.config.results.callback_timeout
    ):
        return
    journal = ctx.gates[Scope.JOURNAL]
    if journal.is_blocked or journal.opened_at >= row.uploaded_at:
        return  # its callback came while the journal could not be written: refused, not missing
    # The verdict turned to no: the daemon says so, and has results polled soon from now on.
    if ctx.callback_watch is not None and ctx.callback_watch.found_by_polling() and ctx.on_callbacks_missing:
        ctx.on_callbacks_missing(ctx.callback_base().rstrip("/"))


def _wait_for_person(ctx: Context, row: Row, checked_at: float, stage: Stage) -> Row:
    """Done by the machine, waiting for a person in Konfuzio (a review, a split to confirm). The
    server calls back when it is done; until then it is looked at every ``callback_timeout``
    (a lost callback), not every ``poll_interval``: a person may take days. Poll-only mode
    (no callbacks) looks every ``poll_interval``."""
    if Stage.of(row.stage) is not stage:
        log.info("%s: %s (document %d: %s)", row.display_path, stage, row.document_id, web_url(ctx, row))
    now = ctx.clock.now()
    r = ctx.config.results
    wait = max(r.poll_interval, r.callback_timeout) if ctx.expect_callbacks else r.poll_interval
    return ctx.journal.schedule_poll(row, checked_at, now, now + wait, stage=stage)


def web_url(ctx: Context, row: Row) -> str | None:
    """The document in the Konfuzio web app (for logs and ``status``)."""
    return None if row.document_id is None else results.web_url(ctx.config.konfuzio.host, row.document_id)
