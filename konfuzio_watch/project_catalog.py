"""A project's schema by id: its labels, label sets and categories (``ProjectCatalog``), fetched
once per project and again only when a document names an id it lacks (``CatalogCache``); and how
ids and names are read from the API's answers. No I/O of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .clock import Clock, SteadyClock


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
    def from_api(
        cls, project_id: int, labels: Iterable[dict], label_sets: Iterable[dict], categories: Iterable[dict]
    ) -> ProjectCatalog:
        """Read the three lists as the API gives them; entries without an int ``id`` are skipped."""
        label_map = {
            x["id"]: Label(
                x["id"], str(x.get("name") or f"label {x['id']}"), bool(x.get("has_multiple_top_candidates"))
            )
            for x in labels
            if is_id(x.get("id"))
        }
        set_list = [x for x in label_sets if is_id(x.get("id"))]
        category_list = [x for x in categories if is_id(x.get("id"))]
        set_map = {
            x["id"]: LabelSet(
                x["id"],
                str(x.get("name") or f"label set {x['id']}"),
                bool(x.get("has_multiple_annotation_sets")),
                ids_of(x.get("labels")),
            )
            for x in set_list
        }
        category_map = {}
        for x in category_list:
            schema = x.get("schema")
            if isinstance(schema, list):  # the category's own list of its label sets
                members = ids_of(schema)
            else:  # else each label set names its categories
                members = tuple(s["id"] for s in set_list if x["id"] in ids_of(s.get("categories")))
            category_map[x["id"]] = Category(x["id"], str(x.get("name") or f"category {x['id']}"), members)
        return cls(project_id, MappingProxyType(label_map), MappingProxyType(set_map), MappingProxyType(category_map))

    def has_all(
        self, label_ids: Iterable[int] = (), label_set_ids: Iterable[int] = (), category_ids: Iterable[int] = ()
    ) -> bool:
        """Does the catalog know every one of these ids? If not, it is older than the project's schema."""
        return (
            all(i in self.labels for i in label_ids)
            and all(i in self.label_sets for i in label_set_ids)
            and all(i in self.categories for i in category_ids)
        )


@dataclass(frozen=True)
class References:
    """The ids of labels, label sets and categories one document's results refer to."""

    label_ids: frozenset[int] = frozenset()
    label_set_ids: frozenset[int] = frozenset()
    category_ids: frozenset[int] = frozenset()


class CatalogCache:
    """One ``ProjectCatalog`` per project, shared by the workers.

    Fetched once per project, fetched again when a document refers to an id the catalog does not
    know (a label added since), but not more often than ``min_refresh_s``: an id the lists never
    show (a label deleted since) must not cost three requests per document. Thread-safe; with
    ``catalog_for`` only one worker fetches a project at a time, the others wait for its answer.
    """

    def __init__(self, min_refresh_s: float = 60.0, clock: Clock | None = None) -> None:
        self._min_refresh_s = min_refresh_s
        self._clock = clock or SteadyClock()  # steps like the monotonic clock
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[ProjectCatalog, float]] = {}
        self._fetching: dict[int, threading.Lock] = {}

    def get(self, project_id: int) -> ProjectCatalog | None:
        with self._lock:
            entry = self._entries.get(project_id)
        return entry[0] if entry else None

    def put(self, catalog: ProjectCatalog) -> None:
        with self._lock:
            self._entries[catalog.project_id] = (catalog, self._clock.now())

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
        return self._clock.now() - fetched_at >= self._min_refresh_s

    def catalog_for(self, project_id: int, refs: References, fetch: Callable[[int], ProjectCatalog]) -> ProjectCatalog:
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


def is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def id_of(ref: Any) -> int | None:
    """The id of a nested object (``{"id": 12, ...}``) or of a bare id (older answers)."""
    value = ref.get("id") if isinstance(ref, dict) else ref
    return value if is_id(value) else None


def ids_of(items: Any) -> tuple[int, ...]:
    if not isinstance(items, list):
        return ()
    return tuple(i for i in (id_of(x) for x in items) if i is not None)


def name_in(ref: Any) -> str | None:
    name = ref.get("name") if isinstance(ref, dict) else None
    return name if isinstance(name, str) and name else None
