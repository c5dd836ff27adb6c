"""The emulator's document table: details in the shape of the real API, status changes, results,
review and re-extraction, deletion, and seeded documents for scale tests.

Seeded documents are virtual: a batch of ids whose details are rendered on demand from the id
(``seed``), so 50,000 of them cost a list of ints. A seeded document that is reviewed or
re-extracted becomes a stored one.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import orjson

from konfuzio_watch.emulator import content, extraction
from konfuzio_watch.emulator.blobs import Blob
from konfuzio_watch.emulator.content import FileFacts, Layout
from konfuzio_watch.emulator.schema import schema_for

T = TypeVar("T")

QUEUING_OCR, OCR_IN_PROGRESS, QUEUING_EXTRACTION, EXTRACTION_IN_PROGRESS = 0, 10, 1, 20
QUEUING_SPLITTING, SPLITTING_IN_PROGRESS, WAITING_FOR_SPLITTING_CONFIRMATION = 4, 40, 41
DONE, COULD_NOT_BE_PROCESSED = 2, 111
FINAL_STATUSES = (DONE, COULD_NOT_BE_PROCESSED)
CREATED_BY = "emulator@konfuzio.invalid"
REVIEWER = "reviewer@konfuzio.invalid"
# Keys the list endpoint leaves out of each result.
HEAVY_KEYS = ("text", "pages", "annotation_sets")
ORDERINGS = ("id", "-id", "created_at", "-created_at", "updated_at", "-updated_at")
SEEDED_NAME = "seeded_{id:07d}.pdf"
SEEDED_UPDATE_S = 20.0  # a seeded document was done this long after it was created
_SEED_OBJECT_BASE = 10**12  # ids of seeded documents' annotations: far from the allocator's


class NotAllowed(Exception):
    """The document exists but is not in a state that allows this (the control endpoints' 409)."""


@dataclass
class NewDocument:
    """A validated upload, ready to be stored."""

    project: int
    data_file_name: str
    original: Blob
    facts: FileFacts
    dataset_status: int = 0
    category: int | None = None
    callback_url: str | None = None
    callback_status_code: int | None = None
    assignee: str | None = None


@dataclass
class StoredDocument:
    details: dict
    facts: FileFacts
    layout: Layout
    page_sizes: list[tuple[int, int]]
    final_status: int
    original: Blob | None
    is_category_fixed: bool  # named by the upload or a reviewer: categorization leaves it alone
    version: int = 0  # of the extraction; re-extraction bumps it (new ids, new confidences)
    started_mono: float = field(default_factory=time.monotonic)  # of the current processing run


@dataclass(frozen=True)
class SeedBatch:
    first_id: int
    count: int
    project: int
    created_from: float  # time.time() of the first one; one second apart
    callback_url: str | None
    name: str
    uncategorized_share: float

    def created_at(self, doc_id: int) -> float:
        return self.created_from + (doc_id - self.first_id)


def now_iso() -> str:
    """Current time as ISO 8601 with UTC offset, like the real API."""
    return iso(time.time())


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


class DocumentStore:
    """Thread-safe table of documents; ids increase from 1. Readers get deep copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._docs: dict[int, StoredDocument] = {}
        self._seeds: list[SeedBatch] = []
        self._deleted_seeds: set[int] = set()
        self._by_project: dict[int, list[int]] = {}  # ascending ids, stored and seeded
        self._next_id = 1
        self._object_ids = itertools.count(1)  # annotation and annotation set ids

    # -- creating and processing -------------------------------------------------------------

    def create(self, new: NewDocument, final_status: int) -> tuple[int, dict]:
        """Store a document in status 0; return its id and a copy of its details."""
        sizes = [new.facts.page_size] * new.facts.pages
        layout = content.layout_for(new.facts, new.data_file_name)
        with self._lock:
            doc_id = self._next_id
            self._next_id += 1
            details = _initial_details(doc_id, new, len(sizes), now_iso())
            self._docs[doc_id] = StoredDocument(
                details=details,
                facts=new.facts,
                layout=layout,
                page_sizes=sizes,
                final_status=final_status,
                original=new.original,
                is_category_fixed=new.category is not None,
            )
            self._by_project.setdefault(new.project, []).append(doc_id)
            return doc_id, copy.deepcopy(details)

    def advance(self, doc_id: int, status: int, uncategorized_share: float = 0.0, *, deep: bool = True) -> dict | None:
        """Move a document to ``status`` (filling text, pages, timings, results); return a copy of
        its details (``deep=False``: of their top level only, for a caller that reads no more than
        that), or None if it is gone."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is None:
                return None
            details = doc.details
            elapsed = round(time.monotonic() - doc.started_mono, 3)
            details["status_data"] = status
            details["updated_at"] = now_iso()
            if status == QUEUING_EXTRACTION and details["text"] is None:
                details["text"] = doc.layout.text
                details["pages"] = _pages(doc_id, doc.page_sizes)
                details["ocr_time"] = elapsed
            elif status == WAITING_FOR_SPLITTING_CONFIRMATION:
                details["proposed_split"] = _proposed_split(len(doc.page_sizes))
            elif status == DONE:
                details["extraction_time"] = round(max(0.0, elapsed - (details["ocr_time"] or 0.0)), 3)
                details["categorization_time"] = 0.0
                details["processing_time"] = elapsed
                details["labeling_available"] = True
                self._extract(doc_id, doc, uncategorized_share)
            elif status == COULD_NOT_BE_PROCESSED:
                details["processing_time"] = elapsed
            return copy.deepcopy(details) if deep else dict(details)

    def _extract(self, doc_id: int, doc: StoredDocument, uncategorized_share: float) -> None:
        """Categorize (unless fixed) and extract; annotations a person revised survive."""
        details = doc.details
        schema = schema_for(details["project"])
        if not doc.is_category_fixed:
            details["category"], details["category_confidence"] = extraction.categorize(
                doc.facts, doc.layout.kind, schema, uncategorized_share
            )
        details["annotation_sets"] = extraction.annotation_sets(
            doc_id=doc_id,
            digest=doc.facts.sha256,
            layout=doc.layout,
            pages=content.geometry(doc.layout.text, doc.page_sizes),
            schema=schema,
            category_id=details["category"],
            version=doc.version,
            next_id=lambda: next(self._object_ids),
            now=details["updated_at"],
            keep=extraction.revised_annotations(details["annotation_sets"]),
        )

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

    # -- people at work: review, re-extraction, split confirmation ---------------------------

    def review(
        self,
        doc_id: int,
        changes: Mapping[int | str, str] | None = None,
        category: int | None = None,
        reviewer: str = REVIEWER,
    ) -> dict | None:
        """A person reviews a done document: accepts its annotations, corrects ``changes`` (label id
        or name -> value), optionally sets another ``category`` (re-extracting for it)."""
        with self._lock:
            doc = self._materialize(doc_id)
            if doc is None:
                return None
            details = doc.details
            if details["status_data"] != DONE:
                raise NotAllowed(f"document {doc_id} is in status {details['status_data']}, not done (2)")
            sets = copy.deepcopy(details["annotation_sets"])
            now = now_iso()
            if category is not None and category != details["category"]:
                if schema_for(details["project"]).category(category) is None:
                    raise ValueError(f"no category {category} in project {details['project']}")
                details.update(category=category, category_confidence=1.0, category_is_revised=True, updated_at=now)
                doc.is_category_fixed = True
                doc.version += 1
                self._extract(doc_id, doc, 0.0)
                sets = copy.deepcopy(details["annotation_sets"])
            extraction.review(sets, changes or {}, reviewer, now, schema_for(details["project"]))
            details.update(annotation_sets=sets, is_reviewed=True, updated_at=now)
            return copy.deepcopy(details)

    def begin_reextraction(self, doc_id: int) -> dict | None:
        """A done document goes back to extraction (status 1); ``advance(.., DONE)`` finishes it."""
        with self._lock:
            doc = self._materialize(doc_id)
            if doc is None:
                return None
            if doc.details["status_data"] != DONE:
                raise NotAllowed(f"document {doc_id} is in status {doc.details['status_data']}, not done (2)")
            doc.version += 1
            doc.started_mono = time.monotonic()
            doc.details.update(status_data=QUEUING_EXTRACTION, updated_at=now_iso())
            return copy.deepcopy(doc.details)

    def confirm_split(self, doc_id: int) -> dict | None:
        """A person confirms the proposed split of a document waiting in status 41."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is None:
                return None
            if doc.details["status_data"] != WAITING_FOR_SPLITTING_CONFIRMATION:
                raise NotAllowed(f"document {doc_id} is in status {doc.details['status_data']}, not waiting (41)")
            doc.details.update(status_data=QUEUING_EXTRACTION, split_is_revised=True, updated_at=now_iso())
            return copy.deepcopy(doc.details)

    # -- reading -----------------------------------------------------------------------------

    def details(self, doc_id: int) -> dict | None:
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                return copy.deepcopy(doc.details)
            batch = self._seed_batch(doc_id)
        return _seeded(batch, doc_id).details if batch else None

    def details_json(self, doc_id: int) -> bytes | None:
        """The details as JSON, encoded under the lock: a snapshot without a deep copy (the answer
        to ``GET`` and the callback's body); None if unknown."""
        return self._read(doc_id, lambda doc: orjson.dumps(doc.details, option=orjson.OPT_NON_STR_KEYS))

    def bbox(self, doc_id: int) -> dict | None:
        """Character bboxes once the document is done; ``{}`` before; None if unknown."""
        found = self._read(doc_id, lambda doc: (doc.details["status_data"], doc.layout.text, list(doc.page_sizes)))
        if found is None:
            return None
        status, text, sizes = found
        return content.bbox_for(text, sizes) if status == DONE else {}

    def annotations(self, doc_id: int) -> list[dict] | None:
        """The flat annotation list of ``GET /api/v3/annotations/?document=``; None if unknown."""
        return self._read(doc_id, lambda doc: extraction.flat_annotations(doc.details["annotation_sets"]))

    def document(self, doc_id: int) -> StoredDocument | None:
        """A snapshot (deep copy of the details) for the file endpoints."""
        return self._document(doc_id)

    def all_details(self) -> list[dict]:
        """Stored (uploaded, or touched seeded) documents only; seeded ones are listed by ``list_page``."""
        with self._lock:
            return [copy.deepcopy(self._docs[i].details) for i in sorted(self._docs)]

    def list_page(
        self,
        project: int | None = None,
        category: int | None = None,
        ordering: str = "-id",
        offset: int = 0,
        limit: int = 10,
    ) -> tuple[int, list[dict]]:
        """(count, one page of meta): details without text/pages/annotation_sets. Newest first by
        default; ``ordering`` as DRF's OrderingFilter (unknown fields are ignored)."""
        with self._lock:
            if project is not None:
                ids = list(self._by_project.get(project, ()))
            else:
                ids = sorted(itertools.chain.from_iterable(self._by_project.values()))
        if category is not None:
            ids = [i for i in ids if self._peek(i, lambda d: d["category"]) == category]
        ordering = ordering if ordering in ORDERINGS else "-id"
        key = ordering.lstrip("-")
        if key != "id":
            ids.sort(key=lambda i: (self._timestamp(i, key) or "", i))
        if ordering.startswith("-"):
            ids.reverse()
        page = []
        for doc_id in ids[offset : offset + limit]:
            meta = self._peek(doc_id, lambda d: {k: copy.deepcopy(v) for k, v in d.items() if k not in HEAVY_KEYS})
            if meta is not None:  # deleted meanwhile
                page.append(meta)
        return len(ids), page

    # -- deleting and seeding ----------------------------------------------------------------

    def delete(self, doc_id: int) -> dict | None:
        """Remove a document; return its last details (None if unknown)."""
        with self._lock:
            doc = self._docs.pop(doc_id, None)
            if doc is not None:
                details = doc.details
            else:
                batch = self._seed_batch(doc_id)
                if batch is None:
                    return None
                self._deleted_seeds.add(doc_id)
                details = {"id": doc_id, "project": batch.project}
            ids = self._by_project.get(details["project"], [])
            index = bisect.bisect_left(ids, doc_id)
            if index < len(ids) and ids[index] == doc_id:
                del ids[index]
            return details if doc is None else copy.deepcopy(details)

    def seed(
        self,
        project: int,
        count: int,
        *,
        callback_url: str | None = None,
        name: str = SEEDED_NAME,
        uncategorized_share: float = 0.0,
    ) -> range:
        """Add ``count`` done documents to ``project`` at once; return their ids.

        They were created one second apart, the last one just now. ``callback_url`` and ``name`` may
        hold ``{id}``. Each one's file is a small PDF made from its id (``seeded_original``).
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._lock:
            first = self._next_id
            self._next_id += count
            self._seeds.append(
                SeedBatch(first, count, project, time.time() - count, callback_url, name, uncategorized_share)
            )
            self._by_project.setdefault(project, []).extend(range(first, first + count))
            return range(first, first + count)

    # -- internals ---------------------------------------------------------------------------

    def _seed_batch(self, doc_id: int) -> SeedBatch | None:
        """Caller holds the lock."""
        if doc_id in self._deleted_seeds or doc_id in self._docs:
            return None
        index = bisect.bisect_right([b.first_id for b in self._seeds], doc_id) - 1
        if index < 0:
            return None
        batch = self._seeds[index]
        return batch if doc_id < batch.first_id + batch.count else None

    def _materialize(self, doc_id: int) -> StoredDocument | None:
        """Caller holds the lock. A seeded document becomes a stored one (to be changed)."""
        doc = self._docs.get(doc_id)
        if doc is None:
            batch = self._seed_batch(doc_id)
            if batch is None:
                return None
            doc = self._docs[doc_id] = _seeded(batch, doc_id)
        return doc

    def _read(self, doc_id: int, read: Callable[[StoredDocument], T]) -> T | None:
        """``read`` a document under the lock, without copying it first: ``read`` returns only copies
        or immutable parts. None if unknown."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                return read(doc)
            batch = self._seed_batch(doc_id)
        return read(_seeded(batch, doc_id)) if batch else None

    def _document(self, doc_id: int) -> StoredDocument | None:
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                return StoredDocument(**{**vars(doc), "details": copy.deepcopy(doc.details)})
            batch = self._seed_batch(doc_id)
        return _seeded(batch, doc_id) if batch else None

    def _timestamp(self, doc_id: int, key: str) -> str | None:
        """``created_at``/``updated_at`` of a document; seeded ones without rendering them."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                return doc.details[key]
            batch = self._seed_batch(doc_id)
        if batch is None:
            return None
        return iso(batch.created_at(doc_id) + (SEEDED_UPDATE_S if key == "updated_at" else 0))

    def _peek(self, doc_id: int, read: Callable[[dict], object]) -> object:
        """``read(details)`` without copying them all; seeded ones without their annotations."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                return read(doc.details)
            batch = self._seed_batch(doc_id)
        return read(_seeded_meta(batch, doc_id)[0]) if batch else None


def seeded_original(doc_id: int) -> bytes:
    """The file a seeded document was made from: a one-page PDF naming its id."""
    from konfuzio_watch.samples import make_pdf

    return make_pdf(1, label=f"seeded document {doc_id}")


def _seeded_meta(batch: SeedBatch, doc_id: int) -> tuple[dict, bytes, FileFacts]:
    """A seeded document's details without text, pages and annotation sets (what the list shows;
    the cheap part: a 50,000-document walk renders each once), its file and the file's facts."""
    data = seeded_original(doc_id)
    facts = content.facts_of(data)
    created = batch.created_at(doc_id)
    callback_url = batch.callback_url.format(id=doc_id) if batch.callback_url else None
    new = NewDocument(
        project=batch.project,
        data_file_name=batch.name.format(id=doc_id),
        original=Blob(len(data), data=data),
        facts=facts,
        callback_url=callback_url,
    )
    details = _initial_details(doc_id, new, facts.pages, iso(created))
    category, confidence = extraction.categorize(
        facts, content.kind_of(facts), schema_for(batch.project), batch.uncategorized_share
    )
    details.update(
        status_data=DONE,
        ocr_time=17.0,
        extraction_time=2.5,
        categorization_time=0.5,
        processing_time=20.0,
        labeling_available=True,
        updated_at=iso(created + SEEDED_UPDATE_S),
        category=category,
        category_confidence=confidence,
        callback_status_code=200 if callback_url else None,
    )
    for key in HEAVY_KEYS:
        del details[key]
    return details, data, facts


def _seeded(batch: SeedBatch, doc_id: int) -> StoredDocument:
    """Render a seeded document: a done one-page PDF, as if uploaded and processed at its time."""
    meta, data, facts = _seeded_meta(batch, doc_id)
    layout = content.layout_for(facts, meta["data_file_name"])
    sizes = [facts.page_size] * facts.pages
    ids = itertools.count(_SEED_OBJECT_BASE + doc_id * 1000)
    sets = extraction.annotation_sets(
        doc_id=doc_id,
        digest=facts.sha256,
        layout=layout,
        pages=content.geometry(layout.text, sizes),
        schema=schema_for(batch.project),
        category_id=meta["category"],
        version=0,
        next_id=lambda: next(ids),
        now=meta["updated_at"],
    )
    details = {**meta, "text": layout.text, "pages": _pages(doc_id, sizes), "annotation_sets": sets}
    return StoredDocument(details, facts, layout, sizes, DONE, Blob(len(data), data=data), is_category_fixed=False)


def _initial_details(doc_id: int, new: NewDocument, number_of_pages: int, created: str) -> dict:
    """Every key the real API answers, in its order, as just uploaded."""
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


def _proposed_split(pages: int) -> list[dict]:
    """The emulator's guess at the shape: the page numbers of each proposed sub-document."""
    if pages < 2:
        return [{"pages": [1]}]
    cut = (pages + 1) // 2
    return [{"pages": list(range(1, cut + 1))}, {"pages": list(range(cut + 1, pages + 1))}]
