"""Request accounting: how many requests of each kind the API answered, and the bytes both ways,
so a benchmark can report requests (and bytes) per file."""

from __future__ import annotations

import threading
from dataclasses import dataclass

# Flask endpoint name -> kind. Anything else under /api/ or /doc/ (a 404, a 405) counts as "other".
KINDS = {
    "upload_document": "upload",
    "document_details": "details",
    "document_bbox": "bbox",
    "delete_document": "delete",
    "list_documents": "list",
    "list_annotations": "annotations",
    "list_labels": "labels",
    "list_label_sets": "label_sets",
    "list_categories": "categories",
    "project_details": "project",
    "list_projects": "projects",
    "searchable_pdf": "pdf",
    "original_file": "original",
}


@dataclass
class RequestStats:
    """Counts for one kind. ``errors``: answers with status >= 400 (faults included)."""

    count: int = 0
    errors: int = 0
    bytes_sent: int = 0  # response bodies (Content-Length)
    bytes_received: int = 0  # request bodies (Content-Length)


class RequestAccounting:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, RequestStats] = {}

    def record(self, kind: str, status: int, bytes_sent: int, bytes_received: int) -> None:
        with self._lock:
            stats = self._stats.setdefault(kind, RequestStats())
            stats.count += 1
            stats.errors += status >= 400
            stats.bytes_sent += bytes_sent
            stats.bytes_received += bytes_received

    def snapshot(self) -> dict[str, RequestStats]:
        with self._lock:
            return {kind: RequestStats(**vars(stats)) for kind, stats in sorted(self._stats.items())}

    def reset(self) -> None:
        with self._lock:
            self._stats.clear()
