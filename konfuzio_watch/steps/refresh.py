"""done -> done: a later callback (a review, a re-extraction) -> the next revision in done/.

Konfuzio called again for a done document: fetch it again and, if its content changed
(``fingerprint.content_fingerprint``), replace the result in done/ with the next revision. The original
is never touched; a callback for an unchanged document costs one fetch.

The export stores no fingerprint (encoding the character boxes sorted for it costs a noticeable part
of the daemon's CPU under load, for a look few files ever get): the first look takes it from the
result in done/, which is what revision 1 said (a read-back result has the same fingerprint). One
that someone edited there counts as changed, and is replaced if it is still ours; one taken away is
not written again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .. import export
from ..files import move_no_clobber, replace_file, sidecar_for, write_json_no_clobber
from ..fingerprint import content_fingerprint, fingerprint_matches
from ..journal import Row, State
from ..konfuzio import ApiError
from ..placing import OCR_PDF_SUFFIX, read_json, unlink_quietly, with_pdf_name
from ..policy import Scope, Step
from ..states import PERSON_STAGES
from . import documents
from .context import Context, Outcome, export_display

log = logging.getLogger("konfuzio_watch")


def refresh(ctx: Context, row: Row) -> Outcome:
    assert row.state == State.DONE and row.document_id is not None and row.final_path is not None
    checked_at = ctx.clock.now()
    try:
        details = ctx.client.document(row.document_id)
        wrong = documents.wrong_document(row, details)
        if wrong is not None:
            return documents.fetch_failed(ctx, row, wrong)
        status = details.get("status_data")
        if status != export.STATUS_DONE:
            return _refresh_later(ctx, row, checked_at, status)
        if ctx.config.results.require_review and not details.get("is_reviewed"):
            log.info(
                "%s: document %d is no longer marked reviewed; done/ keeps revision %d",
                row.display_path,
                row.document_id,
                row.revision,
            )
            return ctx.journal.finish_refresh(row, checked_at, ctx.clock.now())
        result = documents.build_result(ctx, row, details, revision=row.revision + 1)
    except ApiError as exc:
        return documents.fetch_failed(ctx, row, exc.failure)
    ctx.api_ok()
    try:
        stored = row.fingerprint if row.fingerprint is not None else _fingerprint_in_done(ctx, row)
        if fingerprint_matches(result, stored):
            log.debug(
                "%s: document %d unchanged; done/ keeps revision %d", row.display_path, row.document_id, row.revision
            )
            return ctx.journal.finish_refresh(row, checked_at, ctx.clock.now())
        return _replace_result(ctx, row, result, content_fingerprint(result), checked_at)
    except OSError as exc:  # looking at the result in done/: a share that does not answer says nothing
        return ctx.output_failed(row, Step.EXPORT, ctx.root_of(Path(os.fsdecode(row.final_path))), exc)


def _fingerprint_in_done(ctx: Context, row: Row) -> str | None:
    """The fingerprint of the result in done/ if it is there and ours; else None."""
    target = Path(os.fsdecode(row.final_path or b""))
    existing = read_json(sidecar_for(target, export.RESULT_SUFFIX), ctx.root_of(target))
    if existing is None or not export.result_is_for(row, existing):
        return None
    return content_fingerprint(existing)


def _refresh_later(ctx: Context, row: Row, checked_at: float, status: Any) -> Row:
    now = ctx.clock.now()
    if status == export.STATUS_FAILED or status not in export.STATUS_NAMES:
        log.warning(
            "%s: document %d is %s on the server now; done/ keeps revision %d",
            row.display_path,
            row.document_id,
            export.STATUS_NAMES.get(status, f"in status {status}"),
            row.revision,
        )
        return ctx.journal.finish_refresh(row, checked_at, now)
    # Processed again (a re-extraction): it calls back when it is done; look again meanwhile.
    r = ctx.config.results
    wait = max(r.poll_interval, r.callback_timeout) if status in PERSON_STAGES else r.poll_interval
    return ctx.journal.update(row, now, refresh_at=now + wait)


def _replace_result(ctx: Context, row: Row, result: dict[str, Any], fingerprint: str, checked_at: float) -> Outcome:
    """Write the new revision over our own result (temp + fsync + rename; only a file that is
    ours, never the original), the searchable PDF first; then record it. A crash in between
    writes it again. A result someone took out of done/ is not written again."""
    target = Path(os.fsdecode(row.final_path or b""))
    folder, root = target.parent, ctx.root_of(target)
    json_path, pdf_path = sidecar_for(target, export.RESULT_SUFFIX), sidecar_for(target, OCR_PDF_SUFFIX)
    next_revision = row.revision + 1
    existing = read_json(json_path, root)
    if existing is None and ctx.folders.is_absent_below(root, json_path):  # taken away: not brought back alone
        log.info(
            "%s: %s is no longer there; revision %d of document %d not written",
            row.display_path,
            json_path,
            next_revision,
            row.document_id,
        )
        return ctx.journal.finish_refresh(row, checked_at, ctx.clock.now())
    if existing is None or not export.result_is_for(row, existing):
        log.warning(
            "%s: %s is not konfuzio-watch's result of this file; revision %d of document %d not written",
            row.display_path,
            json_path,
            next_revision,
            row.document_id,
        )
        return ctx.journal.finish_refresh(row, checked_at, ctx.clock.now())
    pdf_name = existing.get("searchable_pdf")
    ours = pdf_name == pdf_path.name
    staging = None
    try:
        if ctx.wants_pdf and (ours or ctx.folders.is_absent_below(root, pdf_path)):
            try:
                staging = documents.download_pdf(ctx, row)
            except ApiError as exc:
                return documents.pdf_failed(ctx, row, exc.failure)
            if ours:  # the name is replaced; a link someone put there is never followed
                replace_file(staging, pdf_path, root=root, sync_dir=True)
            else:
                move_no_clobber(staging, pdf_path, src_root=root, dst_root=root)
            pdf_name = pdf_path.name
        elif ctx.wants_pdf and not ours:
            log.warning(
                "%s: %s is not konfuzio-watch's; the searchable PDF of revision %d is not written",
                row.display_path,
                pdf_path,
                next_revision,
            )
        body = write_json_no_clobber(
            json_path,
            with_pdf_name(result, pdf_name if ours or staging else None),
            lambda found: export.result_is_for(row, found),
            root=root,
        )
    except FileExistsError:  # someone else's file took a name between our look and our write
        log.warning(
            "%s: a file not written by konfuzio-watch took the place of its result; revision %d of "
            "document %d not written",
            row.display_path,
            next_revision,
            row.document_id,
        )
        return ctx.journal.finish_refresh(row, checked_at, ctx.clock.now())
    except OSError as exc:
        return ctx.output_failed(row, Step.EXPORT, folder, exc)
    finally:
        if staging is not None:
            unlink_quietly(staging)
    ctx.gates[Scope.OUTPUT].open(ctx.clock.now())
    # The deliveries the new revision causes (``delivery.py``), in the same transaction.
    caused = ctx.deliveries.revised(row, json_path, target, body, next_revision) if ctx.deliveries else ()
    new = ctx.journal.finish_refresh(
        row, checked_at, ctx.clock.now(), revision=next_revision, fingerprint=fingerprint, deliveries=caused
    )
    if caused:
        ctx.deliveries.wake()  # type: ignore[union-attr]
    log.info(
        "%s: document %d changed on the server%s; %s is revision %d",
        row.display_path,
        row.document_id,
        " (reviewed)" if (result.get("konfuzio") or {}).get("is_reviewed") else "",
        export_display(os.fsencode(json_path), ctx.config.folders.done),
        new.revision,
    )
    return new
