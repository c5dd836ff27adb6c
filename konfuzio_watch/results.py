"""Pure: the rich result of a done document, from the API's answers. No I/O.

On top of today's OCR result (``export.build_result``): the document's category, every extracted
value with its position (``annotations``), the values by label set and label for scripts
(``fields``), a link to the document in the Konfuzio web app, and a revision number, because a done
document can change later (review, re-extraction) and be exported again.

Rules (the JSON Schema in ``data/result.schema.json`` says the same to users):

- Source: the annotations endpoint (``GET /api/v3/annotations/?document=``, all pages) when the
  caller fetched it (a list, even empty), else the ``annotation_sets`` of the details. Never a mix:
  the two are separate requests, and a review in between would make them disagree. The category
  always comes from the details.
- A value a person rejected (``revised`` and not ``is_correct``) is no result: it is left out, as
  Konfuzio's own views leave it out.
- ``fields[label_set][label]``: a list wherever Konfuzio's schema allows several
  (``has_multiple_annotation_sets`` for a label set: line items; ``has_multiple_top_candidates`` for
  a label) or several were found anyway; otherwise one value, or ``None`` (a label set: ``{}`` of
  ``None``/``[]``) when the document's category has it but nothing was found. So the type of
  ``fields["Invoice"]["Total"]`` depends on the project's schema, never on the document. A value is
  ``normalized`` when Konfuzio has it (ISO dates, numbers as numbers), else the text.
- A value made of several spans (a two-line address): ``page``/``bbox`` is the box around its
  spans on the page of its first span (what an importer highlights or crops), ``spans`` has each
  span's own page, box and offsets. Boxes are in Konfuzio's page coordinates (``pages[].size``),
  origin bottom left, ``y0 < y1``.
- Names: a name the answer itself carries wins (it is as fresh as the values); else the project's
  catalog; else ``"label 12"``. Two label sets (or two labels in one) with the same name are told
  apart as ``"Name (id)"``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import orjson

from . import export
from .journal import Row

REDACTED = "<redacted>"
# What a revision is compared on: everything the server says about the document's content, not
# when or by whom it was exported, nor bookkeeping the server changes on its own (callback_status_code).
CONTENT_KEYS = ("document_id", "status_data", "category", "fields", "annotations", "text", "pages", "bbox")
CONTENT_DETAIL_KEYS = ("is_reviewed", "category_is_revised")


# -- the project's schema: names by id --------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    multiple: bool = False  # has_multiple_top_candidates: several values per annotation set


@dataclass(frozen=True)
class LabelSet:
    id: int
    name: str
    multiple: bool = False  # has_multiple_annotation_sets: line items
    label_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    label_set_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ProjectCatalog:
    """Labels, label sets and categories of one project by id (from ``KonfuzioClient.project_labels``,
    ``project_label_sets`` and ``project_categories``)."""

    project_id: int
    labels: Mapping[int, Label]
    label_sets: Mapping[int, LabelSet]
    categories: Mapping[int, Category]

    @classmethod
    def from_api(cls, project_id: int, labels: Iterable[dict], label_sets: Iterable[dict],
                 categories: Iterable[dict]) -> ProjectCatalog:  # fmt: skip
        """Read the three lists as the API gives them; entries without an int ``id`` are skipped."""
        label_map = {
            x["id"]: Label(
                x["id"], str(x.get("name") or f"label {x['id']}"), bool(x.get("has_multiple_top_candidates"))
            )  # fmt: skip
            for x in labels
            if _is_id(x.get("id"))
        }
        set_list = [x for x in label_sets if _is_id(x.get("id"))]
        category_list = [x for x in categories if _is_id(x.get("id"))]
        set_map = {x["id"]: LabelSet(x["id"], str(x.get("name") or f"label set {x['id']}"),
                                     bool(x.get("has_multiple_annotation_sets")), _ids(x.get("labels")))
                   for x in set_list}  # fmt: skip
        category_map = {}
        for x in category_list:
            schema = x.get("schema")
            if isinstance(schema, list):  # the category's own list of its label sets
                members = _ids(schema)
            else:  # else each label set names its categories
                members = tuple(s["id"] for s in set_list if x["id"] in _ids(s.get("categories")))
            category_map[x["id"]] = Category(x["id"], str(x.get("name") or f"category {x['id']}"), members)
        return cls(project_id, MappingProxyType(label_map), MappingProxyType(set_map), MappingProxyType(category_map))

    def has_all(self, label_ids: Iterable[int] = (), label_set_ids: Iterable[int] = (),
                category_ids: Iterable[int] = ()) -> bool:  # fmt: skip
        """Does the catalog know every one of these ids? If not, it is older than the project's schema."""
        return (all(i in self.labels for i in label_ids) and all(i in self.label_sets for i in label_set_ids)
                and all(i in self.categories for i in category_ids))  # fmt: skip


@dataclass(frozen=True)
class References:
    """The ids of labels, label sets and categories one document's results refer to."""

    label_ids: frozenset[int] = frozenset()
    label_set_ids: frozenset[int] = frozenset()
    category_ids: frozenset[int] = frozenset()


def references(details: dict[str, Any], annotations: list[dict] | None = None) -> References:
    """What ``build_extractions`` will look up in the catalog for this document."""
    labels, label_sets = set(), set()
    for raw in _raw_annotations(details, annotations):
        label_id, label_set_id = _id_of(raw.get("label")), _id_of(raw.get("label_set", raw.get("section_label_id")))
        if label_id is not None:
            labels.add(label_id)
        if label_set_id is not None:
            label_sets.add(label_set_id)
    category = details.get("category")
    return References(frozenset(labels), frozenset(label_sets), frozenset([category] if _is_id(category) else []))


class CatalogCache:
    """One ``ProjectCatalog`` per project, shared by the workers.

    Fetched once per project, fetched again when a document refers to an id the catalog does not
    know (a label added since), but not more often than ``min_refresh_s``: an id the lists never
    show (a label deleted since) must not cost three requests per document. Thread-safe; with
    ``catalog_for`` only one worker fetches a project at a time, the others wait for its answer.
    """

    def __init__(self, min_refresh_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._min_refresh_s = min_refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[ProjectCatalog, float]] = {}
        self._fetching: dict[int, threading.Lock] = {}

    def get(self, project_id: int) -> ProjectCatalog | None:
        with self._lock:
            entry = self._entries.get(project_id)
        return entry[0] if entry else None

    def put(self, catalog: ProjectCatalog) -> None:
        with self._lock:
            self._entries[catalog.project_id] = (catalog, self._clock())

    def needs_refresh(self, project_id: int, refs: References = References()) -> bool:
        """True if there is no catalog for the project yet, or it lacks one of ``refs`` and is
        at least ``min_refresh_s`` old."""
        with self._lock:
            entry = self._entries.get(project_id)
        if entry is None:
            return True
        catalog, fetched_at = entry
        if catalog.has_all(refs.label_ids, refs.label_set_ids, refs.category_ids):
            return False
        return self._clock() - fetched_at >= self._min_refresh_s

    def catalog_for(self, project_id: int, refs: References, fetch: Callable[[int], ProjectCatalog]
                    ) -> ProjectCatalog:  # fmt: skip
        """The project's catalog, calling ``fetch(project_id)`` first if ``needs_refresh``. Errors of
        ``fetch`` propagate (the caller retries, or builds the result without a catalog)."""
        with self._lock:
            gate = self._fetching.setdefault(project_id, threading.Lock())
        with gate:
            if self.needs_refresh(project_id, refs):
                catalog = fetch(project_id)
                if catalog.project_id != project_id:
                    raise ValueError(f"fetched the catalog of project {catalog.project_id} for {project_id}")
                self.put(catalog)
            catalog = self.get(project_id)
        assert catalog is not None
        return catalog


# -- extractions -------------------------------------------------------------------------------------


class Extractions(NamedTuple):
    category: dict[str, Any] | None
    annotations: list[dict[str, Any]]
    fields: dict[str, Any]


def build_extractions(details: dict[str, Any], annotations: list[dict] | None = None,
                      catalog: ProjectCatalog | None = None) -> Extractions:  # fmt: skip
    """(category, annotations, fields) of a done document; see the module's docstring for the rules."""
    names = _Names(catalog)
    entries = [e for e in (_entry(raw, names) for raw in _raw_annotations(details, annotations)) if e is not None]
    entries.sort(key=lambda e: (e["_start"], e["id"] if _is_id(e["id"]) else 0))  # document order
    category = _category(details, catalog)
    public = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
    return Extractions(category, public, _fields(entries, category, names))


def _raw_annotations(details: dict[str, Any], annotations: list[dict] | None) -> list[dict]:
    """The annotations endpoint's flat list, or the same shape made from the details' sets."""
    if annotations is not None:
        return [a for a in annotations if isinstance(a, dict)]
    flat = []
    for annotation_set in details.get("annotation_sets") or []:
        for label in annotation_set.get("labels") or []:
            ref = {k: v for k, v in label.items() if k != "annotations"}
            for annotation in label.get("annotations") or []:
                flat.append({**annotation, "annotation_set": annotation_set.get("id"), "label": ref,
                             "label_set": annotation_set.get("label_set")})  # fmt: skip
    return flat


class _Names:
    """Names and flags of labels and label sets: the answer's own first, then the catalog's."""

    def __init__(self, catalog: ProjectCatalog | None) -> None:
        self.catalog = catalog

    def label(self, ref: Any) -> tuple[int | None, str, bool]:
        label_id = _id_of(ref)
        known = self.catalog.labels.get(label_id) if self.catalog and label_id is not None else None
        name = _name_in(ref) or (known.name if known else f"label {label_id}")
        multiple = ref.get("has_multiple_top_candidates") if isinstance(ref, dict) else None
        return label_id, name, bool(multiple if multiple is not None else known and known.multiple)

    def label_set(self, ref: Any) -> tuple[int | None, str, bool]:
        set_id = _id_of(ref)
        known = self.catalog.label_sets.get(set_id) if self.catalog and set_id is not None else None
        name = _name_in(ref) or (known.name if known else f"label set {set_id}")
        multiple = ref.get("has_multiple_annotation_sets") if isinstance(ref, dict) else None
        return set_id, name, bool(multiple if multiple is not None else known and known.multiple)


def _entry(raw: dict, names: _Names) -> dict[str, Any] | None:
    """One extracted value, or None for a value a person rejected."""
    correct, revised = bool(raw.get("is_correct")), bool(raw.get("revised"))
    if revised and not correct:
        return None
    label_id, label, label_multiple = names.label(raw.get("label"))
    set_id, label_set, set_multiple = names.label_set(raw.get("label_set", raw.get("section_label_id")))
    raw_spans = [s for s in (raw.get("span") or raw.get("bboxes") or []) if isinstance(s, dict)]
    spans = [_span(s) for s in raw_spans]
    value = _value(raw, raw_spans)
    page, bbox = _position(spans, raw.get("selection_bbox"))
    starts = [s["start_offset"] for s in spans if isinstance(s["start_offset"], int)]
    annotation_set = raw.get("annotation_set", raw.get("section"))
    return {
        "label_set": label_set,
        "label": label,
        "value": value,
        "normalized": raw.get("normalized"),
        "confidence": raw.get("confidence"),
        "page": page,
        "bbox": bbox,
        "spans": spans,
        "revised": revised,
        "correct": correct,
        "id": raw.get("id"),
        "label_id": label_id,
        "label_set_id": set_id,
        "annotation_set_id": _id_of(annotation_set),
        "_start": min(starts) if starts else float("inf"),
        "_label_multiple": label_multiple,
        "_set_multiple": set_multiple,
    }


def _span(raw: dict) -> dict[str, Any]:
    page_index = raw.get("page_index")
    return {
        "page": page_index + 1 if isinstance(page_index, int) else None,
        "bbox": _box(raw),
        "start_offset": raw.get("start_offset"),
        "end_offset": raw.get("end_offset"),
    }


def _box(raw: Any) -> dict[str, float] | None:
    if not isinstance(raw, dict):
        return None
    box = {k: raw.get(k) for k in ("x0", "y0", "x1", "y1")}
    return box if all(isinstance(v, int | float) and not isinstance(v, bool) for v in box.values()) else None


def _position(spans: list[dict], selection: Any) -> tuple[int | None, dict[str, float] | None]:
    """(page, box around the spans on the first span's page); the box a person drew if no span has one."""
    placed = [s for s in spans if s["page"] is not None]
    if not placed:
        if isinstance(selection, dict) and isinstance(selection.get("page_index"), int):
            return selection["page_index"] + 1, _box(selection)
        return None, None
    page = placed[0]["page"]
    boxes = [s["bbox"] for s in placed if s["page"] == page and s["bbox"] is not None]
    if not boxes:
        return page, None
    return page, {"x0": min(b["x0"] for b in boxes), "y0": min(b["y0"] for b in boxes),
                  "x1": max(b["x1"] for b in boxes), "y1": max(b["y1"] for b in boxes)}  # fmt: skip


def _value(raw: dict, raw_spans: list[dict]) -> str | None:
    """The text as Konfuzio gives it: the annotation's ``offset_string`` (a person's correction
    included); for an old-style list, or none at all, its spans' strings joined by a space."""
    value = raw.get("offset_string")
    if isinstance(value, str):
        return value
    texts = value if isinstance(value, list) else [s.get("offset_string") for s in raw_spans]
    parts = [t for t in texts if isinstance(t, str)]
    return " ".join(parts) if parts else None


def _category(details: dict[str, Any], catalog: ProjectCatalog | None) -> dict[str, Any] | None:
    category_id = details.get("category")
    if category_id is None:
        return None
    known = catalog.categories.get(category_id) if catalog else None
    return {"id": category_id, "name": known.name if known else None, "confidence": details.get("category_confidence")}


def _fields(entries: list[dict], category: dict | None, names: _Names) -> dict[str, Any]:
    """``{label set: {label: value}}``; a list of such dicts for line items (module docstring)."""
    shapes: dict[Any, _Shape] = {}  # label set id -> its shape: the category's schema, then what was found
    catalog = names.catalog
    known = catalog.categories.get(category["id"]) if catalog and category else None
    for set_id in known.label_set_ids if catalog and known else ():
        label_set = catalog.label_sets.get(set_id)
        if label_set is not None:
            shape = shapes[set_id] = _Shape(label_set.name, label_set.multiple)
            for label_id in label_set.label_ids:
                if label_id in catalog.labels:
                    shape.labels[label_id] = (catalog.labels[label_id].name, catalog.labels[label_id].multiple)
    for entry in entries:
        shape = shapes.setdefault(entry["label_set_id"], _Shape(entry["label_set"], False))
        shape.name, shape.multiple = entry["label_set"], shape.multiple or entry["_set_multiple"]
        _, was_multiple = shape.labels.get(entry["label_id"], ("", False))
        shape.labels[entry["label_id"]] = (entry["label"], was_multiple or entry["_label_multiple"])
        shape.sets.setdefault(entry["annotation_set_id"], []).append(entry)
    fields: dict[str, Any] = {}
    for set_id, shape in shapes.items():
        sets = [_one_set(group, shape.labels) for group in shape.sets.values()]
        if shape.multiple or len(sets) > 1:
            value: Any = sets
        else:
            value = sets[0] if sets else _one_set([], shape.labels)
        fields[_unique(shape.name, set_id, fields)] = value
    return fields


class _Shape:
    """A label set as the fields show it: its name, whether it is line items, its labels (id ->
    name, several values allowed) and the values found, by annotation set."""

    def __init__(self, name: str, multiple: bool) -> None:
        self.name = name
        self.multiple = multiple
        self.labels: dict[Any, tuple[str, bool]] = {}
        self.sets: dict[Any, list[dict]] = {}


def _one_set(entries: list[dict], labels: dict[Any, tuple[str, bool]]) -> dict[str, Any]:
    values: dict[Any, list] = {label_id: [] for label_id in labels}
    for entry in entries:
        values[entry["label_id"]].append(entry["normalized"] if entry["normalized"] is not None else entry["value"])
    out: dict[str, Any] = {}
    for label_id, found in values.items():
        name, multiple = labels[label_id]
        out[_unique(name, label_id, out)] = found if multiple or len(found) > 1 else (found[0] if found else None)
    return out


def _unique(name: str, id_: Any, taken: dict[str, Any]) -> str:
    return name if name not in taken else f"{name} ({id_})"


# -- the result file ---------------------------------------------------------------------------------


def web_url(host: str, document_id: int) -> str:
    """The document in the Konfuzio web app (the Document Validation UI): ``{host}/d/<id>/``.

    konfuzio-sdk 0.3.52 has no helper for it: its ``get_document_details_url`` is the API's JSON
    (token needed), and its only web link is ``get_annotation_view_url`` (``{host}/a/<annotation
    id>``). Konfuzio documents ``/d/<id>/`` as the link to a document (server changelog, DVUI docs).
    """
    return f"{host.rstrip('/')}/d/{int(document_id)}/"


def redact_callback_url(details: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``details`` whose ``callback_url`` no longer carries our per-file token.

    The token is the last path segment (``tokens.token_hash_of``); it becomes ``<redacted>``. User
    info, query and fragment go too: a result file must give nobody a way to post a callback.
    """
    out = dict(details)
    url = out.get("callback_url")
    if isinstance(url, str) and url:
        out["callback_url"] = _redact(url)
    return out


def _redact(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return REDACTED
    path = parts.path
    trailing = "/" if path.endswith("/") else ""
    head, _, last = path.rstrip("/").rpartition("/")
    if last:
        path = f"{head}/{REDACTED}{trailing}"
    return urlunsplit((parts.scheme, host, path, "", ""))


def build_result(row: Row, details: dict[str, Any], bbox: dict[str, Any] | None, now: float, *,
                 annotations: list[dict] | None = None, catalog: ProjectCatalog | None = None,
                 host: str | None = None, revision: int = 1, include_bbox: bool = True) -> dict[str, Any]:  # fmt: skip
    """``export.build_result`` (every key it has) plus category, fields, annotations, web_url,
    revision and updated_at; the raw details under ``konfuzio`` without our callback token.

    ``annotations``: the annotations endpoint's list if fetched (it wins), else None. ``catalog``:
    the project's, for the category's name and the fields' skeleton. ``host``: for ``web_url``
    (None: null). ``revision``: 1 for the first export, +1 each time the content changed
    (``content_fingerprint``). ``include_bbox=False`` (``results.bbox: false``) leaves ``bbox`` out.
    """
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise ValueError(f"revision must be an int >= 1, got {revision!r}")
    base = export.build_result(row, redact_callback_url(details), bbox, now)
    category, items, fields = build_extractions(details, annotations, catalog)
    result = {
        "document_id": base["document_id"],
        "status": base["status"],
        "status_data": base["status_data"],
        "revision": revision,
        "category": category,
        "fields": fields,
        "web_url": web_url(host, base["document_id"]) if host else None,
        "annotations": items,
        "text": base["text"],
        "pages": base["pages"],
        "bbox": base["bbox"],
        "source": base["source"],
        "konfuzio": base["konfuzio"],
        "detected_at": base["detected_at"],
        "uploaded_at": base["uploaded_at"],
        "updated_at": details.get("updated_at"),
        "exported_at": base["exported_at"],
        "exported_by": base["exported_by"],
    }
    if not include_bbox:
        del result["bbox"]
    return result


FINGERPRINT_VERSION = "2:"


def content_fingerprint(result: dict[str, Any]) -> str:
    """A digest of what a result says about the document, for "is this revision new?".

    Leaves out when and by whom it was exported, the revision, our own timestamps, the link, and
    what the server changes by itself (``updated_at``, ``callback_status_code``): a callback sent
    again for an unchanged document gives the same digest. Works on a result read back from its
    file as well (JSON in, JSON out). Encoded by orjson with sorted keys (version ``2:``; json's
    encoder cost ~1 ms per file on the character boxes); what orjson refuses (an integer beyond
    64 bits, a lone surrogate) by json, the same way every time.
    """
    content = _content(result)
    try:
        canonical = orjson.dumps(content, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
    except TypeError:
        canonical = _legacy_canonical(content)
    return FINGERPRINT_VERSION + hashlib.sha256(canonical).hexdigest()


def fingerprint_matches(result: dict[str, Any], stored: str | None) -> bool:
    """Whether ``result`` says what the result with fingerprint ``stored`` said; a fingerprint
    stored before version ``2:`` (json, sorted, ASCII) is compared the way it was computed."""
    if not stored:
        return False
    if stored.startswith(FINGERPRINT_VERSION):
        return content_fingerprint(result) == stored
    return hashlib.sha256(_legacy_canonical(_content(result))).hexdigest() == stored


def _content(result: dict[str, Any]) -> dict[str, Any]:
    details = result.get("konfuzio") if isinstance(result.get("konfuzio"), dict) else {}
    content = {k: result[k] for k in CONTENT_KEYS if k in result}
    content["konfuzio"] = {k: details.get(k) for k in CONTENT_DETAIL_KEYS}
    return content


def _legacy_canonical(content: dict[str, Any]) -> bytes:
    return json.dumps(content, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str).encode("ascii")


# -- helpers -----------------------------------------------------------------------------------------


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _id_of(ref: Any) -> int | None:
    """The id of a nested object (``{"id": 12, ...}``) or of a bare id (older answers)."""
    value = ref.get("id") if isinstance(ref, dict) else ref
    return value if _is_id(value) else None


def _ids(items: Any) -> tuple[int, ...]:
    if not isinstance(items, list):
        return ()
    return tuple(i for i in (_id_of(x) for x in items) if i is not None)


def _name_in(ref: Any) -> str | None:
    name = ref.get("name") if isinstance(ref, dict) else None
    return name if isinstance(name, str) and name else None
