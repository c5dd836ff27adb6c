"""Results worth having, end to end: files dropped in the inbox -> the daemon -> the real SDK -> the
emulator, and what lands in done/: category and extractions in the JSON, the searchable PDF, new
revisions after a review, review required before export, and a done/ layout by template. Every
result file these tests see is checked against the JSON Schema the package ships."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests

from konfuzio_watch.emulator import FAIL_MARKER, NO_CATEGORY_MARKER, SPLIT_MARKER, FaultRule
from konfuzio_watch.emulator.content import facts_of, layout_for
from konfuzio_watch.emulator.schema import schema_for
from konfuzio_watch.fingerprint import content_fingerprint
from konfuzio_watch.journal import Row, State
from konfuzio_watch.samples import make_pdf, make_png
from konfuzio_watch.states import Stage
from konfuzio_watch.status import print_status

from .conftest import drop, wait_until
from .helpers import callback_url_of, file_of, pdf_page_texts, pdftotext_pages

pytestmark = pytest.mark.slow  # every test starts the daemon against the emulator

REVIEW_STAGE = Stage.REVIEW

SCHEMA = json.loads(resources.files("konfuzio_watch").joinpath("data", "result.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
CATEGORY_OF_KIND = {"invoice": "Invoice", "receipt": "Receipt", "letter": "Letter"}
WITH_PDF = {"outputs": ["json", "searchable_pdf"]}


def result_of(done: Path, rel: str) -> dict[str, Any]:
    """``done/<rel>.json``, valid against the result schema."""
    result = json.loads((done / (rel + ".json")).read_text(encoding="utf-8"))
    errors = sorted(VALIDATOR.iter_errors(result), key=lambda e: list(e.path))
    assert not errors, f"{rel}.json: {errors[0].json_path}: {errors[0].message}"
    return result


def expected_fields(data: bytes, name: str) -> dict[str, list]:
    """What the emulated AI finds in these bytes: field key -> normalized values, in text order."""
    found: dict[str, list] = {}
    for field in layout_for(facts_of(data), name).fields:
        found.setdefault(field.key, []).append(field.normalized)
    return found


def done_row(running, name: str) -> Row:  # type: ignore[no-untyped-def]
    assert running.daemon.journal
    (row,) = [r for r in running.daemon.journal.rows([State.DONE]) if r.rel_path == name.encode()]
    return row


def row_named(running, name: str) -> Row | None:  # type: ignore[no-untyped-def]
    """The journal row of the file dropped as ``name``; None before it is claimed."""
    assert running.daemon.journal
    rows = [r for r in running.daemon.journal.rows() if r.rel_path == name.encode()]
    assert len(rows) <= 1
    return rows[0] if rows else None


def stage_of(running, name: str) -> str | None:  # type: ignore[no-untyped-def]
    row = row_named(running, name)
    return row.stage if row else None


def document_of(emulator, name: str) -> int:  # type: ignore[no-untyped-def]
    return next(u.doc_id for u in emulator.uploads if u.data_file_name == name)


def requests_of(emulator, kind: str) -> int:  # type: ignore[no-untyped-def]
    return emulator.api_requests(kind)


# -- category and extractions -----------------------------------------------------------------------


def test_each_file_of_a_batch_gets_its_own_category_and_extractions(start_daemon, emulator):
    files = {
        "inv-a.pdf": file_of("invoice", pages=3, tag="batch a", ibans=2),
        "inv-b.pdf": file_of("invoice", pages=1, tag="batch b", ibans=1),
        "receipt.pdf": file_of("receipt", pages=2, tag="batch"),
        "letters/letter.png": file_of("letter", tag="batch", png=True),
        "note.pdf": make_pdf(1, label="batch note") + NO_CATEGORY_MARKER,
    }
    running = start_daemon()
    for name, data in files.items():
        drop(running.inbox / name, data)
    running.wait_finished(len(files))
    assert running.counts()[State.DONE] == len(files)

    document_ids = set()
    for name, data in files.items():
        result = result_of(running.done, name)
        assert (running.done / name).read_bytes() == data
        sha = hashlib.sha256(data).hexdigest()
        assert result["source"]["sha256"] == sha and sha in result["text"]
        kind = layout_for(facts_of(data), os.path.basename(name)).kind
        expected = expected_fields(data, os.path.basename(name))
        document_ids.add(result["document_id"])
        assert result["revision"] == 1 and result["searchable_pdf"] is None
        assert result["web_url"] == f"{emulator.url}/d/{result['document_id']}/"
        assert result["updated_at"] == result["konfuzio"]["updated_at"]
        assert result["bbox"], "character boxes by default"
        for a in result["annotations"]:  # each value where the text says, on its page
            (span,) = a["spans"]
            assert result["text"][span["start_offset"] : span["end_offset"]] == a["value"], name
            assert a["page"] == result["text"][: span["start_offset"]].count("\f") + 1
            assert a["bbox"] and (a["revised"], a["correct"]) == (False, False)
        if kind == "unknown":
            assert result["category"] is None and result["fields"] == {} and result["annotations"] == []
            continue
        category = result["category"]
        assert category["name"] == CATEGORY_OF_KIND[kind] and 0.5 < category["confidence"] < 1, name
        own = result["fields"][category["name"]]
        assert own["Date"] == expected["date"][0]
        if kind == "invoice":
            assert own["Invoice Number"] == f"INV-{sha[:8].upper()}"  # this file's own, from its sha256
            assert own["IBAN"] == expected["iban"]  # a list: the label may have several values
            assert len(own["IBAN"]) == (2 if name == "inv-a.pdf" else 1)
            items = result["fields"]["Line Item"]
            assert [i["Amount"] for i in items] == expected["amount"]
            assert own["Total"] == pytest.approx(sum(expected["amount"]))
        else:
            assert own["Sender"] == expected["sender"][0] and "Invoice Number" not in own
        if kind == "receipt":
            assert own["Total"] == expected["total"][0]
        labels = {x.key for s in schema_for(1).category_for_kind(kind).label_sets for x in s.labels}
        assert len(result["annotations"]) == sum(len(v) for k, v in expected.items() if k in labels)
    assert len(document_ids) == len(files)
    # The project's names were fetched once for the whole batch, each document's annotations once.
    assert [requests_of(emulator, k) for k in ("labels", "label_sets", "categories")] == [1, 1, 1]
    assert requests_of(emulator, "annotations") == len(files)
    assert requests_of(emulator, "pdf") == 0, "no searchable PDF unless results.outputs asks for it"


# -- the searchable PDF ------------------------------------------------------------------------------


def test_the_searchable_pdf_lies_next_to_the_file_and_holds_its_ocr_text(start_daemon, emulator):
    files = {"scans/three pages.pdf": make_pdf(3, label="searchable"), "photo.png": make_png(label="searchable")}
    foreign = b"%PDF-1.4 someone else's file\n%%EOF\n"
    running = start_daemon(results={**WITH_PDF, "bbox": False})
    taken = running.done / "photo.png.ocr.pdf"  # a name one of our sidecars would take
    taken.parent.mkdir(parents=True, exist_ok=True)
    taken.write_bytes(foreign)
    for name, data in files.items():
        drop(running.inbox / name, data)
    running.wait_finished(len(files))

    assert taken.read_bytes() == foreign, "a file that is not ours is never replaced"
    assert not (running.done / "photo.png").exists() and not (running.done / "photo.png.json").exists()
    placed = {"scans/three pages.pdf": "scans/three pages.pdf", "photo.png": "photo (2).png"}
    for name, data in files.items():
        rel = placed[name]
        assert (running.done / rel).read_bytes() == data
        result = result_of(running.done, rel)
        pdf = running.done / (rel + ".ocr.pdf")
        assert result["searchable_pdf"] == pdf.name
        assert "bbox" not in result, "results.bbox: false leaves the character boxes out"
        body = pdf.read_bytes()
        assert body.startswith(b"%PDF-") and body.rstrip().endswith(b"%%EOF")
        assert pdf_page_texts(body) == result["text"].split("\f") == [p["text"] for p in result["pages"]]
        poppler = pdftotext_pages(pdf)
        assert poppler is None or poppler == result["text"].split("\f")
    assert requests_of(emulator, "bbox") == 0, "boxes left out are never fetched"
    assert requests_of(emulator, "pdf") == len(files)
    leftovers = [p.name for p in running.done.rglob(".*")]
    assert leftovers == [], f"temporary files left in done/: {leftovers}"


def test_a_404_on_the_searchable_pdf_is_waited_out_not_taken_for_a_deleted_document(start_daemon, emulator):
    emulator.knobs.fault_rules.append(FaultRule("GET", r"^/doc/show/\d+/?$", 404, count=2))
    running = start_daemon(results=WITH_PDF, upload={"backoff_base_seconds": 0.1, "backoff_cap_seconds": 0.2})
    data = make_pdf(2, label="pdf later")
    drop(running.inbox / "later.pdf", data)
    running.wait_finished(1)

    assert running.counts()[State.DONE] == 1 and not list(running.failed.rglob("*"))
    result = result_of(running.done, "later.pdf")
    assert pdf_page_texts((running.done / "later.pdf.ocr.pdf").read_bytes()) == result["text"].split("\f")
    assert emulator.request_stats()["pdf"].errors == 2


# -- revisions: review, re-sent and forged callbacks ------------------------------------------------


def test_a_review_writes_the_next_revision_once_and_never_touches_the_original(start_daemon, emulator):
    running = start_daemon(results=WITH_PDF)
    data = file_of("invoice", pages=2, tag="review flip", ibans=1)
    drop(running.inbox / "invoice.pdf", data)
    running.wait_finished(1)
    original = running.done / "invoice.pdf"
    before = os.stat(original)
    first = result_of(running.done, "invoice.pdf")
    doc_id = first["document_id"]
    assert emulator.wait_idle(10)
    exported = wait_until(
        lambda: (r := done_row(running, "invoice.pdf")).refresh_at is None and r, 10, "no refresh pending"
    )
    fetched, pdfs = requests_of(emulator, "details"), requests_of(emulator, "pdf")

    emulator.review(doc_id, changes={"Total": "999,00"})  # Konfuzio calls back after the review

    row = wait_until(
        lambda: (r := done_row(running, "invoice.pdf")).revision == 2 and r.refresh_at is None and r,
        15,
        "revision 2 recorded",
    )
    second = result_of(running.done, "invoice.pdf")
    assert second["revision"] == 2 and second["konfuzio"]["is_reviewed"] is True
    assert second["fields"]["Invoice"]["Total"] == 999.0 and first["fields"]["Invoice"]["Total"] != 999.0
    assert all(a["revised"] and a["correct"] for a in second["annotations"])
    assert second["updated_at"] != first["updated_at"] and second["exported_at"] >= first["exported_at"]
    assert second["document_id"] == doc_id and second["text"] == first["text"]
    # The export leaves the fingerprint to the first look (computing it at export cost the daemon CPU with
    # many uploads in flight): that look read it from revision 1 in done/, and revision 2's is stored with it.
    assert (exported.revision, exported.fingerprint) == (1, None)
    assert row.fingerprint == content_fingerprint(second)
    assert (requests_of(emulator, "details") - fetched, requests_of(emulator, "pdf") - pdfs) == (1, 1)
    pdf = running.done / "invoice.pdf.ocr.pdf"
    assert pdf_page_texts(pdf.read_bytes()) == second["text"].split("\f")
    after = os.stat(original)
    assert original.read_bytes() == data
    assert (after.st_ino, after.st_mtime_ns, after.st_nlink) == (before.st_ino, before.st_mtime_ns, before.st_nlink)
    assert sorted(p.name for p in running.done.iterdir()) == ["invoice.pdf", "invoice.pdf.json", "invoice.pdf.ocr.pdf"]
    assert running.counts()[State.DONE] == 1 and len(emulator.uploads) == 1

    # The same callback again (Konfuzio retries, a proxy replays it): one look, no third revision.
    assert requests.post(callback_url_of(emulator, "invoice.pdf"), json={"id": doc_id}, timeout=5).ok
    wait_until(
        lambda: requests_of(emulator, "details") - fetched == 2 and done_row(running, "invoice.pdf").refresh_at is None,
        15,
        "the re-sent callback looked at",
    )
    assert result_of(running.done, "invoice.pdf") == second
    assert done_row(running, "invoice.pdf").revision == 2


def test_a_forged_callback_for_a_done_file_costs_one_fetch_and_changes_nothing(start_daemon, emulator):
    running = start_daemon()
    drop(running.inbox / "done.pdf", file_of("receipt", tag="forged"))
    running.wait_finished(1)
    assert emulator.wait_idle(10)
    wait_until(lambda: done_row(running, "done.pdf").refresh_at is None, 10, "no refresh pending")
    json_path = running.done / "done.pdf.json"
    before, stats = json_path.read_bytes(), emulator.request_stats()
    url = callback_url_of(emulator, "done.pdf")
    doc_id = document_of(emulator, "done.pdf")

    forged = {"id": doc_id, "status_data": 2, "is_reviewed": True, "text": "forged", "category": 103}
    response = requests.post(url, json=forged, timeout=5)
    assert response.status_code == 200 and response.json() == {"status": "finished"}
    wait_until(
        lambda: (
            requests_of(emulator, "details") > stats["details"].count
            and done_row(running, "done.pdf").refresh_at is None
        ),
        15,
        "the look the callback asked for",
    )

    now = emulator.request_stats()
    assert now["details"].count - stats["details"].count == 1
    assert {k: now[k].count - stats[k].count for k in now if now[k].count != stats[k].count} == {
        "details": 1,
        "annotations": 1,
        "bbox": 1,
    }, "one fetch of the result, no download, no write"
    assert json_path.read_bytes() == before, "nothing changed on the server: the result is not written again"
    row = done_row(running, "done.pdf")
    assert (row.revision, row.error) == (1, None)
    assert requests.post(url, json={**forged, "id": doc_id + 1000}, timeout=5).status_code == 403
    assert emulator.request_stats()["details"].count == now["details"].count


def test_a_result_taken_out_of_done_is_not_brought_back_by_a_review(start_daemon, emulator, tmp_path):
    running = start_daemon()
    drop(running.inbox / "taken.pdf", file_of("invoice", tag="taken away"))
    running.wait_finished(1)
    result = result_of(running.done, "taken.pdf")
    elsewhere = tmp_path / "archive"
    elsewhere.mkdir()
    for name in ("taken.pdf", "taken.pdf.json"):  # a downstream process takes its files
        os.replace(running.done / name, elsewhere / name)
    fetched = requests_of(emulator, "details")

    emulator.review(result["document_id"], changes={"Invoice Number": "INV-CHANGED"})
    wait_until(
        lambda: requests_of(emulator, "details") > fetched and done_row(running, "taken.pdf").refresh_at is None,
        15,
        "the review looked at",
    )

    assert list(running.done.iterdir()) == [], "no lone JSON of a later revision"
    assert done_row(running, "taken.pdf").revision == 1
    assert json.loads((elsewhere / "taken.pdf.json").read_text()) == result


def test_a_reextraction_reported_by_callback_becomes_the_next_revision(start_daemon, emulator):
    running = start_daemon()
    drop(running.inbox / "letter.pdf", file_of("letter", tag="re-extract"))
    running.wait_finished(1)
    first = result_of(running.done, "letter.pdf")
    emulator.reextract(first["document_id"], duration_s=0.3)  # new confidences, then the callback again

    wait_until(lambda: done_row(running, "letter.pdf").revision == 2, 15, "revision 2")
    second = result_of(running.done, "letter.pdf")
    assert second["revision"] == 2 and second["fields"] == first["fields"]
    assert [a["confidence"] for a in second["annotations"]] != [a["confidence"] for a in first["annotations"]]


# -- waiting for a person ----------------------------------------------------------------------------


def test_require_review_exports_only_what_a_person_reviewed(start_daemon, emulator):
    # Status 41 sends no callback: the daemon finds it by polling after callback_timeout.
    running = start_daemon(results={"require_review": True, "callback_timeout": 1})
    drop(running.inbox / "invoice.pdf", file_of("invoice", tag="needs review"))
    drop(running.inbox / "split.pdf", make_pdf(2, label="needs a split") + SPLIT_MARKER)

    wait_until(lambda: stage_of(running, "invoice.pdf") == REVIEW_STAGE, 15, "the invoice waiting for review")
    wait_until(
        lambda: stage_of(running, "split.pdf") == "waiting for splitting confirmation in Konfuzio",
        15,
        "the split waiting for its confirmation",
    )
    row, split = row_named(running, "invoice.pdf"), row_named(running, "split.pdf")
    assert row and split
    doc_id = row.document_id
    assert (row.state, split.state) == (State.UPLOADED, State.UPLOADED)
    assert emulator.store.details(doc_id)["status_data"] == 2, "Konfuzio is done with it: a person is not"
    assert running.daemon.pipeline.web_url(row) == f"{emulator.url}/d/{doc_id}/"
    assert list(running.done.rglob("*")) == []
    out = io.StringIO()
    print_status(running.config, show_all=False, now=time.time(), out=out)
    assert f"invoice.pdf  [waiting for review in Konfuzio: {emulator.url}/d/{doc_id}/]" in out.getvalue()
    assert "split.pdf  [waiting for splitting confirmation in Konfuzio:" in out.getvalue()

    emulator.review(doc_id)
    emulator.confirm_split(split.document_id)
    wait_until(lambda: stage_of(running, "split.pdf") == REVIEW_STAGE, 15, "the split, then its review")
    assert not (running.done / "split.pdf").exists()
    emulator.review(split.document_id)
    running.wait_finished(2)

    for name in ("invoice.pdf", "split.pdf"):
        result = result_of(running.done, name)
        assert result["revision"] == 1 and result["konfuzio"]["is_reviewed"] is True
        assert result["annotations"] and all(a["revised"] and a["correct"] for a in result["annotations"])


# -- the done/ layout --------------------------------------------------------------------------------


def test_a_layout_by_category_and_date_with_collisions_and_unsafe_names(start_daemon, emulator):
    categories = schema_for(1).categories_json()
    categories[0]["name"] = "../Rechnungen: 2026/März*?"  # what an admin may call a category
    emulator.knobs.fault_rules.append(
        FaultRule(
            "GET",
            r"^/api/v3/categories/?$",
            200,
            body={"count": len(categories), "next": None, "previous": None, "results": categories},
        )
    )
    running = start_daemon(results={"layout": "{category}/{date:%Y/%m}/{name}"})
    invoice_a, invoice_b = file_of("invoice", tag="layout a"), file_of("invoice", tag="layout b")
    files = {
        "a/scan.pdf": invoice_a,  # the same name from two folders, the same category and month
        "b/scan.pdf": invoice_b,
        '-x "q" ?.pdf': file_of("receipt", tag="layout"),  # the file's own name is kept byte for byte
        "nothing.pdf": make_pdf(1, label="layout") + NO_CATEGORY_MARKER,
        "bad/broken.pdf": make_pdf(1, label="layout") + FAIL_MARKER,
    }
    for name, data in files.items():
        drop(running.inbox / name, data)
    running.wait_finished(len(files))

    def month(name: str) -> str:
        row = row_named(running, name)
        assert row and row.uploaded_at
        return dt.datetime.fromtimestamp(row.uploaded_at, dt.UTC).strftime("%Y/%m")

    invoices = "_._Rechnungen_ 2026_März__"
    assert sorted(p.name for p in running.done.iterdir()) == sorted({invoices, "Receipt", "uncategorized"})
    scans = sorted(p for p in (running.done / invoices / month("a/scan.pdf")).iterdir())
    assert [p.name for p in scans] == ["scan (2).pdf", "scan (2).pdf.json", "scan.pdf", "scan.pdf.json"]
    by_content = {
        (running.done / invoices / month("a/scan.pdf") / n).read_bytes(): n for n in ("scan.pdf", "scan (2).pdf")
    }
    assert set(by_content) == {invoice_a, invoice_b}, "each file once, neither overwritten"
    for data, name in by_content.items():
        result = result_of(running.done / invoices / month("a/scan.pdf"), name)
        assert result["source"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert result["category"]["name"] == categories[0]["name"]
    odd = '-x "q" ?.pdf'
    receipt = f"Receipt/{month(odd)}/{odd}"
    assert (running.done / receipt).read_bytes() == files[odd]
    assert result_of(running.done, receipt)["source"]["path"] == odd
    nothing = f"uncategorized/{month('nothing.pdf')}/nothing.pdf"
    assert result_of(running.done, nothing)["category"] is None
    assert (running.failed / "bad" / "broken.pdf.error.json").exists(), "failed/ keeps the inbox's layout"
