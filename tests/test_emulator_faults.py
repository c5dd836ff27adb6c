"""The emulator's faults and integrity features, driven through the real SDK over loopback HTTP:
Retry-After strings, per-endpoint fault rules, a gateway that gives up while the upload is stored,
uploads stored after the client timed out, DELETE, request accounting, large streamed uploads."""

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
    get_project_details,
    get_project_labels,
    konfuzio_session,
)
from konfuzio_sdk.urls import get_document_url, get_upload_document_url

from konfuzio_watch.emulator import FaultRule
from konfuzio_watch.samples import make_pdf, make_png

from .conftest import TOKEN, wait_until
from .helpers import api, upload

pytestmark = pytest.mark.slow  # every test starts the emulator under Waitress

HTTP_DATE_2099 = "Thu, 01 Jan 2099 00:00:00 GMT"


def cause(error: pytest.ExceptionInfo) -> requests.Response:
    """The SDK re-raises HTTPError(response.text) for most codes; the original holds the response."""
    return error.value.__cause__.response


# -- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "detail"),
    [
        ("999999999", "Request was throttled. Expected available in 999999999 seconds."),
        (HTTP_DATE_2099, "Request was throttled."),
        (0, "Request was throttled. Expected available in 0 seconds."),
    ],
)
def test_retry_after_is_any_header_string(emu, session, retry_after, detail):
    emu.knobs.rate_429, emu.knobs.retry_after_s = 1.0, retry_after

    with pytest.raises(requests.HTTPError) as caught:
        get_project_details(1, session=session)

    assert cause(caught).status_code == 429 and cause(caught).headers["Retry-After"] == str(retry_after)
    assert cause(caught).json() == {"detail": detail}


# -- per-endpoint fault rules ----------------------------------------------------------------


def test_rule_makes_only_bbox_answer_401_for_a_count(emu, session):
    doc_id = upload(session, emu.url, make_pdf(label="bbox 401")).json()["id"]
    assert emu.wait_idle(5)
    rule = FaultRule("GET", r"/bbox/?$", 401, count=2)
    emu.knobs.fault_rules = [rule]

    for _ in range(2):
        with pytest.raises(requests.HTTPError) as caught:
            get_document_bbox(doc_id, session=session)
        assert cause(caught).status_code == 401 and cause(caught).json() == {"detail": "Invalid token."}
        assert get_document_details(doc_id, session=session)["status_data"] == 2  # other endpoints unaffected

    assert get_document_bbox(doc_id, session=session)["bbox"]  # the count is used up
    assert rule.hits == 2


def test_rules_for_details_and_project_with_body_headers_and_an_end(emu, session):
    doc_id = upload(session, emu.url, make_png(label="rules")).json()["id"]
    assert emu.wait_idle(5)
    emu.knobs.fault_rules = [
        FaultRule(
            "GET", rf"^/api/v3/documents/{doc_id}/?$", 400, body={"detail": "Nope."}, headers={"X-Why": "test"}, count=1
        ),
        FaultRule("*", r"^/api/v3/projects/1/$", 404, until=time.time() + 0.5),
        FaultRule("GET", r"/annotations/", 429, headers={"Retry-After": HTTP_DATE_2099}),
    ]

    with pytest.raises(requests.HTTPError) as caught:
        get_document_details(doc_id, session=session)
    assert (cause(caught).status_code, cause(caught).json(), cause(caught).headers["X-Why"]) == (
        400,
        {"detail": "Nope."},
        "test",
    )
    with pytest.raises(requests.HTTPError, match="404 Not Found: Not found. via"):
        get_project_details(1, session=session)
    with pytest.raises(requests.HTTPError) as caught:
        get_document_annotations(doc_id, session=session)
    assert cause(caught).headers["Retry-After"] == HTTP_DATE_2099
    assert get_project_details(2, session=session)["id"] == 2  # another project: untouched
    wait_until(lambda: api(emu, "GET", "/api/v3/projects/1/").status_code == 200, 5, "the 404 rule to end")
    assert get_document_details(doc_id, session=session)["id"] == doc_id


def test_rule_beats_auth_and_never_touches_control_endpoints(emu):
    emu.knobs.fault_rules = [FaultRule("*", ".*", 503)]
    down = api(emu, "GET", "/api/v3/projects/1/", token=None)
    assert (down.status_code, down.headers["Content-Type"].split(";")[0]) == (503, "text/html")
    assert requests.get(f"{emu.url}/emulator/stats", timeout=5).status_code == 200


def test_gateway_answers_504_at_once_and_the_upload_is_stored_later(emu, session, callback_receiver):
    rule = FaultRule.gateway(504, store_after_s=0.3)
    emu.knobs.fault_rules = [rule]

    with pytest.raises(requests.HTTPError) as caught:
        upload(session, emu.url, make_pdf(label="gave up"), name="late.pdf", callback_url=callback_receiver.url("late"))
    assert cause(caught).status_code == 504 and emu.uploads == []  # answered before anything was stored

    (record,) = wait_until(lambda: list(emu.uploads), 5, "the late store")
    assert (record.data_file_name, record.gateway_status) == ("late.pdf", 504)
    assert record.callback_url == callback_receiver.url("late")
    (call,) = callback_receiver.wait_for(1)
    assert call["token"] == "late" and call["body"]["id"] == record.doc_id
    assert upload(session, emu.url, make_pdf(label="next")).status_code == 201  # count=1: once only
    assert rule.hits == 1


def test_gateway_error_for_a_refused_upload_stores_nothing(emu):
    emu.knobs.fault_rules = [FaultRule.gateway(502, store_after_s=0)]
    files = {"data_file": ("a.pdf", make_pdf(), "multipart/form-data")}
    response = api(emu, "POST", "/api/v3/documents/", token="wrong", files=files, data={"project": "1"})
    assert response.status_code == 502
    assert emu.wait_idle(5) and emu.uploads == []


def test_upload_is_stored_after_the_client_timed_out(emu, callback_receiver):
    """The handler goes on after its client disconnected during upload_latency_s."""
    emu.knobs.upload_latency_s = 0.6
    impatient = konfuzio_session(TOKEN, host=emu.url, timeout=0.2, num_retries=0)

    with pytest.raises(requests.exceptions.ReadTimeout):
        upload(
            impatient, emu.url, make_pdf(label="timed out"), name="gone.pdf", callback_url=callback_receiver.url("gone")
        )
    assert emu.uploads == []

    (record,) = wait_until(lambda: list(emu.uploads), 5, "the upload stored after the timeout")
    assert (record.data_file_name, record.gateway_status) == ("gone.pdf", None)
    assert record.callback_url == callback_receiver.url("gone")
    assert callback_receiver.wait_for(1)[0]["body"]["id"] == record.doc_id


# -- DELETE ----------------------------------------------------------------------------------


def test_delete_removes_a_document_and_records_it(emu, session, callback_receiver):
    """``delete_file_konfuzio_api`` sends exactly this (with the import-time host; see the subprocess test)."""
    kept = upload(session, emu.url, make_pdf(label="kept")).json()["id"]
    emu.knobs.processing_s = 0.5
    doomed = upload(session, emu.url, make_pdf(label="doomed"), callback_url=callback_receiver.url("doomed")).json()[
        "id"
    ]

    response = session.delete(url=get_document_url(doomed, host=emu.url))

    assert response.status_code == 204 and response.content == b""
    with pytest.raises(requests.HTTPError, match="404 Not Found"):
        get_document_details(doomed, session=session)
    with pytest.raises(requests.HTTPError, match="404 Not Found"):
        session.delete(url=get_document_url(doomed, host=emu.url))
    assert [r["id"] for r in api(emu, "GET", "/api/v3/documents/?project=1").json()["results"]] == [kept]
    (record,) = emu.deletions
    assert (record.doc_id, record.project) == (doomed, 1)
    assert emu.wait_idle(5) and callback_receiver.calls == []  # its processing ended without a callback
    seeded = emu.seed_documents(1, 3)
    assert emu.delete_document(seeded[1]) and not emu.delete_document(seeded[1])
    assert api(emu, "GET", f"/api/v3/documents/{seeded[1]}/").status_code == 404
    assert api(emu, "GET", "/api/v3/documents/?project=1").json()["count"] == 3


# -- request accounting ----------------------------------------------------------------------


def test_requests_are_counted_by_kind_with_bytes(emu, session):
    data = make_pdf(2, label="counted")
    doc_ids = [upload(session, emu.url, data, name=f"c{i}.pdf").json()["id"] for i in range(2)]
    assert emu.wait_idle(5)
    for doc_id in doc_ids:
        get_document_details(doc_id, session=session)
    get_document_bbox(doc_ids[0], session=session)
    get_document_annotations(doc_ids[0], session=session)
    get_project_labels(1, session=session)
    pdf = download_file_konfuzio_api(doc_ids[0], session=session)
    original = download_file_konfuzio_api(doc_ids[0], ocr=False, session=session)
    api(emu, "GET", "/api/v3/documents/?project=1")
    api(emu, "GET", "/api/v3/nothing/")
    emu.knobs.fault_rules = [FaultRule("GET", "/bbox", 502, count=1)]
    api(emu, "GET", f"/api/v3/documents/{doc_ids[1]}/bbox")
    requests.get(f"{emu.url}/emulator/stats", timeout=5)  # control endpoints are not counted

    stats = emu.request_stats()

    assert {kind: s.count for kind, s in stats.items()} == {
        "upload": 2,
        "details": 2,
        "bbox": 2,
        "annotations": 1,
        "labels": 1,
        "pdf": 1,
        "original": 1,
        "list": 1,
        "other": 1,
    }
    assert (stats["bbox"].errors, stats["other"].errors, stats["details"].errors) == (1, 1, 0)
    assert stats["upload"].bytes_received > 2 * len(data) and stats["upload"].bytes_sent > 0
    assert (stats["pdf"].bytes_sent, stats["original"].bytes_sent) == (len(pdf), len(data)) and original == data
    assert emu.api_requests() == 12 and emu.api_requests("details", "bbox") == 4
    assert requests.get(f"{emu.url}/emulator/stats", timeout=5).json()["upload"]["count"] == 2
    emu.reset_request_stats()
    assert emu.request_stats() == {}


# -- the multipart body ----------------------------------------------------------------------


def multipart(data_chunks, name: str = "big.pdf", boundary: str = "emulator-test-boundary"):
    """A multipart body as a streaming uploader sends it, the file part labelled like the SDK does."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="project"\r\n\r\n1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="data_file"; filename="{name}"\r\n'
        "Content-Type: multipart/form-data\r\n\r\n"
    ).encode()
    yield from data_chunks
    yield f"\r\n--{boundary}--\r\n".encode()


def test_a_100_mb_upload_streams_through_without_a_copy_in_memory(emu):
    """Chunked transfer encoding, as a streaming uploader sends it: the emulator (and this client)
    never hold the file; a full copy would show as 100 MB in the traced peak."""
    size_mb = 100
    sha = hashlib.sha256()

    def chunks():
        for i in range(size_mb):
            chunk = (b"%PDF-1.4\n" if i == 0 else b"") + bytes([i]) * (1024 * 1024 - (9 if i == 0 else 0))
            sha.update(chunk)
            yield chunk

    headers = {
        "Authorization": f"Token {TOKEN}",
        "Content-Type": "multipart/form-data; boundary=emulator-test-boundary",
    }
    tracemalloc.start()
    try:
        response = requests.post(f"{emu.url}/api/v3/documents/", data=multipart(chunks()), headers=headers, timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert response.status_code == 201, response.text
    assert peak < size_mb * 1024 * 1024 / 4, f"peak {peak / 1e6:.1f} MB"
    (record,) = emu.uploads
    assert (record.size, record.sha256) == (size_mb * 1024 * 1024, sha.hexdigest())
    back = requests.get(f"{emu.url}/doc/show-original/{record.doc_id}/", headers=headers, stream=True, timeout=60)
    assert int(back.headers["Content-Length"]) == record.size
    received = hashlib.sha256()
    for chunk in back.iter_content(1024 * 1024):
        received.update(chunk)
    assert received.hexdigest() == sha.hexdigest()


def test_a_body_with_content_length_like_multipartencoder(emu, session):
    """requests-toolbelt's MultipartEncoder streams a body of known length (Content-Length, not chunked)."""
    data = make_pdf(3, label="encoder")
    body = b"".join(multipart([data], name="encoded.pdf"))

    class Reader:  # a file-like body: requests sends Content-Length and streams it
        def __init__(self) -> None:
            self.offset = 0
            self.len = len(body)

        def read(self, size: int = -1) -> bytes:
            end = len(body) if size < 0 else self.offset + size
            out, self.offset = body[self.offset : end], min(end, len(body))
            return out

    headers = {"Content-Type": "multipart/form-data; boundary=emulator-test-boundary"}
    response = session.post(get_upload_document_url(emu.url), data=Reader(), headers=headers)

    assert response.status_code == 201 and response.json()["number_of_pages"] == 3
    assert response.request.headers["Content-Length"] == str(len(body))
    assert emu.uploads[0].sha256 == hashlib.sha256(data).hexdigest()
