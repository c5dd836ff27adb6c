"""Rich results: the project catalog and its cache, extractions (fields, annotations), redaction,
revisions, the JSON Schema, and the client's result calls against the emulator through the real SDK."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from importlib import resources
from typing import Any

import pytest
from konfuzio_sdk.api import download_file_konfuzio_api

from konfuzio_watch import export
from konfuzio_watch.emulator import NO_CATEGORY_MARKER, SPLIT_MARKER, FaultRule
from konfuzio_watch.emulator import app as emulator_app
from konfuzio_watch.emulator.schema import schema_for
from konfuzio_watch.extractions import build_extractions, references
from konfuzio_watch.files import encode_json
from konfuzio_watch.fingerprint import CONTENT_DETAIL_KEYS, CONTENT_KEYS, content_fingerprint, fingerprint_matches
from konfuzio_watch.journal import Row, State
from konfuzio_watch.konfuzio import ApiError, KonfuzioClient, UploadForm
from konfuzio_watch.policy import Cause, Failure
from konfuzio_watch.project_catalog import CatalogCache, ProjectCatalog, References
from konfuzio_watch.results import build_result, redact_callback_url, web_url
from konfuzio_watch.samples import make_pdf

from .conftest import TOKEN, wait_until
from .helpers import FakeClock, file_of

SECRET = "s3cr3t-callback-token_0123456789abcdefghijklmno"
CALLBACK = f"http://127.0.0.1:9/konfuzio-callback/{SECRET}"  # port 9: refused at once
SCHEMA = json.loads(resources.files("konfuzio_watch").joinpath("data", "result.schema.json").read_text())


def catalog_of(project: int = 1) -> ProjectCatalog:
    """The emulated project's schema, in the shapes the three list endpoints answer."""
    schema = schema_for(project)
    return ProjectCatalog.from_api(project, schema.labels_json(), schema.label_sets_json(), schema.categories_json())


CATALOG = catalog_of(1)


def ann(
    id_: int,
    label: tuple,
    label_set: tuple,
    value: str | None,
    *,
    annotation_set: int = 900,
    normalized: Any = None,
    spans: list[dict] | None = None,
    start: int | None = None,
    page: int = 0,
    is_correct: bool = False,
    revised: bool = False,
    confidence: float | None = 0.9,
) -> dict:
    """An annotation as ``GET /api/v3/annotations/?document=`` lists it. ``label``: (id, name[,
    has_multiple_top_candidates]); ``label_set``: (id, name[, has_multiple_annotation_sets])."""
    start = id_ * 10 if start is None else start
    if spans is None:
        spans = [
            {
                "start_offset": start,
                "end_offset": start + len(value or ""),
                "offset_string": value,
                "page_index": page,
                "x0": 10.0,
                "x1": 50.0,
                "y0": 700.0,
                "y1": 712.0,
            }
        ]
    label_ref = {"id": label[0], "name": label[1], "has_multiple_top_candidates": bool(label[2:] and label[2])}
    set_ref = {
        "id": label_set[0],
        "name": label_set[1],
        "has_multiple_annotation_sets": bool(label_set[2:] and label_set[2]),
    }
    return {
        "id": id_,
        "document": 1,
        "offset_string": value,
        "normalized": normalized,
        "confidence": confidence,
        "is_correct": is_correct,
        "revised": revised,
        "span": spans,
        "annotation_set": annotation_set,
        "label": label_ref,
        "label_set": set_ref,
    }


INVOICE, LINE_ITEM = (101, "Invoice"), (104, "Line Item", True)
NUMBER, DATE, TOTAL, IBAN = (111, "Invoice Number"), (112, "Date"), (113, "Total"), (114, "IBAN", True)
DESCRIPTION, AMOUNT = (116, "Description"), (117, "Amount")
DETAILS = {
    "id": 1,
    "project": 1,
    "category": 101,
    "category_confidence": 0.87,
    "status_data": 2,
    "updated_at": "2026-03-05T10:00:00.000000+00:00",
    "is_reviewed": False,
    "callback_url": CALLBACK,
    "callback_status_code": None,
    "text": "page one\fpage two",
    "pages": [
        {"number": 1, "size": [595, 842], "original_size": [595, 842]},
        {"number": 2, "size": [595, 842], "original_size": [595, 842]},
    ],
    "annotation_sets": [],
}


def invoice_annotations() -> list[dict]:
    return [
        ann(5, TOTAL, INVOICE, "1.234,50", normalized=1234.5, start=500),
        ann(1, DATE, INVOICE, "05.03.2026", normalized="2026-03-05", start=10),
        ann(2, IBAN, INVOICE, "DE02120300000000202051", start=20),
        ann(3, IBAN, INVOICE, "DE02500105170137075030", start=30),
        ann(10, DESCRIPTION, LINE_ITEM, "consulting", annotation_set=901, start=300),
        ann(11, AMOUNT, LINE_ITEM, "1.000,00", normalized=1000.0, annotation_set=901, start=320),
        ann(12, DESCRIPTION, LINE_ITEM, "travel", annotation_set=902, start=400),
        ann(13, AMOUNT, LINE_ITEM, "234,50", normalized=234.5, annotation_set=902, start=420),
    ]


def row_for(details: dict, sha256: str = "ab" * 32) -> Row:
    return Row(
        id=1,
        rel_path=b"in/scan\xff.pdf",
        state=State.EXPORTING,
        size=1234,
        sha256=sha256,
        upload_name="scan_.pdf",
        token_hash=None,
        document_id=details["id"],
        attempts=1,
        next_at=None,
        callback_at=None,
        uploaded_at=1_772_700_000.0,
        final_path=None,
        error=None,
        stage="export",
        project_id=details.get("project"),
        detected_at=1_772_699_990.0,
        updated_at=1_772_700_000.0,
        finished_at=None,
    )


# -- the catalog and its cache ------------------------------------------------------------------------


def test_catalog_names_labels_label_sets_and_categories_by_id():
    assert CATALOG.labels[113].name == "Total" and CATALOG.labels[114].multiple
    assert CATALOG.label_sets[101].name == "Invoice" and not CATALOG.label_sets[101].multiple
    assert CATALOG.label_sets[104].multiple and CATALOG.label_sets[104].label_ids == (116, 117)
    assert CATALOG.categories[101].name == "Invoice" and CATALOG.categories[101].label_set_ids == (101, 104)
    assert CATALOG.has_all([111, 117], [101, 104], [101, 103])
    assert not CATALOG.has_all([999]) and not CATALOG.has_all(label_set_ids=[999])
    assert not CATALOG.has_all(category_ids=[999])
    with pytest.raises(TypeError):
        CATALOG.labels[999] = None  # type: ignore[index]  # shared by workers: read-only


def test_catalog_without_a_category_schema_reads_membership_from_the_label_sets():
    schema = schema_for(1)
    categories = [{k: v for k, v in c.items() if k != "schema"} for c in schema.categories_json()]
    catalog = ProjectCatalog.from_api(1, schema.labels_json(), schema.label_sets_json(), categories)
    assert catalog.categories[101].label_set_ids == (101, 104) and catalog.categories[102].label_set_ids == (102,)


def test_references_are_the_ids_a_document_needs_named():
    details = {
        **DETAILS,
        "annotation_sets": [
            {
                "id": 900,
                "label_set": {"id": 101, "name": "Invoice"},
                "labels": [{"id": 113, "name": "Total", "annotations": [{"id": 5, "offset_string": "1", "span": []}]}],
            }
        ],
    }
    assert references(details) == References(frozenset({113}), frozenset({101}), frozenset({101}))
    assert references(details, invoice_annotations()).label_ids == {112, 113, 114, 116, 117}
    assert references({"category": None}, []) == References()


def test_cache_fetches_once_and_again_only_for_an_unknown_id_after_a_while():
    clock = FakeClock()
    cache = CatalogCache(min_refresh_s=60, clock=clock)
    known, unknown = References(frozenset({113}), frozenset({101}), frozenset({101})), References(frozenset({999}))
    assert cache.needs_refresh(1) and cache.needs_refresh(1, known) and cache.get(1) is None
    cache.put(CATALOG)
    assert not cache.needs_refresh(1, known) and cache.get(1) is CATALOG
    assert cache.needs_refresh(2, known)  # keyed by project
    clock.t += 59
    assert not cache.needs_refresh(1, unknown)  # a label nobody lists must not cost 3 requests per document
    clock.t += 1
    assert cache.needs_refresh(1, unknown) and not cache.needs_refresh(1, known)


def test_two_workers_asking_at_once_cause_one_fetch():
    cache, fetched, release = CatalogCache(), [], threading.Event()
    refs = references(DETAILS, invoice_annotations())

    def fetch(project_id: int) -> ProjectCatalog:
        fetched.append(project_id)
        assert release.wait(10)
        return CATALOG

    got: list[ProjectCatalog] = []
    workers = [threading.Thread(target=lambda: got.append(cache.catalog_for(1, refs, fetch))) for _ in range(2)]
    for worker in workers:
        worker.start()
    wait_until(lambda: fetched, 5, "the first fetch")
    release.set()
    for worker in workers:
        worker.join(10)
    assert fetched == [1] and got == [CATALOG, CATALOG]


def test_a_failed_fetch_propagates_and_the_next_call_tries_again():
    cache = CatalogCache()

    def failing(project_id: int) -> ProjectCatalog:
        raise ApiError(Failure(Cause.UNAVAILABLE, "down"))

    with pytest.raises(ApiError):
        cache.catalog_for(1, References(), failing)
    assert cache.catalog_for(1, References(), lambda project_id: CATALOG) is CATALOG
    with pytest.raises(ValueError, match="project 1 for 2"):
        cache.catalog_for(2, References(), lambda project_id: CATALOG)


# -- extractions ---------------------------------------------------------------------------------------


def test_fields_repeated_labels_line_items_and_missing_labels():
    category, annotations, fields = build_extractions(DETAILS, invoice_annotations(), CATALOG)
    assert category == {"id": 101, "name": "Invoice", "confidence": 0.87}
    assert fields == {
        "Invoice": {
            "Invoice Number": None,  # in the category's schema, not found: None, not a KeyError
            "Date": "2026-03-05",  # normalized where Konfuzio has it
            "Total": 1234.5,
            "IBAN": ["DE02120300000000202051", "DE02500105170137075030"],  # may have several: always a list
        },
        "Line Item": [  # line items: a list of sets, in document order
            {"Description": "consulting", "Amount": 1000.0},
            {"Description": "travel", "Amount": 234.5},
        ],
    }
    assert [a["id"] for a in annotations] == [1, 2, 3, 10, 11, 12, 13, 5]  # document order
    total = annotations[-1]
    assert total == {
        "label_set": "Invoice",
        "label": "Total",
        "value": "1.234,50",
        "normalized": 1234.5,
        "confidence": 0.9,
        "page": 1,
        "bbox": {"x0": 10.0, "y0": 700.0, "x1": 50.0, "y1": 712.0},
        "spans": [
            {
                "page": 1,
                "bbox": {"x0": 10.0, "y0": 700.0, "x1": 50.0, "y1": 712.0},
                "start_offset": 500,
                "end_offset": 508,
            }
        ],
        "revised": False,
        "correct": False,
        "id": 5,
        "label_id": 113,
        "label_set_id": 101,
        "annotation_set_id": 900,
    }


def test_the_shape_of_fields_follows_the_schema_not_the_document():
    one_iban = [
        ann(2, IBAN, INVOICE, "DE02120300000000202051"),
        ann(10, DESCRIPTION, LINE_ITEM, "consulting", annotation_set=901),
    ]
    _, _, fields = build_extractions(DETAILS, one_iban, CATALOG)
    assert fields["Invoice"]["IBAN"] == ["DE02120300000000202051"]
    assert fields["Line Item"] == [{"Description": "consulting", "Amount": None}]
    _, _, fields = build_extractions(DETAILS, [], CATALOG)
    assert fields == {"Invoice": {"Invoice Number": None, "Date": None, "Total": None, "IBAN": []}, "Line Item": []}


def test_several_values_where_the_schema_allows_one_are_all_kept():
    twice = [
        ann(1, TOTAL, INVOICE, "1,00", normalized=1.0),
        ann(2, TOTAL, INVOICE, "2,00", normalized=2.0),
        ann(3, DATE, INVOICE, "x", annotation_set=900),
        ann(4, DATE, INVOICE, "y", annotation_set=907),
    ]
    _, _, fields = build_extractions(DETAILS, twice, None)
    assert fields == {"Invoice": [{"Total": [1.0, 2.0], "Date": "x"}, {"Total": None, "Date": "y"}]}  # a list


def test_without_a_category_or_catalog():
    details = {**DETAILS, "category": None, "category_confidence": None}
    assert build_extractions(details, [], CATALOG) == (None, [], {})
    category, annotations, fields = build_extractions({**DETAILS}, [ann(1, TOTAL, INVOICE, "7,00")], None)
    assert category == {"id": 101, "name": None, "confidence": 0.87}  # no catalog: no name, no skeleton
    assert fields == {"Invoice": {"Total": "7,00"}}  # no normalized value: the text


def test_old_answers_with_bare_ids_take_names_from_the_catalog():
    raw = {
        "id": 7,
        "offset_string": "1,00",
        "normalized": None,
        "label": 113,
        "section_label_id": 101,
        "section": 900,
        "bboxes": [{"start_offset": 3, "end_offset": 7, "page_index": 1, "x0": 1, "x1": 2, "y0": 3, "y1": 4}],
    }
    (entry,) = build_extractions(DETAILS, [raw], CATALOG).annotations
    assert (entry["label"], entry["label_set"], entry["annotation_set_id"], entry["page"]) == (
        "Total",
        "Invoice",
        900,
        2,
    )
    (entry,) = build_extractions(DETAILS, [raw], None).annotations
    assert (entry["label"], entry["label_set"]) == ("label 113", "label set 101")
    renamed = ann(1, (113, "Gesamt"), INVOICE, "1,00")  # the answer's own name is the fresher one
    assert build_extractions(DETAILS, [renamed], CATALOG).fields["Invoice"]["Gesamt"] == "1,00"


def test_a_value_of_several_spans_has_the_box_around_them_on_its_first_page():
    spans = [
        {
            "start_offset": 40,
            "end_offset": 52,
            "offset_string": "Acme Widgets",
            "page_index": 0,
            "x0": 100.0,
            "x1": 172.0,
            "y0": 500.0,
            "y1": 511.2,
        },
        {
            "start_offset": 53,
            "end_offset": 65,
            "offset_string": "Hauptstr. 1",
            "page_index": 0,
            "x0": 100.0,
            "x1": 166.0,
            "y0": 486.0,
            "y1": 497.2,
        },
        {
            "start_offset": 66,
            "end_offset": 77,
            "offset_string": "10115 Berlin",
            "page_index": 1,
            "x0": 90.0,
            "x1": 162.0,
            "y0": 800.0,
            "y1": 811.2,
        },
    ]
    address = ann(1, (118, "Address"), INVOICE, None, spans=spans)
    (entry,) = build_extractions(DETAILS, [address], None).annotations
    assert entry["page"] == 1 and entry["bbox"] == {"x0": 100.0, "y0": 486.0, "x1": 172.0, "y1": 511.2}
    assert [(s["page"], s["start_offset"]) for s in entry["spans"]] == [(1, 40), (1, 53), (2, 66)]
    assert entry["value"] == "Acme Widgets Hauptstr. 1 10115 Berlin"  # no offset_string: the spans' own
    legacy = {**address, "offset_string": ["Acme Widgets", "Hauptstr. 1"]}
    assert build_extractions(DETAILS, [legacy], None).annotations[0]["value"] == "Acme Widgets Hauptstr. 1"
    drawn = {
        **ann(2, TOTAL, INVOICE, "9"),
        "span": [{"start_offset": 1, "end_offset": 2}],
        "selection_bbox": {"page_index": 1, "x0": 1, "x1": 2, "y0": 3, "y1": 4},
    }
    (entry,) = build_extractions(DETAILS, [drawn], None).annotations
    assert entry["page"] == 2 and entry["bbox"] == {"x0": 1, "y0": 3, "x1": 2, "y1": 4}
    assert entry["spans"] == [{"page": None, "bbox": None, "start_offset": 1, "end_offset": 2}]


def test_a_value_a_person_rejected_is_no_result():
    values = [
        ann(1, TOTAL, INVOICE, "1,00", revised=True, is_correct=False),
        ann(2, TOTAL, INVOICE, "2,00", revised=True, is_correct=True),
    ]
    _, annotations, fields = build_extractions(DETAILS, values, CATALOG)
    assert [a["id"] for a in annotations] == [2] and annotations[0]["correct"] and annotations[0]["revised"]
    assert fields["Invoice"]["Total"] == "2,00"


def test_the_annotations_endpoint_wins_over_the_details_never_mixed():
    nested = {
        **DETAILS,
        "annotation_sets": [
            {
                "id": 900,
                "label_set": {"id": 101, "name": "Invoice", "has_multiple_annotation_sets": False},
                "labels": [{"id": 113, "name": "Total", "annotations": [ann(5, TOTAL, INVOICE, "old")]}],
            }
        ],
    }
    assert build_extractions(nested, None, CATALOG).fields["Invoice"]["Total"] == "old"
    assert build_extractions(nested, [ann(5, TOTAL, INVOICE, "new")], CATALOG).fields["Invoice"]["Total"] == "new"
    assert build_extractions(nested, [], CATALOG).fields["Invoice"]["Total"] is None  # fetched, and empty


def test_same_names_are_told_apart_by_id():
    values = [
        ann(1, TOTAL, INVOICE, "1"),
        ann(2, (199, "Total"), INVOICE, "2"),
        ann(3, TOTAL, (105, "Invoice"), "3", annotation_set=950),
    ]
    assert build_extractions(DETAILS, values, None).fields == {
        "Invoice": {"Total": "1", "Total (199)": "2"},
        "Invoice (105)": {"Total": "3"},
    }


# -- redaction, link, the result, revisions -------------------------------------------------------------


@pytest.mark.parametrize(
    "url, redacted",
    [
        (CALLBACK, "http://127.0.0.1:9/konfuzio-callback/<redacted>"),
        (f"https://abc.ngrok.app/konfuzio-callback/{SECRET}/", "https://abc.ngrok.app/konfuzio-callback/<redacted>/"),
        (f"https://user:pw@host/x/{SECRET}?t={SECRET}#{SECRET}", "https://host/x/<redacted>"),
        (None, None),
        ("", ""),
    ],
)
def test_callback_token_is_redacted(url, redacted):
    details = {**DETAILS, "callback_url": url}
    out = redact_callback_url(details)
    assert out["callback_url"] == redacted and details["callback_url"] == url  # a copy
    assert {k: v for k, v in out.items() if k != "callback_url"} == {
        k: v for k, v in details.items() if k != "callback_url"
    }


def test_web_url_is_the_documents_page_in_the_web_app():
    assert web_url("https://app.konfuzio.com/", 4711) == "https://app.konfuzio.com/d/4711/"
    assert web_url("http://127.0.0.1:8000", 1) == "http://127.0.0.1:8000/d/1/"


def test_build_result_extends_todays_result_and_carries_no_token():
    details, now = copy.deepcopy(DETAILS), 1_772_700_100.0
    bbox = {"0": {"x0": 1, "x1": 2, "y0": 3, "y1": 4, "page_number": 1}}
    result = build_result(
        row_for(details),
        details,
        bbox,
        now,
        annotations=invoice_annotations(),
        catalog=CATALOG,
        host="https://app.konfuzio.com",
        revision=3,
    )
    today = export.build_result(row_for(details), details, bbox, now)
    assert set(today) < set(result) and {k: result[k] for k in today if k != "konfuzio"} == {
        k: v for k, v in today.items() if k != "konfuzio"
    }
    assert result["konfuzio"] == redact_callback_url(details) and details == DETAILS  # input untouched
    assert SECRET not in json.dumps(result)
    assert (result["revision"], result["updated_at"], result["web_url"]) == (
        3,
        DETAILS["updated_at"],
        "https://app.konfuzio.com/d/1/",
    )
    assert result["fields"]["Invoice"]["Total"] == 1234.5 and result["category"]["name"] == "Invoice"
    assert export.result_is_for(row_for(details), result)
    lean = build_result(row_for(details), details, bbox, now, include_bbox=False)
    assert "bbox" not in lean and lean["web_url"] is None and lean["revision"] == 1
    for bad in (0, -1, 1.0, True, "2"):
        with pytest.raises(ValueError, match="revision"):
            build_result(row_for(details), details, None, now, revision=bad)


def test_a_fingerprint_stored_by_an_earlier_version_still_recognises_its_content():
    """Rows exported before the fingerprint's encoding changed keep their digest: a callback sent
    again for their unchanged document must not make a new revision (nor a changed one be missed)."""

    def legacy(result: dict) -> str:  # how 0.1.0 computed it: json, sorted keys, ASCII, no spaces
        details = result["konfuzio"]
        content = {k: result[k] for k in CONTENT_KEYS if k in result}
        content["konfuzio"] = {k: details.get(k) for k in CONTENT_DETAIL_KEYS}
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    first = build_result(row_for(DETAILS), DETAILS, None, 1.0, annotations=invoice_annotations(), catalog=CATALOG)
    changed = build_result(
        row_for(DETAILS), {**DETAILS, "text": "other"}, None, 1.0, annotations=invoice_annotations(), catalog=CATALOG
    )
    assert fingerprint_matches(first, legacy(first))
    assert not fingerprint_matches(changed, legacy(first))
    assert fingerprint_matches(first, content_fingerprint(first))
    assert not fingerprint_matches(changed, content_fingerprint(first))
    assert not fingerprint_matches(first, None)


def test_fingerprint_ignores_when_and_how_often_and_sees_what_changed():
    def result(details: dict, annotations: list[dict], now: float = 1_772_700_100.0, revision: int = 1) -> dict:
        return build_result(
            row_for(details),
            details,
            None,
            now,
            annotations=annotations,
            catalog=CATALOG,
            host="https://h",
            revision=revision,
        )

    first = result(DETAILS, invoice_annotations())
    again = result(
        {**DETAILS, "callback_status_code": 202, "updated_at": "2026-03-06T00:00:00+00:00"},
        invoice_annotations(),
        now=1_772_800_000.0,
        revision=2,
    )
    assert content_fingerprint(first) == content_fingerprint(again)
    read_back = json.loads(encode_json(first))  # what the daemon finds in done/
    assert content_fingerprint(read_back) == content_fingerprint(first)
    corrected = invoice_annotations()
    corrected[0].update(offset_string="999,00", normalized=999.0, revised=True, is_correct=True)
    changes = [
        result(DETAILS, corrected),
        result({**DETAILS, "category": 102}, invoice_annotations()),
        result({**DETAILS, "is_reviewed": True}, invoice_annotations()),
        result({**DETAILS, "text": "other"}, invoice_annotations()),
        build_result(
            row_for(DETAILS), DETAILS, None, 1.0, annotations=invoice_annotations(), catalog=CATALOG, include_bbox=False
        ),
    ]
    prints = {content_fingerprint(first), *map(content_fingerprint, changes)}
    assert len(prints) == 1 + len(changes)


# -- the JSON Schema ------------------------------------------------------------------------------------


def check_schema(instance: Any, schema: dict, root: dict = SCHEMA, where: str = "$") -> None:
    """The subset of JSON Schema that result.schema.json uses, for when jsonschema is not installed."""
    if "$ref" in schema:
        target: Any = root
        for key in schema["$ref"].removeprefix("#/").split("/"):
            target = target[key]
        check_schema(instance, target, root, where)
    if "oneOf" in schema:
        matches = 0
        for option in schema["oneOf"]:
            try:
                check_schema(instance, option, root, where)
                matches += 1
            except AssertionError:
                pass
        assert matches == 1, f"{where}: {matches} of oneOf match {instance!r:.200}"
    types = schema.get("type")
    if types is not None:
        kinds = {
            "object": dict,
            "array": list,
            "string": str,
            "boolean": bool,
            "null": type(None),
            "integer": int,
            "number": (int, float),
        }
        ok = any(
            isinstance(instance, kinds[t]) and not (t in ("integer", "number") and isinstance(instance, bool))
            for t in ([types] if isinstance(types, str) else types)
        )
        assert ok, f"{where}: {instance!r:.200} is not {types}"
    if isinstance(instance, dict):
        for key in schema.get("required", ()):
            assert key in instance, f"{where}: {key} missing"
        for key, value in instance.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties", True))
            if isinstance(sub, dict):
                check_schema(value, sub, root, f"{where}.{key}")
    if isinstance(instance, list):
        assert schema.get("minItems", 0) <= len(instance) <= schema.get("maxItems", len(instance)), where
        for index, item in enumerate(instance):
            if "items" in schema:
                check_schema(item, schema["items"], root, f"{where}[{index}]")
    if isinstance(instance, int | float) and not isinstance(instance, bool) and "minimum" in schema:
        assert instance >= schema["minimum"], where
    if isinstance(instance, str) and "pattern" in schema:
        assert re.search(schema["pattern"], instance), f"{where}: {instance!r} !~ {schema['pattern']}"


def validate_result(result: dict) -> None:
    try:
        import jsonschema
    except ImportError:
        check_schema(result, SCHEMA)
        return
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(result), key=lambda e: list(e.path))
    assert not errors, f"{errors[0].json_path}: {errors[0].message}"


def test_the_schema_is_a_valid_2020_12_schema_that_says_what_every_key_is():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(SCHEMA["properties"]) >= set(SCHEMA["required"]) | {"bbox"}
    assert all(p.get("description") for p in SCHEMA["properties"].values())
    assert all(p.get("description") for p in SCHEMA["$defs"]["annotation"]["properties"].values())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_schema_refuses_what_it_should():
    good = build_result(row_for(DETAILS), DETAILS, None, 1.0, annotations=invoice_annotations(), catalog=CATALOG)
    validate_result(good)
    bad = [
        {**good, "revision": 0},
        {**good, "fields": {"Invoice": {"Total": {"nested": 1}}}},
        {**good, "annotations": [{**good["annotations"][0], "page": "1"}]},
        {**good, "konfuzio": {**good["konfuzio"], "callback_url": CALLBACK}},  # a token must never be there
        {k: v for k, v in good.items() if k != "fields"},
    ]
    for result in bad:
        with pytest.raises(AssertionError):
            validate_result(result)


# -- against the emulator, through the real SDK --------------------------------------------------------


@pytest.fixture
def client(emulator):
    made = KonfuzioClient(emulator.url, TOKEN, timeout_s=10)
    yield made
    made.close()


def done_document(emulator, client: KonfuzioClient, data: bytes, name: str = "scan.pdf") -> dict:
    doc_id = client.upload(io.BytesIO(data), name, UploadForm(1, CALLBACK))["id"]
    assert emulator.wait_idle(10)
    return client.document(doc_id)


@pytest.mark.slow
def test_every_request_carries_the_session_settings_and_a_rotated_token(emulator, client):
    """The client sends through the session with its settings prepared once (``_send``): the same
    headers as ``session.get``, cookies the server set, and a rotated token from the next request on."""
    url = f"{emulator.url}/api/v3/projects/1/"
    client.session.cookies.set("lb", "node-2")  # as a load balancer's Set-Cookie would
    ours, sessions = client._send("GET", url), client.session.get(url)
    assert ours.status_code == sessions.status_code == 200
    assert dict(ours.request.headers) == dict(sessions.request.headers)
    assert ours.request.headers["Cookie"] == "lb=node-2"
    with pytest.raises(ApiError) as caught:
        client.document(999_999)
    assert caught.value.failure.cause == Cause.NOT_FOUND
    client.set_token("a-rotated-token")
    with pytest.raises(ApiError) as caught:
        client.document(999_999)
    assert caught.value.failure.status == 401, "the new token, not the one the first request was prepared with"


@pytest.mark.slow
def test_project_lists_through_the_sdk(emulator, client):
    labels, label_sets = client.project_labels(1), client.project_label_sets(1)
    categories = client.project_categories(1)
    schema = schema_for(1)
    assert [x["id"] for x in labels] == [x.id for x in schema.labels]
    assert [x["id"] for x in label_sets] == [x.id for x in schema.label_sets]  # the categories' own ones too
    assert [x["id"] for x in categories] == [x.id for x in schema.categories]
    assert client.project_catalog(1) == CATALOG
    assert client.project_catalog(2).has_all([211], [201], [201])
    with pytest.raises(ApiError) as raised:
        client.project_labels(3)  # no such project: the API refuses the filter
    assert raised.value.failure.cause == Cause.INVALID


@pytest.mark.slow
def test_annotations_of_a_document_come_in_pages_and_all_of_them(emulator, client, monkeypatch):
    details = done_document(emulator, client, file_of("invoice", pages=2, tag="pages", ibans=2))
    whole = client.annotations(details["id"])
    assert len(whole) >= 6 and build_extractions(details, whole, CATALOG) == build_extractions(details, None, CATALOG)
    monkeypatch.setattr(emulator_app, "MAX_PAGE_LIMIT", 2)  # as a server whose page size is capped
    emulator.reset_request_stats()
    assert client.annotations(details["id"]) == whole
    assert emulator.request_stats()["annotations"].count == (len(whole) + 1) // 2
    assert client.annotations(10_000) == []
    for body, cause in (({"count": 1}, Cause.INTERNAL), ("<html>maintenance</html>", Cause.TRANSIENT)):
        emulator.knobs.fault_rules.append(FaultRule("GET", r"/annotations/?$", 200, body=body, count=1))
        with pytest.raises(ApiError) as raised:  # a page without "results", a body that is not JSON
            client.annotations(details["id"])
        assert raised.value.failure.cause == cause


@pytest.mark.slow
def test_searchable_pdf_is_streamed_to_a_file(emulator, client, tmp_path):
    details = done_document(emulator, client, make_pdf(3, label="streamed"))
    target = tmp_path / "out" / "scan.pdf"
    target.parent.mkdir()
    size = client.download_searchable_pdf(details["id"], target)
    data = target.read_bytes()
    assert size == len(data) and data == download_file_konfuzio_api(details["id"], session=client.session)
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF") and data.count(b"/Type /Page ") == 3
    assert os.listdir(target.parent) == ["scan.pdf"]  # no temporary file left

    target.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError):
        client.download_searchable_pdf(details["id"], target)
    assert target.read_bytes() == b"someone else's file" and os.listdir(target.parent) == ["scan.pdf"]
    assert client.download_searchable_pdf(details["id"], target, replace=True) == size
    assert target.read_bytes() == data


@pytest.mark.slow
def test_searchable_pdf_errors_are_classified_and_leave_no_file(emulator, client, tmp_path):
    emulator.knobs.processing_s = 60  # still queuing for OCR
    waiting = client.upload(io.BytesIO(make_pdf(1, label="not yet")), "w.pdf", UploadForm(1, CALLBACK))["id"]
    cases = [
        (waiting, [], Cause.NOT_FOUND, "not available yet"),
        (99_999, [], Cause.NOT_FOUND, "Not found"),
        (
            waiting,
            [FaultRule("GET", r"^/doc/show/", 200, body="<html><form>Login</form></html>")],
            Cause.TRANSIENT,
            "not a PDF",
        ),
        (
            waiting,
            [FaultRule("GET", r"^/doc/show/", 200, body="%PDF-1.4 cut", headers={"Content-Length": "100000"})],
            Cause.TRANSIENT,
            "",
        ),
        (waiting, [FaultRule("GET", r"^/doc/show/", 503)], Cause.UNAVAILABLE, "503"),
    ]
    for doc_id, rules, cause, message in cases:
        emulator.knobs.fault_rules = rules
        with pytest.raises(ApiError) as raised:
            client.download_searchable_pdf(doc_id, tmp_path / "scan.pdf")
        assert raised.value.failure.cause == cause and message in str(raised.value), (rules, raised.value)
        assert os.listdir(tmp_path) == []
    assert raised.value.status == 503


DOWNLOAD = """
import os, sys, tracemalloc
os.environ["LOG_TO_FILE"] = "False"
from pathlib import Path
from konfuzio_sdk.api import download_file_konfuzio_api
from konfuzio_watch.konfuzio import KonfuzioClient
client = KonfuzioClient(sys.argv[1], sys.argv[2], timeout_s=30)
doc_id, folder = int(sys.argv[3]), Path(sys.argv[4])
client.download_searchable_pdf(doc_id, folder / "warm-up.pdf")  # imports, connection pool
tracemalloc.start()
size = client.download_searchable_pdf(doc_id, folder / "streamed.pdf")
streamed = tracemalloc.get_traced_memory()[1]
tracemalloc.reset_peak()
whole = len(download_file_konfuzio_api(doc_id, session=client.session))
print(size, streamed, whole, tracemalloc.get_traced_memory()[1])
"""


@pytest.mark.slow
def test_searchable_pdf_download_memory_does_not_grow_with_the_file(emulator, client, tmp_path):
    """Measured in a process of its own: the emulator in this one holds each PDF it serves."""
    details = done_document(emulator, client, make_pdf(2500, label="a long scan"))
    out = subprocess.run(
        [sys.executable, "-c", DOWNLOAD, emulator.url, TOKEN, str(details["id"]), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    size, streamed_peak, whole, sdk_peak = map(int, out.stdout.split())
    assert size == whole > 2_000_000
    assert sdk_peak > size  # the check can see a whole file in memory ...
    assert streamed_peak < size / 5, (streamed_peak, size)  # ... and streaming holds a chunk or so
    assert (
        hashlib.sha256((tmp_path / "streamed.pdf").read_bytes()).digest()
        == hashlib.sha256((tmp_path / "warm-up.pdf").read_bytes()).digest()
    )


@pytest.mark.slow
def test_results_of_every_kind_of_document_match_the_schema(emulator, client):
    """Invoice with two IBANs and line items, receipt, letter (PNG), no category, reviewed with a
    correction, confirmed split, seeded: each result valid, and what it says is the document's own."""
    cache = CatalogCache()
    samples = {
        "invoice.pdf": file_of("invoice", pages=3, tag="schema", ibans=2),
        "receipt.pdf": file_of("receipt", pages=2, tag="schema"),
        "letter.png": file_of("letter", tag="schema", png=True),
        "nothing.pdf": make_pdf(1, label="schema") + NO_CATEGORY_MARKER,
        "split.pdf": make_pdf(2, label="schema split") + SPLIT_MARKER,
    }
    docs = {
        name: client.upload(io.BytesIO(data), name, UploadForm(1, CALLBACK))["id"] for name, data in samples.items()
    }
    assert emulator.wait_idle(10)
    wait_until(lambda: client.document(docs["split.pdf"])["status_data"] == 41, 10, "status 41")
    emulator.confirm_split(docs["split.pdf"])
    (seeded,) = emulator.seed_documents(1, 1)
    docs["seeded.pdf"] = seeded
    assert emulator.wait_idle(10)

    def export_of(doc_id: int, revision: int = 1, **kwargs: Any) -> dict:
        details, annotations = client.document(doc_id), client.annotations(doc_id)
        catalog = cache.catalog_for(1, references(details, annotations), client.project_catalog)
        bbox = client.bbox(doc_id)["bbox"]
        result = build_result(
            row_for(details),
            details,
            bbox,
            1_772_700_100.0,
            annotations=annotations,
            catalog=catalog,
            host=emulator.url,
            revision=revision,
            **kwargs,
        )
        validate_result(result)
        validate_result(json.loads(encode_json(result)))
        assert SECRET not in encode_json(result).decode()
        return result

    results = {name: export_of(doc_id) for name, doc_id in docs.items()}
    invoice = results["invoice.pdf"]
    assert invoice["category"]["name"] == "Invoice" and len(invoice["fields"]["Invoice"]["IBAN"]) == 2
    assert invoice["fields"]["Invoice"]["Invoice Number"] in invoice["text"]
    assert invoice["fields"]["Invoice"]["Total"] == pytest.approx(
        sum(i["Amount"] for i in invoice["fields"]["Line Item"])
    )
    for a in invoice["annotations"]:
        (span,) = a["spans"]
        assert invoice["text"][span["start_offset"] : span["end_offset"]] == a["value"]
        assert invoice["text"][: span["start_offset"]].count("\f") + 1 == a["page"]
    assert results["receipt.pdf"]["category"]["name"] == "Receipt"
    assert set(results["letter.png"]["fields"]) == {"Letter"}
    assert results["nothing.pdf"]["category"] is None and results["nothing.pdf"]["fields"] == {}
    assert results["split.pdf"]["status_data"] == 2 and results["seeded.pdf"]["annotations"]
    assert results["invoice.pdf"]["web_url"] == f"{emulator.url}/d/{docs['invoice.pdf']}/"
    assert cache.get(1) is not None

    emulator.review(docs["invoice.pdf"], changes={"Total": "999,00"})
    assert emulator.wait_idle(10)
    reviewed = export_of(docs["invoice.pdf"], revision=2)
    assert reviewed["fields"]["Invoice"]["Total"] == 999.0 and reviewed["konfuzio"]["is_reviewed"]
    assert all(a["revised"] and a["correct"] for a in reviewed["annotations"])
    assert content_fingerprint(reviewed) != content_fingerprint(invoice)
    assert content_fingerprint(export_of(docs["invoice.pdf"], revision=3)) == content_fingerprint(reviewed)
    lean = export_of(docs["receipt.pdf"], include_bbox=False)
    assert "bbox" not in lean
