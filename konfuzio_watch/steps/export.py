"""exporting -> done: the result JSON (and the searchable PDF) next to the file in done/, placed
without clobbering anything (``placing``). A file that changed since it was uploaded goes back to
``claimed`` to be uploaded again as it now is (its result describes the old bytes)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import export, layout, placing
from ..files import move_no_clobber
from ..journal import Row, State
from ..konfuzio import ApiError
from ..policy import Scope, Step
from ..shares import is_share_error
from ..states import Stage
from . import documents
from .context import Context, Outcome

log = logging.getLogger("konfuzio_watch")


def export_result(
    ctx: Context, row: Row, details: dict[str, Any] | None = None, checked_at: float | None = None
) -> Outcome:
    assert row.document_id is not None
    kept = ctx.kept.take(row)  # fetched before, while done/ did not answer
    changed = None  # (while a share does not answer: looked at when the file is placed)
    if not ctx.gates[Scope.SHARES].is_blocked:
        try:
            changed = placing.changed_since_upload(ctx, row)
        except OSError as exc:
            if not is_share_error(exc):
                raise
    if changed:
        ctx.kept.drop(row.id)
        return upload_again(ctx, row, changed)
    if kept is not None:
        result, checked_at = kept
    else:
        if checked_at is None or details is None:
            checked_at = ctx.clock.now()
        try:
            if details is None:
                details = ctx.client.document(row.document_id)
            result = documents.build_result(ctx, row, details, revision=1)
        except ApiError as exc:
            return documents.fetch_failed(ctx, row, exc.failure)
        ctx.api_ok()
        if ctx.gates[Scope.SHARES].is_blocked:  # not placed now: kept until the shares answer
            ctx.kept.keep_if_possible(row, result, checked_at)
            return row
    done = ctx.config.folders.done
    staged = None
    if ctx.wants_pdf:
        try:
            ctx.folders.check(done)
            staged = documents.download_pdf(ctx, row)
        except ApiError as exc:
            return documents.pdf_failed(ctx, row, exc.failure)
        except OSError as exc:
            if is_share_error(exc):
                ctx.kept.keep_if_possible(row, result, checked_at)
            return ctx.output_failed(row, Step.EXPORT, done, exc)
    try:
        placed = placing.place(
            ctx,
            row,
            done,
            export.RESULT_SUFFIX,
            result,
            lambda existing: export.result_is_for(row, existing),
            State.DONE,
            Step.EXPORT,
            rel_path=_done_rel_path(ctx, row, result),
            pdf=staged,
            done_fields={"revision": 1},
            checked_at=checked_at,
            take_back=lambda row, target, changed: _take_back(ctx, row, target, changed),
        )
    finally:
        if staged is not None:
            placing.unlink_quietly(staged)
    if kept is not None and (placed.row if not isinstance(placed, Row) else placed).state != State.EXPORTING:
        ctx.kept.drop(row.id)
    return placed


def _done_rel_path(ctx: Context, row: Row, result: dict[str, Any]) -> str:
    """Where in done/ the file goes: ``results.layout`` (default: its path in the inbox)."""
    template = ctx.config.results.layout
    if template == layout.DEFAULT_TEMPLATE:
        return row.rel_fspath
    category = result.get("category")
    name = None
    if category:
        name = category.get("name") or f"category {category.get('id')}"
    return layout.render(
        template, path=row.rel_path, category=name, document_id=row.document_id, uploaded_at=row.uploaded_at
    )


def upload_again(ctx: Context, row: Row, changed: str) -> Outcome:
    """The result describes what was uploaded, not what the file is now: upload it again as it is.
    A result an earlier try of this export left in done/ goes (it describes the old bytes)."""
    try:
        placing.remove_own_result(ctx, row)
    except OSError as exc:  # a share does not answer: looked at again (and taken out) once it does
        return ctx.output_failed(row, Step.EXPORT, ctx.config.folders.done, exc)
    log.warning("%s: %s after it was uploaded; uploading it again as it is now", row.display_path, changed)
    return ctx.move(
        row,
        State.CLAIMED,
        next_at=ctx.clock.now(),
        error=f"{changed} after it was uploaded",
        stage=Stage.UPLOAD,
        final_path=None,
    )


def _take_back(ctx: Context, row: Row, target: Path, changed: str) -> Outcome:
    """The file changed while it was placed in done/: back into processing/ (if it got into done/),
    its result out of done/, and uploaded again as it now is. A crash in between: the export runs
    again, finds the file changed again, and ends here or in ``upload_again``."""
    source = ctx.processing_path(row)
    try:
        if ctx.folders.is_absent(source, ctx.processing_dir):
            move_no_clobber(target, source, src_root=ctx.root_of(target))
        return upload_again(ctx, row, changed)
    except OSError as exc:
        return ctx.output_failed(row, Step.EXPORT, target.parent, exc)
