"""The emulator's results through the real SDK over loopback HTTP: categories, annotations, the
searchable PDF, review, re-extraction, status 41, and a project of 50,000 seeded documents."""

from __future__ import annotations

import hashlib
import time
import tracemalloc

import pytest
import requests
from konfuzio_sdk.api import (
    download_file_konfuzio_api,
    get_document_annotations,
    get_document_bbox,
    get_document_details,
    get_meta_of_files,
    get_project_categories,
)

from konfuzio_watch.emulator import NO_CATEGORY_MARKER, SPLIT_MARKER, NotAllowed, ocr_text_for
from konfuzio_watch.emulator.content import facts_of, layout_for
from konfuzio_watch.samples import make_pdf, make_png

from .conftest import wait_until
from .helpers import api, file_of, pdf_page_texts, pdftotext_pages, upload

pytestmark = pytest.mark.slow  # every test starts the emulator under Waitress

CATEGORY_OF_KIND = {"invoice": "Invoice", "receipt": "Receipt", "letter": "Letter"}


def done(emu, session, data: bytes, name: str = "scan.pdf", **fields) -> dict:
    doc_id = upload(session, emu.url, data, name=name, **fields).json()["id"]
    assert emu.wait_idle(5)
    return get_document_details(doc_id, session=session)


def values_by_label(details: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for annotation_set in details["annotation_sets"]:
        for label in annotation_set["labels"]:
            out.setdefault(label["name"], []).extend(a["offset_string"] for a in label["annotations"])
    return out


def iban_is_valid(iban: str) -> bool:
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


# -- categories and annotations --------------------------------------------------------------


def test_each_document_gets_its_own_category_and_annotations(emu, session):
    files = {
        "invoice.pdf": file_of("invoice", pages=3, tag="inv", ibans=2),
        "receipt.pdf": file_of("receipt", pages=2, tag="rec"),
        "letter.png": file_of("letter", tag="let", png=True),
    }
    categories = {c["id"]: c for c in get_project_categories(1, session=session)}

    for name, data in files.items():
        details = done(emu, session, data, name=name)
        sha = hashlib.sha256(data).hexdigest()
        kind = layout_for(facts_of(data), name).kind
        category = categories[details["category"]]
        assert category["name"] == CATEGORY_OF_KIND[kind], name
        assert 0.5 < details["category_confidence"] <= 1 and details["is_reviewed"] is False
        text, bbox = details["text"], get_document_bbox(details["id"], session=session)["bbox"]
        flat = get_document_annotations(details["id"], session=session)
        nested = [
            (s, label, a) for s in details["annotation_sets"] for label in s["labels"] for a in label["annotations"]
        ]
        assert [a["id"] for a in flat] == [a["id"] for _, _, a in nested] and len(flat) >= 2, name
        label_sets = {s["id"] for s in category["schema"]}
        for a, (annotation_set, label, _) in zip(flat, nested, strict=True):
            assert (a["annotation_set"], a["label"]["id"], a["label_set"]["id"]) == (
                annotation_set["id"],
                label["id"],
                annotation_set["label_set"]["id"],
            )
            assert a["label_set"]["id"] in label_sets and a["document"] == details["id"]
            assert (a["is_correct"], a["revised"], a["custom_offset_string"]) == (False, False, False)
            (span,) = a["span"]
            start, end = span["start_offset"], span["end_offset"]
            assert text[start:end] == a["offset_string"] == span["offset_string"], name
            first, last = bbox[str(start)], bbox[str(end - 1)]
            assert span["page_index"] == first["page_number"] - 1 == text[:start].count("\f")
            assert (span["x0"], span["x1"]) == (first["x0"], last["x1"])
            assert (span["y0"], span["y1"]) == (first["y0"], first["y1"])
            assert a["selection_bbox"]["page_index"] == span["page_index"]
        values = values_by_label(details)
        assert all(sha in page for page in text.split("\f"))
        if kind == "invoice":
            assert values["Invoice Number"] == [f"INV-{sha[:8].upper()}"]  # this file's own, from its sha256
            assert len(values["IBAN"]) == 2 and all(iban_is_valid(i) for i in values["IBAN"])  # one label, twice
            items = [s for s in details["annotation_sets"] if s["label_set"]["name"] == "Line Item"]
            assert items and items[0]["label_set"]["has_multiple_annotation_sets"]
            amounts = [
                a["normalized"]
                for s in items
                for lb in s["labels"]
                if lb["name"] == "Amount"
                for a in lb["annotations"]
            ]
            (total,) = [a for a in flat if a["label"]["name"] == "Total"]
            assert total["normalized"] == pytest.approx(sum(amounts))
            assert {a["span"][0]["page_index"] for a in flat} == {0, 2}  # header on page 1, items on the last
        else:
            assert "Invoice Number" not in values and values["Sender"]
        (date,) = [a for a in flat if a["label"]["name"] == "Date"]
        day, month, year = date["offset_string"].split(".")
        assert date["normalized"] == f"{year}-{month}-{day}"


def test_annotations_are_deterministic_per_file(emu, session):
    data = file_of("invoice", tag="same")
    first, second = done(emu, session, data, name="a.pdf"), done(emu, session, data, name="a.pdf")

    def essence(details: dict) -> list:
        return [
            (a["label"]["name"], a["offset_string"], a["span"][0]["start_offset"], a["confidence"])
            for a in get_document_annotations(details["id"], session=session)
        ]

    assert first["id"] != second["id"] and essence(first) == essence(second)
    assert (first["category"], first["category_confidence"]) == (second["category"], second["category_confidence"])


def test_the_upload_names_the_category(emu, session):
    invoice = file_of("invoice", tag="named")
    as_receipt = done(emu, session, invoice, category=102)
    assert (as_receipt["category"], as_receipt["category_confidence"]) == (102, None)
    assert set(values_by_label(as_receipt)) == {"Sender", "Date", "Total"}  # the Receipt label set's

    unknown = done(emu, session, invoice, category=7)  # not in the project's schema: kept, nothing extracted
    assert (unknown["category"], unknown["annotation_sets"]) == (7, [])


def test_some_documents_have_no_category(emu, session):
    marked = done(emu, session, make_pdf(label=NO_CATEGORY_MARKER.decode()))
    emu.knobs.uncategorized_share = 1.0
    unlucky = done(emu, session, file_of("invoice", tag="share"))

    for details in (marked, unlucky):
        assert (details["status_data"], details["category"], details["category_confidence"]) == (2, None, None)
        assert details["annotation_sets"] == [] and get_document_annotations(details["id"], session=session) == []
    assert "INV-" in unlucky["text"]  # the text is there; only categorization found nothing


def test_results_appear_only_when_done(emu, session):
    emu.knobs.processing_s = 1.0
    doc_id = upload(session, emu.url, file_of("invoice", tag="early")).json()["id"]
    seen = []

    def check() -> bool:
        annotations = get_document_annotations(doc_id, session=session)  # first: status only moves on
        details = get_document_details(doc_id, session=session)
        seen.append(details["status_data"])
        if details["status_data"] != 2:
            assert (details["category"], details["annotation_sets"], annotations) == (None, [], [])
            pdf_ok = api(emu, "GET", f"/doc/show/{doc_id}/").status_code == 200
            after = get_document_details(doc_id, session=session)
            if (details["text"] is None) == (after["text"] is None):  # OCR did not finish in between
                assert pdf_ok == (details["text"] is not None)
        return details["status_data"] == 2 and get_document_annotations(doc_id, session=session)

    wait_until(check, 5, "results")
    assert seen[0] != 2  # the first look came before the results


# -- the files -----------------------------------------------------------------------------


def test_searchable_pdf_holds_the_ocr_text_and_the_original_comes_back(emu, session, tmp_path):
    name = "März 中文 invoice.pdf"  # characters outside WinAnsiEncoding take the extra fonts
    data = make_pdf(3, label="searchable")
    details = done(emu, session, data, name=name)

    searchable = download_file_konfuzio_api(details["id"], ocr=True, session=session)
    raw = api(emu, "GET", f"/doc/show/{details['id']}/")
    assert raw.headers["Content-Type"] == "application/pdf" and int(raw.headers["Content-Length"]) == len(searchable)
    assert pdf_page_texts(searchable) == details["text"].split("\f") == ocr_text_for(data, name).split("\f")
    path = tmp_path / "searchable.pdf"
    path.write_bytes(searchable)
    poppler = pdftotext_pages(path)  # poppler, when installed, reads it too
    assert poppler is None or poppler == details["text"].split("\f")

    assert download_file_konfuzio_api(details["id"], ocr=False, session=session) == data
    png = make_png(120, 80, label="original")
    png_doc = done(emu, session, png, name="photo.png")
    original = api(emu, "GET", f"/doc/show-original/{png_doc['id']}/")
    assert (original.content, original.headers["Content-Type"]) == (png, "image/png")
    assert pdf_page_texts(download_file_konfuzio_api(png_doc["id"], session=session)) == [png_doc["text"]]
    with pytest.raises(requests.HTTPError, match="404 Not Found"):
        download_file_konfuzio_api(999, session=session)


# -- people at work: review, re-extraction, split confirmation ---------------------------------


def test_review_marks_reviewed_corrects_a_value_and_calls_back_again(emu, session, callback_receiver):
    doc_id = upload(
        session, emu.url, file_of("invoice", tag="review"), callback_url=callback_receiver.url("rv")
    ).json()["id"]
    (first,) = callback_receiver.wait_for(1)
    assert first["body"]["is_reviewed"] is False

    reviewed = emu.review(doc_id, {"Invoice Number": "INV-CORRECTED", "Total": "1.000,00"})

    assert reviewed["is_reviewed"] is True and reviewed["updated_at"] > first["body"]["updated_at"]
    second = callback_receiver.wait_for(2)[1]["body"]
    now = get_document_details(doc_id, session=session)
    assert second["is_reviewed"] is True and second["annotation_sets"] == now["annotation_sets"]
    assert second["updated_at"] == now["updated_at"] == reviewed["updated_at"]
    annotations = {a["label"]["name"]: a for a in get_document_annotations(doc_id, session=session)}
    corrected = annotations["Invoice Number"]
    assert (corrected["offset_string"], corrected["custom_offset_string"], corrected["revised"]) == (
        "INV-CORRECTED",
        True,
        True,
    )
    assert corrected["offset_string_original"] != "INV-CORRECTED"  # the span still points at the OCR text
    assert annotations["Total"]["normalized"] == 1000.0
    assert all(a["revised"] and a["is_correct"] for a in annotations.values())

    via_http = requests.post(f"{emu.url}/emulator/documents/{doc_id}/review", json={"category": 103}, timeout=5)
    assert via_http.status_code == 200 and via_http.json()["category"] == 103
    assert via_http.json()["category_is_revised"] is True
    assert set(values_by_label(via_http.json())) == {"Sender", "Date"}  # re-extracted for Letter
    assert callback_receiver.wait_for(3)[2]["body"]["category"] == 103
    assert requests.post(f"{emu.url}/emulator/documents/999/review", timeout=5).status_code == 404
    bad = requests.post(f"{emu.url}/emulator/documents/{doc_id}/review", json={"changes": {"Nope": "x"}}, timeout=5)
    assert bad.status_code == 400


def test_reextract_renews_results_and_calls_back(emu, session, callback_receiver):
    doc_id = upload(session, emu.url, file_of("invoice", tag="again"), callback_url=callback_receiver.url("re")).json()[
        "id"
    ]
    callback_receiver.wait_for(1)
    before = get_document_annotations(doc_id, session=session)

    assert emu.reextract(doc_id, duration_s=1.0)["status_data"] == 1
    assert get_document_details(doc_id, session=session)["status_data"] in (1, 20)
    with pytest.raises(NotAllowed, match="not done"):
        emu.reextract(doc_id)  # already in extraction
    second = callback_receiver.wait_for(2)[1]["body"]

    after = get_document_annotations(doc_id, session=session)
    assert second["status_data"] == 2 and second["updated_at"] > callback_receiver.calls[0]["body"]["updated_at"]
    assert [(a["label"]["name"], a["offset_string"]) for a in after] == [
        (a["label"]["name"], a["offset_string"]) for a in before
    ]  # same text, same values...
    assert not {a["id"] for a in before} & {a["id"] for a in after}  # ...found again: new annotations
    assert [a["confidence"] for a in after] != [a["confidence"] for a in before]


def test_reextract_keeps_what_a_person_revised(emu, session):
    doc_id = done(emu, session, file_of("invoice", tag="kept"))["id"]
    emu.review(doc_id, {"Invoice Number": "INV-KEPT"})
    reviewed = get_document_annotations(doc_id, session=session)

    response = requests.post(f"{emu.url}/emulator/documents/{doc_id}/reextract", json={"duration_s": 0}, timeout=5)

    assert response.status_code == 202 and response.json()["status_data"] == 1
    assert emu.wait_idle(5)

    def same(annotations: list[dict]) -> list[dict]:  # new annotation sets hold the kept annotations
        return [{k: v for k, v in a.items() if k != "annotation_set"} for a in annotations]

    assert same(get_document_annotations(doc_id, session=session)) == same(reviewed)
    assert "INV-KEPT" in [a["offset_string"] for a in reviewed]
    assert requests.post(f"{emu.url}/emulator/documents/999/reextract", timeout=5).status_code == 404


def test_status_41_waits_for_the_split_confirmation(emu, session, callback_receiver):
    data = make_pdf(4, label=SPLIT_MARKER.decode())
    doc_id = upload(session, emu.url, data, callback_url=callback_receiver.url("split")).json()["id"]

    wait_until(lambda: get_document_details(doc_id, session=session)["status_data"] == 41, 5, "status 41")
    assert emu.wait_idle(5)  # a document waiting for a person is not pending work...
    assert callback_receiver.calls == [] and emu.callbacks == []  # ...and no callback was sent
    waiting = get_document_details(doc_id, session=session)
    assert waiting["proposed_split"] == [{"pages": [1, 2]}, {"pages": [3, 4]}] and waiting["split_is_revised"] is False
    assert waiting["text"] == ocr_text_for(data, "scan.pdf")  # OCR is done

    response = requests.post(f"{emu.url}/emulator/documents/{doc_id}/confirm-split", timeout=5)
    assert response.status_code == 202
    (call,) = callback_receiver.wait_for(1)
    assert call["body"]["status_data"] == 2 and call["body"]["split_is_revised"] is True
    assert requests.post(f"{emu.url}/emulator/documents/{doc_id}/confirm-split", timeout=5).status_code == 409

    emu.knobs.split_rate = 1.0
    other = upload(session, emu.url, make_png(label="split by knob")).json()["id"]
    wait_until(lambda: get_document_details(other, session=session)["status_data"] == 41, 5, "knob: status 41")
    emu.confirm_split(other)
    assert emu.wait_idle(5) and get_document_details(other, session=session)["status_data"] == 2


# -- a big project ---------------------------------------------------------------------------


def test_50000_seeded_documents_list_newest_first(emu, session):
    tracemalloc.start()
    started = time.perf_counter()
    ids = emu.seed_documents(1, 50_000, callback_url="https://example.com/cb/{id}")
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 20e6, (elapsed, peak)
    newest = upload(session, emu.url, make_png(label="newest"), name="newest.png").json()["id"]
    assert newest == ids[-1] + 1
    emu.reset_request_stats()

    first = api(emu, "GET", "/api/v3/documents/?project=1&limit=100").json()
    assert first["count"] == 50_001 and [r["id"] for r in first["results"][:3]] == [newest, ids[-1], ids[-2]]
    assert first["results"][1]["callback_url"] == f"https://example.com/cb/{ids[-1]}"
    assert first["results"][1]["created_at"] > first["results"][2]["created_at"]
    last = api(emu, "GET", "/api/v3/documents/?project=1&limit=100&offset=50000").json()
    assert [r["id"] for r in last["results"]] == [ids[0]] and last["next"] is None
    oldest = api(emu, "GET", "/api/v3/documents/?project=1&limit=2&ordering=created_at").json()["results"]
    assert [r["id"] for r in oldest] == [ids[0], ids[1]]
    assert emu.request_stats()["list"].count == 3

    seeded = get_document_details(ids[123], session=session)
    assert seeded["status_data"] == 2 and seeded["text"] and seeded["data_file_name"] == f"seeded_{ids[123]:07d}.pdf"
    annotations = get_document_annotations(ids[123], session=session)
    assert annotations and all(
        seeded["text"][a["span"][0]["start_offset"] : a["span"][0]["end_offset"]] == a["offset_string"]
        for a in annotations
    )
    assert get_document_bbox(ids[123], session=session)["bbox"]
    assert pdf_page_texts(download_file_konfuzio_api(ids[123], session=session)) == seeded["text"].split("\f")
    assert emu.documents()[-1]["id"] == newest  # seeded ones stay virtual


def test_meta_of_files_walks_a_seeded_project(emu, session):
    ids = emu.seed_documents(2, 2_500)
    emu.reset_request_stats()

    meta = get_meta_of_files(2, pagination_limit=1000, session=session)

    assert [m["id"] for m in meta] == list(ids)
    assert emu.request_stats()["list"].count == 3
    assert sum(m["category"] is not None for m in meta) == 2_500
