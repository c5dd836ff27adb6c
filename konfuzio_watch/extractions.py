"""Pure: what a done document's answers say was found in it: its category, every extracted value
with its position (``annotations``), and the values by label set and label for scripts
(``fields``). No I/O.

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

from collections.abc import Mapping
from typing import Any, NamedTuple

from .project_catalog import ProjectCatalog, References, id_of, is_id, name_in


def references(details: dict[str, Any], annotations: list[dict] | None = None) -> References:
    """What ``build_extractions`` will look up in the catalog for this document."""
    labels, label_sets = set(), set()
    for raw in _raw_annotations(details, annotations):
        label_id, label_set_id = id_of(raw.get("label")), id_of(raw.get("label_set", raw.get("section_label_id")))
        if label_id is not None:
            labels.add(label_id)
        if label_set_id is not None:
            label_sets.add(label_set_id)
    category = details.get("category")
    return References(frozenset(labels), frozenset(label_sets), frozenset([category] if is_id(category) else []))


class Extractions(NamedTuple):
    category: dict[str, Any] | None
    annotations: list[dict[str, Any]]
    fields: dict[str, Any]


def build_extractions(
    details: dict[str, Any], annotations: list[dict] | None = None, catalog: ProjectCatalog | None = None
) -> Extractions:
    """(category, annotations, fields) of a done document; see the module's docstring for the rules."""
    names = _Names(catalog)
    entries = [e for e in (_entry(raw, names) for raw in _raw_annotations(details, annotations)) if e is not None]
    entries.sort(key=lambda e: (e["_start"], e["id"] if is_id(e["id"]) else 0))  # document order
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
                flat.append(
                    {
                        **annotation,
                        "annotation_set": annotation_set.get("id"),
                        "label": ref,
                        "label_set": annotation_set.get("label_set"),
                    }
                )
    return flat


class _Names:
    """Names and flags of labels and label sets: the answer's own first, then the catalog's."""

    def __init__(self, catalog: ProjectCatalog | None) -> None:
        self.catalog = catalog

    def label(self, ref: Any) -> tuple[int | None, str, bool]:
        known = self.catalog.labels if self.catalog else {}
        return _named(ref, known, "label", "has_multiple_top_candidates")

    def label_set(self, ref: Any) -> tuple[int | None, str, bool]:
        known = self.catalog.label_sets if self.catalog else {}
        return _named(ref, known, "label set", "has_multiple_annotation_sets")


def _named(ref: Any, catalog: Mapping[int, Any], noun: str, multiple_key: str) -> tuple[int | None, str, bool]:
    """(id, name, multiple) of a label or label set ``ref``: the answer's own, else the catalog's."""
    ref_id = id_of(ref)
    known = catalog.get(ref_id) if ref_id is not None else None
    name = name_in(ref) or (known.name if known else f"{noun} {ref_id}")
    multiple = ref.get(multiple_key) if isinstance(ref, dict) else None
    return ref_id, name, bool(multiple if multiple is not None else known and known.multiple)


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
        "annotation_set_id": id_of(annotation_set),
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
    return page, {
        "x0": min(b["x0"] for b in boxes),
        "y0": min(b["y0"] for b in boxes),
        "x1": max(b["x1"] for b in boxes),
        "y1": max(b["y1"] for b in boxes),
    }


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
