"""Pure: the base of the result JSON next to a done file (``results.build_result`` adds the rest),
and the error JSON next to a failed one."""

from __future__ import annotations

import datetime as dt
from typing import Any

from . import __version__
from .journal import Row

STATUS_DONE = 2
STATUS_FAILED = 111
STATUS_NAMES = {
    0: "queuing for OCR",
    10: "OCR in progress",
    1: "queuing for extraction",
    20: "extraction in progress",
    3: "queuing for categorization",
    30: "categorization in progress",
    4: "queuing for splitting",
    40: "splitting in progress",
    41: "waiting for splitting confirmation",
    2: "done",
    111: "could not be processed",
}
RESULT_SUFFIX = ".json"
ERROR_SUFFIX = ".error.json"


def iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def source_info(row: Row) -> dict[str, Any]:
    return {"path": row.display_path, "sha256": row.sha256, "size": row.size, "uploaded_as": row.upload_name}


def build_result(row: Row, details: dict[str, Any], bbox: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """The exported OCR result: text, pages with their own text, character boxes, provenance."""
    text = details.get("text") or ""
    page_texts = text.split("\f")
    pages = []
    for index, page in enumerate(details.get("pages") or []):
        number = page.get("number", index + 1)
        pages.append(
            {
                "number": number,
                "size": page.get("size"),
                "original_size": page.get("original_size"),
                "text": page_texts[number - 1] if 0 < number <= len(page_texts) else "",
            }
        )
    status = details.get("status_data")
    return {
        "document_id": int(details["id"]),
        "status": STATUS_NAMES.get(status, str(status)),
        "status_data": status,
        "text": text,
        "pages": pages,
        "bbox": bbox,
        "source": source_info(row),
        "konfuzio": details,
        "detected_at": iso(row.detected_at),
        "uploaded_at": iso(row.uploaded_at),
        "exported_at": iso(now),
        "exported_by": f"konfuzio-watch {__version__}",
    }


def result_is_for(row: Row, existing: dict[str, Any]) -> bool:
    """Is an existing JSON an earlier write of this row's result (a crash before the move)?"""
    source = existing.get("source") or {}
    return existing.get("document_id") == row.document_id and source.get("sha256") == row.sha256


def build_error(row: Row, now: float) -> dict[str, Any]:
    return {
        "error": row.error,
        "stage": row.stage,
        "attempts": row.attempts,
        "document_id": row.document_id,
        "source": source_info(row),
        "detected_at": iso(row.detected_at),
        "uploaded_at": iso(row.uploaded_at),
        "failed_at": iso(now),
        "hint": "fix the cause, then: konfuzio-watch retry --config CONFIG PATH",
        "failed_by": f"konfuzio-watch {__version__}",
    }


def error_is_for(row: Row, existing: dict[str, Any]) -> bool:
    source = existing.get("source") or {}
    return existing.get("stage") == row.stage and source.get("path") == row.display_path
