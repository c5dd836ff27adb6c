"""The emulated AI: a category and annotation sets for a document, from its layout.

Deterministic per file (values, offsets, confidences come from the text and the sha256), so a test
can prove that each document's results are its own. Ids come from the caller's allocator.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping

from konfuzio_watch.emulator.content import FileFacts, Layout, PageGeometry, span_box
from konfuzio_watch.emulator.schema import Label, Schema, label_ref, label_set_ref

ORIGIN = "extraction_ai"
_GERMAN_NUMBER = re.compile(r"^-?\d{1,3}(?:\.\d{3})*,\d+$|^-?\d+,\d+$")
_GERMAN_DATE = re.compile(r"^(\d{2})\.(\d{2})\.(\d{4})$")


def categorize(
    facts: FileFacts, kind: str, schema: Schema, uncategorized_share: float = 0.0
) -> tuple[int | None, float | None]:
    """(category id, confidence) the emulated categorization AI finds for a file of this ``kind``
    (``content.kind_of``); (None, None) for no category.

    ``uncategorized_share`` of documents (chosen by sha256, so the same file always gets the same
    answer) get no category even though their text looks like one.
    """
    if _unit(facts.sha256, "uncategorized") < uncategorized_share:
        return None, None
    category = schema.category_for_kind(kind)
    if category is None:
        return None, None
    return category.id, round(0.6 + 0.39 * _unit(facts.sha256, "category"), 4)


def annotation_sets(
    *,
    doc_id: int,
    digest: str,
    layout: Layout,
    pages: list[PageGeometry],
    schema: Schema,
    category_id: int | None,
    version: int,
    next_id: Callable[[], int],
    now: str,
    keep: Iterable[dict] = (),
) -> list[dict]:
    """Annotation sets in the shape of document details' ``annotation_sets``.

    ``keep``: annotations of an earlier extraction that a person revised; re-extraction keeps them
    (same id and value) in place of what it finds at the same label and offset.
    """
    category = schema.category(category_id)
    if category is None:
        return []
    kept = {(a["_label"], a["span"][0]["start_offset"]): a for a in keep}
    out = []
    for label_set in category.label_sets:
        groups = sorted({f.group for f in layout.fields if f.group}) if label_set.has_multiple_annotation_sets else [0]
        for group in groups:
            labels = []
            for label in label_set.labels:
                fields = [f for f in layout.fields if f.key == label.key and f.group == group]
                annotations = []
                for index, field in enumerate(fields):
                    previous = kept.get((label.id, field.start))
                    if previous is not None:
                        annotations.append({k: v for k, v in previous.items() if k != "_label"})
                        continue
                    box = span_box(pages, field.start, field.end)
                    confidence = round(0.5 + 0.49 * _unit(digest, f"{label.id}:{group}:{index}:{version}"), 4)
                    annotations.append(
                        _annotation(
                            next_id(),
                            doc_id,
                            field.value,
                            field.normalized,
                            field.start,
                            field.end,
                            box,
                            confidence,
                            now,
                        )
                    )
                labels.append({**label_ref(label), "annotations": annotations})
            if any(entry["annotations"] for entry in labels):
                out.append({"id": next_id(), "label_set": label_set_ref(label_set), "labels": labels})
    return out


def _annotation(
    ann_id: int,
    doc_id: int,
    value: str,
    normalized: object,
    start: int,
    end: int,
    box: dict,
    confidence: float,
    now: str,
) -> dict:
    span = {"start_offset": start, "end_offset": end, "offset_string": value, "offset_string_original": value, **box}
    selection = {k: box[k] for k in ("page_index", "x0", "x1", "y0", "y1", "top", "bottom")}
    return {
        "id": ann_id,
        "document": doc_id,
        "offset_string": value,
        "offset_string_original": value,
        "normalized": normalized,
        "confidence": confidence,
        "is_correct": False,
        "revised": False,
        "revised_by": None,
        "created_by": None,
        "custom_offset_string": False,
        "translated_string": None,
        "origin": ORIGIN,
        "span": [span],
        "selection_bbox": selection,
        "created_at": now,
        "updated_at": now,
    }


def flat_annotations(sets: list[dict]) -> list[dict]:
    """The ``GET /api/v3/annotations/?document=`` view: each annotation with its label, label set
    and annotation set, as ``Document.get_annotations`` in the SDK parses them."""
    out = []
    for annotation_set in sets:
        for label in annotation_set["labels"]:
            ref = {k: v for k, v in label.items() if k != "annotations"}
            for annotation in label["annotations"]:
                out.append(
                    {
                        **copy.deepcopy(annotation),
                        "annotation_set": annotation_set["id"],
                        "label": dict(ref),
                        "label_set": dict(annotation_set["label_set"]),
                    }
                )
    return out


def review(sets: list[dict], changes: Mapping[int | str, str], reviewer: str, now: str, schema: Schema) -> None:
    """In place: a person accepts every annotation and corrects the values in ``changes``
    (label id or name -> new value; the label's first annotation gets it)."""
    targets: dict[int, tuple[Label, str]] = {}
    for key, value in changes.items():
        label = schema.label(int(key) if isinstance(key, str) and key.isdigit() else key)
        if label is None:
            raise ValueError(f"no label {key!r} in project {schema.project}")
        targets[label.id] = (label, str(value))
    for annotation_set in sets:
        for entry in annotation_set["labels"]:
            for index, annotation in enumerate(entry["annotations"]):
                annotation.update(is_correct=True, revised=True, revised_by=reviewer, updated_at=now)
                if index == 0 and entry["id"] in targets:
                    label, value = targets.pop(entry["id"])
                    annotation.update(
                        offset_string=value, normalized=normalize(value, label.data_type), custom_offset_string=True
                    )
    if targets:
        names = ", ".join(label.name for label, _ in targets.values())
        raise ValueError(f"the document has no annotation to change for: {names}")


def normalize(value: str, data_type: str) -> str | float:
    """What the server stores in ``normalized``: dates as ISO, German numbers as floats."""
    if data_type == "Date" and (match := _GERMAN_DATE.match(value.strip())):
        day, month, year = match.groups()
        return f"{year}-{month}-{day}"
    if data_type == "Number" and _GERMAN_NUMBER.match(value.strip()):
        return float(value.strip().replace(".", "").replace(",", "."))
    return value


def revised_annotations(sets: list[dict]) -> list[dict]:
    """The revised annotations of ``sets``, each tagged with its label id (for ``keep``)."""
    return [
        {**annotation, "_label": entry["id"]}
        for annotation_set in sets
        for entry in annotation_set["labels"]
        for annotation in entry["annotations"]
        if annotation["revised"]
    ]


def _unit(digest: str, salt: str) -> float:
    """A number in [0, 1) fixed by the digest and the salt."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{digest}".encode()).digest()[:8], "big") / 2**64
