"""Each emulated project's categories, label sets and labels, in the shapes API v3 answers.

Every project gets the same schema, with ids offset by ``project_id * 100`` so ids are unique
across projects like real database ids. As on the real server, a category comes with a label set
of the same id and name (``is_category: true``); the SDK relies on that (``is_default``). A label
set belongs to one category (the SDK makes one object per category and checks that an
annotation's label set is of the document's category); labels may be shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

# (offset, name, data type, has_multiple_top_candidates, field key in content.Layout)
LABELS = (
    (11, "Invoice Number", "Text", False, "invoice_number"),
    (12, "Date", "Date", False, "date"),
    (13, "Total", "Number", False, "total"),
    (14, "IBAN", "Text", True, "iban"),
    (15, "Sender", "Text", False, "sender"),
    (16, "Description", "Text", False, "description"),
    (17, "Amount", "Number", False, "amount"),
)
# (offset, name, label offsets, has_multiple_annotation_sets, is a category's own label set)
LABEL_SETS = (
    (1, "Invoice", (11, 12, 13, 14), False, True),
    (2, "Receipt", (15, 12, 13), False, True),
    (3, "Letter", (15, 12), False, True),
    (4, "Line Item", (16, 17), True, False),
)
# (offset, name, kind found by content.kind_of, label set offsets)
CATEGORIES = (
    (1, "Invoice", "invoice", (1, 4)),
    (2, "Receipt", "receipt", (2,)),
    (3, "Letter", "letter", (3,)),
)
THRESHOLD = 0.1


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    data_type: str
    has_multiple_top_candidates: bool
    key: str  # which content.Field carries its value


@dataclass(frozen=True)
class LabelSet:
    id: int
    name: str
    labels: tuple[Label, ...]
    has_multiple_annotation_sets: bool
    is_category: bool
    categories: tuple[int, ...]


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    kind: str
    label_sets: tuple[LabelSet, ...]


@dataclass(frozen=True)
class Schema:
    project: int
    categories: tuple[Category, ...]
    label_sets: tuple[LabelSet, ...]
    labels: tuple[Label, ...]

    def category(self, category_id: int | None) -> Category | None:
        return next((c for c in self.categories if c.id == category_id), None)

    def category_for_kind(self, kind: str) -> Category | None:
        return next((c for c in self.categories if c.kind == kind), None)

    def label(self, id_or_name: int | str) -> Label | None:
        return next((x for x in self.labels if id_or_name in (x.id, x.name)), None)

    # -- API bodies ------------------------------------------------------------------------

    def categories_json(self) -> list[dict]:
        """``GET /api/v3/categories/?project=``: what ``Project.get_categories`` parses."""
        return [
            {
                "id": c.id,
                "project": self.project,
                "name": c.name,
                "api_name": api_name(c.name),
                "description": "",
                "schema": [{**label_set_ref(s), "labels": [label_ref(x) for x in s.labels]} for s in c.label_sets],
            }
            for c in self.categories
        ]

    def label_sets_json(self) -> list[dict]:
        """``GET /api/v3/label-sets/?project=``; the SDK leaves out ``is_category`` ones by default."""
        return [
            {
                **label_set_ref(s),
                "project": self.project,
                "is_category": s.is_category,
                "categories": list(s.categories),
                "labels": [x.id for x in s.labels],
            }
            for s in self.label_sets
        ]

    def labels_json(self) -> list[dict]:
        """``GET /api/v3/labels/?project=``."""
        return [
            {
                **label_ref(x),
                "project": self.project,
                "description": "",
                "label_sets": [s.id for s in self.label_sets if x in s.labels],
            }
            for x in self.labels
        ]


def api_name(name: str) -> str:
    return name.lower().replace(" ", "-")


def label_ref(label: Label) -> dict:
    """A label as nested in categories, annotation sets and annotations."""
    return {
        "id": label.id,
        "name": label.name,
        "api_name": api_name(label.name),
        "data_type": label.data_type,
        "has_multiple_top_candidates": label.has_multiple_top_candidates,
        "threshold": THRESHOLD,
    }


def label_set_ref(label_set: LabelSet) -> dict:
    """A label set as nested in categories, annotation sets and annotations."""
    return {
        "id": label_set.id,
        "name": label_set.name,
        "api_name": api_name(label_set.name),
        "description": "",
        "has_multiple_annotation_sets": label_set.has_multiple_annotation_sets,
    }


@cache
def schema_for(project: int) -> Schema:
    base = project * 100
    labels = {offset: Label(base + offset, name, kind, multi, key) for offset, name, kind, multi, key in LABELS}
    users = {offset: tuple(base + c for c, _, _, sets in CATEGORIES if offset in sets) for offset, *_ in LABEL_SETS}
    label_sets = {
        offset: LabelSet(base + offset, name, tuple(labels[x] for x in members), multi, own, users[offset])
        for offset, name, members, multi, own in LABEL_SETS
    }
    categories = tuple(
        Category(base + offset, name, kind, tuple(label_sets[s] for s in sets))
        for offset, name, kind, sets in CATEGORIES
    )
    return Schema(project, categories, tuple(label_sets.values()), tuple(labels.values()))
