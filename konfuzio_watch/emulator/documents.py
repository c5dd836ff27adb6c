"""The emulator's document table: details in the shape of the real API, and status changes."""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from konfuzio_watch.emulator import content

QUEUING_OCR, OCR_IN_PROGRESS, QUEUING_EXTRACTION, EXTRACTION_IN_PROGRESS = 0, 10, 1, 20
DONE, COULD_NOT_BE_PROCESSED = 2, 111
FINAL_STATUSES = (DONE, COULD_NOT_BE_PROCESSED)
CREATED_BY = "emulator@konfuzio.invalid"
# Keys the list endpoint leaves out of each result.
HEAVY_KEYS = ("text", "pages", "annotation_sets")


@dataclass
class NewDocument:
    """A validated upload, ready to be stored."""

    project: int
    data_file_name: str
    data: bytes
    dataset_status: int = 0
    category: int | None = None
    callback_url: str | None = None
    callback_status_code: int | None = None
    assignee: str | None = None


@dataclass
class StoredDocument:
    details: dict
    text: str
    page_sizes: list[tuple[int, int]]
    sha256: str
    final_status: int
    created_mono: float = field(default_factory=time.monotonic)


def now_iso() -> str:
    """Current time as ISO 8601 with UTC offset, like the real API."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class DocumentStore:
    """Thread-safe table of documents; ids increase from 1. Readers get deep copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._docs: dict[int, StoredDocument] = {}
        self._next_id = 1

    def create(self, new: NewDocument, final_status: int) -> tuple[int, dict]:
        """Store a document in status 0; return its id and a copy of its details."""
        sizes = [content.page_size(new.data)] * content.count_pages(new.data)
        with self._lock:
            doc_id = self._next_id
            self._next_id += 1
            details = _initial_details(doc_id, new, len(sizes))
            self._docs[doc_id] = StoredDocument(
                details=details,
                text=content.ocr_text_for(new.data, new.data_file_name),
                page_sizes=sizes,
                sha256=hashlib.sha256(new.data).hexdigest(),
                final_status=final_status,
            )
            return doc_id, copy.deepcopy(details)

    def advance(self, doc_id: int, status: int) -> dict | None:
        """Move a document to ``status`` (filling text, pages, timings); return a copy of its details."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is None:
                return None
            details = doc.details
            elapsed = round(time.monotonic() - doc.created_mono, 3)
            details["status_data"] = status
            details["updated_at"] = now_iso()
            if status == QUEUING_EXTRACTION:
                details["text"] = doc.text
                details["pages"] = _pages(doc_id, doc.page_sizes)
                details["ocr_time"] = elapsed
            elif status == DONE:
                details["extraction_time"] = round(elapsed - (details["ocr_time"] or 0.0), 3)
                details["categorization_time"] = 0.0
                details["processing_time"] = elapsed
                details["labeling_available"] = True
            elif status == COULD_NOT_BE_PROCESSED:
                details["processing_time"] = elapsed
            return copy.deepcopy(details)

    def final_status(self, doc_id: int) -> int | None:
        with self._lock:
            doc = self._docs.get(doc_id)
            return doc.final_status if doc else None

    def record_callback_status(self, doc_id: int, status_code: int) -> None:
        """The real server keeps the callback target's answer in ``callback_status_code``."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                doc.details["callback_status_code"] = status_code

    def details(self, doc_id: int) -> dict | None:
        with self._lock:
            doc = self._docs.get(doc_id)
            return copy.deepcopy(doc.details) if doc else None

    def bbox(self, doc_id: int) -> dict | None:
        """Character bboxes once the document is done; ``{}`` before; None if unknown."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is None:
                return None
            if doc.details["status_data"] != DONE:
                return {}
            text, sizes = doc.text, list(doc.page_sizes)
        return content.bbox_for(text, sizes)

    def all_details(self) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(self._docs[i].details) for i in sorted(self._docs)]

    def list_meta(self, project: int | None = None, category: int | None = None) -> list[dict]:
        """Details without text/pages/annotation_sets, ordered by id, optionally filtered."""
        with self._lock:
            docs = [self._docs[i].details for i in sorted(self._docs)]
            return [
                {k: copy.deepcopy(v) for k, v in d.items() if k not in HEAVY_KEYS}
                for d in docs
                if (project is None or d["project"] == project) and (category is None or d["category"] == category)
            ]


def _initial_details(doc_id: int, new: NewDocument, number_of_pages: int) -> dict:
    created = now_iso()
    return {
        "id": doc_id,
        "project": new.project,
        "document_set": None,
        "number_of_pages": number_of_pages,
        "data_file_name": new.data_file_name,
        "data_file_producer": "konfuzio-emulator",
        "file_url": f"/doc/show-original/{doc_id}/",
        "thumbnail_url": f"/doc/thumbnail/{doc_id}/",
        "ocr_time": None,
        "categorization_time": None,
        "extraction_time": None,
        "processing_time": None,
        "extraction_url": None,
        "callback_url": new.callback_url,
        "callback_status_code": new.callback_status_code,
        "category_confidence": None,
        "category_is_revised": False,
        "status_data": QUEUING_OCR,
        "labeling_available": False,
        "is_reviewed": False,
        "text": None,
        "category": new.category,
        "dataset_status": new.dataset_status,
        "pages": [],
        "annotation_sets": [],
        "assignee": new.assignee,
        "created_by": CREATED_BY,
        "created_at": created,
        "updated_at": created,
        "proposed_split": None,
        "split_is_revised": False,
        "enable_translated_strings": False,
        "original_file_url": f"/doc/show-original/{doc_id}/",
    }


def _pages(doc_id: int, sizes: list[tuple[int, int]]) -> list[dict]:
    pages = []
    for number, (width, height) in enumerate(sizes, start=1):
        page_id = doc_id * 1000 + number
        pages.append(
            {
                "id": page_id,
                "image": f"/page/show/{page_id}/",
                "number": number,
                "original_size": [width, height],
                "size": [width, height],
            }
        )
    return pages
