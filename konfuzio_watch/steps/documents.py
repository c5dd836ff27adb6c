"""A document's result, fetched from Konfuzio: shared by ``fetch``, ``export`` and ``refresh``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import extractions, results
from ..files import write_temp
from ..journal import Row
from ..konfuzio import ApiError
from ..policy import Cause, Failure, Step
from ..project_catalog import ProjectCatalog
from ..states import Stage
from .context import Context, Outcome

log = logging.getLogger("konfuzio_watch")


def build_result(ctx: Context, row: Row, details: dict[str, Any], revision: int) -> dict[str, Any]:
    """The result file's content from the details and the further calls it needs (annotations,
    character boxes unless ``results.bbox: false``, the project's catalog); raises ``ApiError``."""
    assert row.document_id is not None
    annotations = ctx.client.annotations(row.document_id)
    catalog = _catalog(ctx, row, details, annotations)
    include_bbox = ctx.config.results.bbox
    bbox = _bbox(ctx, row.document_id) if include_bbox else None
    return results.build_result(
        row,
        details,
        bbox,
        ctx.clock.now(),
        annotations=annotations,
        catalog=catalog,
        host=ctx.config.konfuzio.host,
        revision=revision,
        include_bbox=include_bbox,
    )


def _catalog(ctx: Context, row: Row, details: dict[str, Any], annotations: list[dict]) -> ProjectCatalog | None:
    """The project's names of labels, label sets and categories: cached, fetched again when the
    document refers to an id the cache does not know. A server without these lists (404, 400)
    gives results with the names the answers carry; other errors are retried like any fetch."""
    project = details.get("project")
    project_id = project if isinstance(project, int) else row.project_id or ctx.config.konfuzio.project_id
    references = extractions.references(details, annotations)
    try:
        return ctx.catalogs.catalog_for(project_id, references, ctx.client.project_catalog)
    except ApiError as exc:
        if exc.failure.cause not in (Cause.NOT_FOUND, Cause.INVALID):
            raise
        if project_id not in ctx.no_catalog:
            ctx.no_catalog.add(project_id)
            log.warning(
                "project %d: cannot read its labels and categories (%s); results name what the "
                "answers name, categories by id",
                project_id,
                exc.failure.message,
            )
        return None


def _bbox(ctx: Context, document_id: int) -> dict[str, Any] | None:
    try:
        return ctx.client.bbox(document_id).get("bbox")
    except ApiError as exc:
        if exc.failure.cause == Cause.NOT_FOUND:
            return None  # the server has no boxes for this document
        raise


def download_pdf(ctx: Context, row: Row) -> Path:
    """The searchable PDF, downloaded into a new hidden file (a random name) in done/ itself: on
    the file system of the folders below it, so that it is placed by a link; never in a subfolder,
    which may be a planted link. The caller removes it."""
    assert row.document_id is not None
    document_id = row.document_id
    staged = write_temp(ctx.config.folders.done, lambda out: ctx.client.write_searchable_pdf(document_id, out))
    ctx.api_ok()
    return staged


def fetch_failed(ctx: Context, row: Row, failure: Failure) -> Outcome:
    ctx.metrics.fetch_retries.inc()
    if failure.cause == Cause.NOT_FOUND:
        failure = Failure(Cause.NOT_FOUND, f"document {row.document_id} no longer exists on the server", status=404)
    return ctx.handle(row, Step.FETCH, failure, stage=Stage.RESULT)


def pdf_failed(ctx: Context, row: Row, failure: Failure) -> Outcome:
    """A 404 on the searchable PDF of a document the details just showed: not there yet (the
    server makes it after the OCR), never "document gone"; retried like a transient error."""
    if failure.cause == Cause.NOT_FOUND:
        message = f"the searchable PDF of document {row.document_id} is not available yet ({failure.message})"
        failure = Failure(Cause.TRANSIENT, message, status=failure.status)
    ctx.metrics.fetch_retries.inc()
    return ctx.handle(row, Step.FETCH, failure, stage=Stage.RESULT)


def wrong_document(row: Row, details: dict[str, Any]) -> Failure | None:
    """The details are another document's than the row's (a confused proxy or server): retried."""
    if details.get("id") == row.document_id:
        return None
    return Failure(Cause.TRANSIENT, f"details of document {details.get('id')} returned for {row.document_id}")
