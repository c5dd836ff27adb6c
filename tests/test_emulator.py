"""The emulator, driven over loopback HTTP by the real, unmodified konfuzio-sdk."""

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from konfuzio_sdk.api import (
    get_document_bbox,
    get_document_details,
    get_meta_of_files,
    get_project_categories,
    get_project_details,
    get_project_label_sets,
    get_project_labels,
    konfuzio_session,
)

from konfuzio_watch.emulator import FAIL_MARKER, Emulator, Knobs, ocr_text_for
from konfuzio_watch.emulator.app import INVALID_CHOICE
from konfuzio_watch.samples import make_pdf, make_png

from .conftest import TOKEN, wait_until
from .helpers import api, upload

pytestmark = pytest.mark.slow  # every test starts the emulator under Waitress

DETAIL_KEYS = {  # the keys of the API's "Document details" answer
    "id",
    "project",
    "document_set",
    "number_of_pages",
    "data_file_name",
    "data_file_producer",
    "file_url",
    "thumbnail_url",
    "ocr_time",
    "categorization_time",
    "extraction_time",
    "processing_time",
    "extraction_url",
    "callback_url",
    "callback_status_code",
    "category_confidence",
    "category_is_revised",
    "status_data",
    "labeling_available",
    "is_reviewed",
    "text",
    "category",
    "dataset_status",
    "pages",
    "annotation_sets",
    "assignee",
    "created_by",
    "created_at",
    "updated_at",
    "proposed_split",
    "split_is_revised",
    "enable_translated_strings",
    "original_file_url",
}


# -- the happy path, with the SDK's own functions -----------------------------------------------


def test_upload_then_details_bbox_and_project(emu, session):
    data = make_pdf(3, label="happy")
    created = upload(session, emu.url, data, name="happy.pdf")

    assert created.status_code == 201
    body = created.json()
    assert set(body) == DETAIL_KEYS
    assert (body["status_data"], body["text"], body["pages"], body["number_of_pages"]) == (0, None, [], 3)
    assert body["data_file_name"] == "happy.pdf" and body["file_url"] == f"/doc/show-original/{body['id']}/"
    assert emu.wait_idle(5)

    details = get_document_details(body["id"], session=session)
    assert details["status_data"] == 2
    assert details["text"] == ocr_text_for(data, "happy.pdf")
    assert [p["number"] for p in details["pages"]] == [1, 2, 3]
    assert details["pages"][0]["original_size"] == [595, 842]
    bbox = get_document_bbox(body["id"], session=session)["bbox"]
    assert len(bbox) == sum(not c.isspace() for c in details["text"])
    assert all(details["text"][int(i)] == box["text"] for i, box in bbox.items())
    assert {box["page_number"] for box in bbox.values()} == {1, 2, 3}
    assert get_project_details(1, session=session)["id"] == 1
    assert api(emu, "GET", f"/api/v3/documents/{body['id']}").json() == details  # slash optional
    assert api(emu, "GET", f"/api/v3/documents/{body['id']}/bbox/").json() == {"bbox": bbox}
    (record,) = emu.uploads
    assert (record.doc_id, record.sha256, record.size) == (
        body["id"],
        hashlib.sha256(data).hexdigest(),
        len(data),
    )


def test_each_text_belongs_to_its_own_file(emu, session):
    files = {f"file_{i}.pdf": make_pdf(1 + i % 3, label=f"unique {i}") for i in range(6)}
    files["photo.png"] = make_png(100, 50, label="photo")
    with ThreadPoolExecutor(7) as pool:
        responses = list(pool.map(lambda item: upload(session, emu.url, item[1], name=item[0]), files.items()))
    assert emu.wait_idle(5)

    for response in responses:
        name = response.json()["data_file_name"]
        details = get_document_details(response.json()["id"], session=session)
        pages = details["text"].split("\f")
        assert len(pages) == details["number_of_pages"] == len(details["pages"])
        for number, page in enumerate(pages, start=1):
            assert name in page and f"page {number} of {len(pages)}" in page
            assert hashlib.sha256(files[name]).hexdigest() in page
    assert {d["pages"][0]["original_size"][0] for d in emu.documents() if d["data_file_name"] == "photo.png"} == {100}


def test_status_progresses_through_intermediate_states(emu, session):
    emu.knobs.processing_s = 0.8
    doc_id = upload(session, emu.url, make_pdf(label="slow")).json()["id"]
    seen = []
    deadline = time.monotonic() + 5
    while (not seen or seen[-1] != 2) and time.monotonic() < deadline:
        details = get_document_details(doc_id, session=session)
        if not seen or seen[-1] != details["status_data"]:
            seen.append(details["status_data"])
        if details["status_data"] in (0, 10):
            assert details["text"] is None and get_document_bbox(doc_id, session=session) == {"bbox": {}}
        time.sleep(0.02)

    assert seen == [0, 10, 1, 20, 2]


def test_meta_of_files_paginates_and_filters_by_project(emu, session):
    emu.knobs.processing_s = 0
    ids = [upload(session, emu.url, make_png(label=str(i)), name=f"p{i}.png").json()["id"] for i in range(23)]
    upload(session, emu.url, make_png(label="other"), project=2)

    meta = get_meta_of_files(1, pagination_limit=10, session=session)

    assert [m["id"] for m in meta] == ids  # the SDK sorts by id itself
    assert not {"text", "pages", "annotation_sets"} & set(meta[0])
    page = api(emu, "GET", "/api/v3/documents/?limit=10&project=1&offset=10").json()
    assert [r["id"] for r in page["results"]] == ids[::-1][10:20]  # the API lists newest first
    assert all(r["created_at"] for r in page["results"])
    assert page["count"] == 23
    assert page["next"] == f"{emu.url}/api/v3/documents/?project=1&limit=10&offset=20"
    assert page["previous"] == f"{emu.url}/api/v3/documents/?project=1&limit=10"


def test_sync_upload_answers_finished_document(emu, session):
    body = upload(session, emu.url, make_pdf(label="sync"), sync=True).json()
    assert body["status_data"] == 2 and "sha256" in body["text"]


def test_sdk_upload_function_in_a_subprocess(emu, callback_receiver, tmp_path):
    """upload_file_konfuzio_api only knows the import-time KONFUZIO_HOST: set it in the environment."""
    path = tmp_path / "from sdk.pdf"
    path.write_bytes(make_pdf(2, label="sdk"))
    script = (
        "import json, sys\n"
        "from konfuzio_sdk.api import upload_file_konfuzio_api\n"
        "from konfuzio_sdk.api import delete_file_konfuzio_api\n"
        "r = upload_file_konfuzio_api(sys.argv[1], project_id=1, callback_url=sys.argv[2])\n"
        "s = upload_file_konfuzio_api(sys.argv[1], project_id=1, sync=True)\n"
        "deleted = delete_file_konfuzio_api(s.json()['id'])\n"
        "print(json.dumps([r.status_code, r.json(), s.json()['status_data'], deleted]))\n"
    )
    env = {**os.environ, "KONFUZIO_HOST": emu.url, "KONFUZIO_TOKEN": TOKEN, "LOG_TO_FILE": "False"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(path), callback_receiver.url("sub")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    status, body, sync_status, deleted = json.loads(result.stdout.splitlines()[-1])
    assert (status, body["status_data"], body["data_file_name"], sync_status) == (201, 0, "from sdk.pdf", 2)
    (call,) = callback_receiver.wait_for(1)
    assert call["body"]["id"] == body["id"] and call["body"]["status_data"] == 2
    assert deleted and [d.doc_id for d in emu.deletions] == [body["id"] + 1]
    assert [d["id"] for d in emu.documents()] == [body["id"]]


def test_project_schema_through_the_sdk(emu, session):
    """Categories (with their nested schema), label sets and labels, per project, as the SDK reads them."""
    categories = get_project_categories(1, session=session)
    assert [(c["id"], c["name"], c["project"]) for c in categories] == [
        (101, "Invoice", 1),
        (102, "Receipt", 1),
        (103, "Letter", 1),
    ]
    invoice_schema = {s["name"]: [x["name"] for x in s["labels"]] for s in categories[0]["schema"]}
    assert invoice_schema == {
        "Invoice": ["Invoice Number", "Date", "Total", "IBAN"],
        "Line Item": ["Description", "Amount"],
    }
    assert categories[0]["schema"][0]["id"] == categories[0]["id"]  # a category's own label set shares its id

    labels = {x["name"]: x for x in get_project_labels(1, session=session)}
    assert set(labels) == {"Invoice Number", "Date", "Total", "IBAN", "Sender", "Description", "Amount"}
    assert labels["IBAN"]["has_multiple_top_candidates"] and labels["Date"]["data_type"] == "Date"
    assert labels["Date"]["label_sets"] == [101, 102, 103]

    every = get_project_label_sets(1, include_categories=True, session=session)
    assert [(s["name"], s["is_category"], s["has_multiple_annotation_sets"]) for s in every] == [
        ("Invoice", True, False),
        ("Receipt", True, False),
        ("Letter", True, False),
        ("Line Item", False, True),
    ]
    assert [s["name"] for s in get_project_label_sets(1, session=session)] == ["Line Item"]  # SDK default
    assert {c["id"] for c in get_project_categories(2, session=session)} == {201, 202, 203}
    page = api(emu, "GET", "/api/v3/labels/?project=2&limit=3").json()
    assert (page["count"], len(page["results"]), page["next"]) == (
        7,
        3,
        f"{emu.url}/api/v3/labels/?project=2&limit=3&offset=3",
    )
    unknown = api(emu, "GET", "/api/v3/categories/?project=99")
    assert (unknown.status_code, unknown.json()) == (400, {"project": [INVALID_CHOICE]})
    assert get_project_details(1, session=session)["categories"] == [101, 102, 103]


def test_sdk_project_from_file_and_update_in_a_subprocess(emu, callback_receiver, tmp_path):
    """The tutorial's object-level flow: Project(id_), Document.from_file(sync=False), update()."""
    (tmp_path / "tutorial.pdf").write_bytes(make_pdf(2, label="tutorial"))
    script = (
        "import json, sys\n"
        "from konfuzio_sdk.data import Document, Project\n"
        "project = Project(id_=1)\n"
        "doc = Document.from_file('tutorial.pdf', project=project, sync=False, callback_url=sys.argv[1])\n"
        "import time; from konfuzio_sdk.api import get_document_details\n"
        "deadline = time.time() + 10\n"
        "while get_document_details(doc.id_)['status_data'] != 2 and time.time() < deadline:\n"
        "    time.sleep(0.02)\n"
        "doc.update()\n"
        "annotations = [[a.label.name, a.offset_string[0]] for a in doc.annotations(use_correct=False)]\n"
        "print(json.dumps([doc.id_, doc.ocr_ready, doc.text, doc.category.name, annotations]))\n"
    )
    env = {**os.environ, "KONFUZIO_HOST": emu.url, "KONFUZIO_TOKEN": TOKEN, "LOG_TO_FILE": "False"}
    result = subprocess.run(
        [sys.executable, "-c", script, callback_receiver.url("tutorial")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    doc_id, is_ready, text, category, annotations = json.loads(result.stdout.splitlines()[-1])
    assert is_ready and text == ocr_text_for((tmp_path / "tutorial.pdf").read_bytes(), "tutorial.pdf")
    details = emu.store.details(doc_id)
    assert category == {101: "Invoice", 102: "Receipt", 103: "Letter"}[details["category"]]
    expected = [
        [label["name"], a["offset_string"]]
        for s in details["annotation_sets"]
        for label in s["labels"]
        for a in label["annotations"]
    ]
    assert len(annotations) >= 2 and sorted(annotations) == sorted(expected)
    assert (tmp_path / "data_1" / "documents" / str(doc_id) / "document.txt").read_text() == text
    (call,) = callback_receiver.wait_for(1)
    assert call["body"]["id"] == doc_id


def test_upload_record_says_when_the_request_arrived(emu, session):
    emu.knobs.upload_latency_s = 0.3
    before = time.time()
    upload(session, emu.url, make_png(label="timed"))
    (record,) = emu.uploads
    assert before <= record.arrived_at <= before + 0.2
    assert record.received_at - record.arrived_at >= 0.29


# -- callbacks ---------------------------------------------------------------------------------


def test_callback_reaches_a_real_receiver(emu, session, callback_receiver):
    data = make_pdf(label="called back")
    doc_id = upload(session, emu.url, data, callback_url=callback_receiver.url("tok-1")).json()["id"]

    (call,) = callback_receiver.wait_for(1)

    assert call["token"] == "tok-1"
    assert call["body"]["id"] == doc_id and call["body"]["status_data"] == 2
    assert hashlib.sha256(data).hexdigest() in call["body"]["text"]
    assert emu.wait_idle(5)
    assert [(c.doc_id, c.status_code, c.error) for c in emu.callbacks] == [(doc_id, 200, None)]
    assert get_document_details(doc_id, session=session)["callback_status_code"] == 200


def test_early_callback_arrives_before_the_upload_returns(emu, session, callback_receiver):
    emu.knobs.early_callback = True
    response = upload(session, emu.url, make_pdf(label="early"), callback_url=callback_receiver.url("early"))
    returned_at = time.monotonic()

    assert response.json()["status_data"] == 0
    assert len(callback_receiver.calls) == 1  # already there, without waiting
    assert callback_receiver.calls[0]["at"] < returned_at and callback_receiver.calls[0]["body"]["status_data"] == 2


def test_callback_loss_and_duplicate(emu, session, callback_receiver):
    emu.knobs.callback_loss = 1.0
    lost = upload(session, emu.url, make_pdf(label="lost"), callback_url=callback_receiver.url("lost")).json()["id"]
    assert emu.wait_idle(5)
    assert emu.dropped_callbacks == [lost] and emu.callbacks == [] and callback_receiver.calls == []
    assert get_document_details(lost, session=session)["status_data"] == 2

    emu.knobs.callback_loss, emu.knobs.callback_duplicate = 0.0, 1.0
    twice = upload(session, emu.url, make_pdf(label="twice"), callback_url=callback_receiver.url("twice")).json()["id"]
    calls = callback_receiver.wait_for(2)
    assert [c["body"]["id"] for c in calls] == [twice, twice]


def test_failing_receiver_gets_one_attempt_and_its_code_is_kept(emu, session, callback_receiver):
    callback_receiver.answer_status = 500
    doc_id = upload(session, emu.url, make_pdf(label="500"), callback_url=callback_receiver.url("t")).json()["id"]
    callback_receiver.wait_for(1)
    assert emu.wait_idle(5)

    assert [(c.doc_id, c.status_code) for c in emu.callbacks] == [(doc_id, 500)]  # no retries
    assert get_document_details(doc_id, session=session)["callback_status_code"] == 500


def test_unreachable_callback_target_is_recorded_not_fatal(emu, session):
    emu.knobs.callback_timeout_s = 1.0
    with closed_port() as port:
        doc_id = upload(session, emu.url, make_pdf(label="x"), callback_url=f"http://127.0.0.1:{port}/cb").json()["id"]
        assert emu.wait_idle(5)
    (record,) = emu.callbacks
    assert record.doc_id == doc_id and record.status_code is None and "ConnectionError" in record.error


@contextlib.contextmanager
def closed_port():
    """A loopback port that is bound but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- fault knobs -------------------------------------------------------------------------------


def test_fail_marker_and_fail_rate_end_in_111(emu, session, callback_receiver):
    marked = upload(
        session, emu.url, make_pdf(label=FAIL_MARKER.decode()), callback_url=callback_receiver.url("f")
    ).json()
    emu.knobs.fail_rate = 1.0
    unlucky = upload(session, emu.url, make_pdf(label="unlucky")).json()
    assert emu.wait_idle(5)

    for body in (marked, unlucky):
        details = get_document_details(body["id"], session=session)
        assert (details["status_data"], details["text"]) == (111, None)
    assert callback_receiver.wait_for(1)[0]["body"]["status_data"] == 111


def test_429_carries_retry_after_and_stores_nothing(emu, session):
    emu.knobs.rate_429, emu.knobs.retry_after_s = 1.0, 7

    raw = api(emu, "GET", "/api/v3/projects/1/")
    assert raw.status_code == 429 and raw.headers["Retry-After"] == "7"
    assert raw.json() == {"detail": "Request was throttled. Expected available in 7 seconds."}
    with pytest.raises(requests.HTTPError) as caught:
        upload(session, emu.url, make_pdf(label="throttled"))
    # The SDK re-raises HTTPError(response.text) without .response; the original is the cause.
    assert caught.value.response is None
    assert caught.value.__cause__.response.headers["Retry-After"] == "7"
    assert emu.uploads == [] and emu.documents() == []


def test_5xx_and_outage(emu):
    emu.knobs.rate_5xx = 1.0
    assert {api(emu, "GET", "/api/v3/projects/1/").status_code for _ in range(8)} <= {502, 503}
    emu.knobs.rate_5xx = 0.0
    emu.knobs.outage = True
    down = api(emu, "GET", "/api/v3/projects/1/", token=None)
    assert down.status_code == 503 and down.headers["Content-Type"].startswith("text/plain")
    emu.knobs.outage = False
    assert api(emu, "GET", "/api/v3/projects/1/").status_code == 200


def test_stall_leaves_a_stored_document_behind_a_read_timeout(emu):
    emu.knobs.stall_after_store_s = 2.0
    impatient = konfuzio_session(TOKEN, host=emu.url, timeout=0.3, num_retries=0)

    with pytest.raises(requests.exceptions.ReadTimeout):
        upload(impatient, emu.url, make_pdf(label="stalled"))
    assert [u.data_file_name for u in emu.uploads] == ["scan.pdf"]
    assert emu.wait_idle(5) and emu.documents()[0]["status_data"] == 2


def test_concurrent_uploads_with_latency_overlap(emu, session):
    emu.knobs.upload_latency_s = 0.4
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: upload(session, emu.url, make_png(label=str(i))).status_code, range(8)))
    assert codes == [201] * 8 and time.monotonic() - started < 2.0


# -- errors ------------------------------------------------------------------------------------


def test_auth_errors(emu):
    assert api(emu, "GET", "/api/v3/projects/1/", token=None).json() == {
        "detail": "Authentication credentials were not provided."
    }
    wrong = api(emu, "GET", "/api/v3/documents/1/", token="nope")
    assert (wrong.status_code, wrong.json()) == (401, {"detail": "Invalid token."})


@pytest.mark.parametrize(
    ("files", "form", "errors"),
    [
        (None, {"project": "1"}, {"data_file": ["No file was submitted."]}),
        (
            {"data_file": ("e.pdf", b"", "multipart/form-data")},
            {"project": "1"},
            {"data_file": ["The submitted file is empty."]},
        ),
        (
            {"data_file": ("a.pdf", b"%PDF", "multipart/form-data")},
            {"project": "99"},
            {"project": ['Invalid pk "99" - object does not exist.']},
        ),
        (
            {"data_file": ("a.pdf", b"%PDF", "multipart/form-data")},
            {"project": "1", "callback_url": "http://receiver:8080/cb"},
            {"callback_url": ["Enter a valid URL."]},
        ),
    ],
)
def test_upload_validation_errors(emu, files, form, errors):
    response = api(emu, "POST", "/api/v3/documents/", files=files, data=form)
    assert (response.status_code, response.json()) == (400, errors)


def test_not_found_and_bad_requests_never_500(emu, session):
    with pytest.raises(requests.HTTPError, match="404 Not Found: Not found. via"):
        get_document_details(999, session=session)
    for path in (
        "/api/v3/documents/999/bbox",
        "/api/v3/projects/7/",
        "/api/v3/nothing/",
        "/api/v3/documents/x/",
    ):
        response = api(emu, "GET", path)
        assert (response.status_code, response.json()) == (404, {"detail": "Not found."}), path
    garbage = api(
        emu,
        "POST",
        "/api/v3/documents/",
        data=b"--xx\r\ngarbage",
        headers={"Content-Type": "multipart/form-data; boundary=xx"},
    )
    assert garbage.status_code == 400
    assert api(emu, "GET", "/api/v3/documents/?project=abc").status_code == 400
    assert api(emu, "GET", "/api/v3/annotations/?document=1&limit=10").json()["results"] == []


# -- lifecycle ---------------------------------------------------------------------------------


def test_stop_joins_every_thread(callback_receiver):
    before = threading.active_count()
    emu = Emulator(token=TOKEN, knobs=Knobs(processing_s=0.05)).start()
    session = konfuzio_session(TOKEN, host=emu.url)
    for i in range(3):
        upload(session, emu.url, make_pdf(label=str(i)), callback_url=callback_receiver.url(str(i)))
    callback_receiver.wait_for(3)
    emu.knobs.processing_s = 30  # still pending at stop: must be dropped, not waited for
    upload(session, emu.url, make_pdf(label="never"))

    assert emu.stop()
    wait_until(lambda: threading.active_count() == before, 2.0, f"threads back to {before}: {threading.enumerate()}")


def test_command_line_serves_until_sigterm(tmp_path):
    command = [sys.executable, "-m", "konfuzio_watch.emulator", "--port", "0", "--token", "T"]
    rule = '{"method": "GET", "path": "^/api/v3/projects/2/$", "status": 404}'
    far_future = "Fri, 01 Jan 2099 00:00:00 GMT"
    knobs = ["--rate-429", "1", "--retry-after-s", far_future, "--fault-rule", rule]
    with subprocess.Popen(
        command + knobs, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    ) as process:
        try:
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            headers = {"Authorization": "Token T"}
            throttled = requests.get(f"{url}/api/v3/projects/1/", headers=headers, timeout=5)
            assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, far_future)  # token ok, knobs set
            assert requests.get(f"{url}/api/v3/projects/2/", headers=headers, timeout=5).status_code == 404
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=10)
            assert process.returncode == 0 and "Traceback" not in stderr, stderr
        finally:
            if process.poll() is None:
                process.kill()
