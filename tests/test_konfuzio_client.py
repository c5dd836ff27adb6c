"""How API failures are classified for the retry policy (real exceptions from requests)."""

from __future__ import annotations

import requests

from konfuzio_watch.konfuzio import classify
from konfuzio_watch.policy import Cause


def test_a_body_cut_short_after_a_post_may_hide_a_stored_upload():
    for exc in (
        requests.exceptions.ChunkedEncodingError("IncompleteRead"),
        requests.exceptions.ContentDecodingError("bad gzip"),
        requests.exceptions.ReadTimeout("slow"),
    ):
        error = classify(exc, is_post=True)
        assert error.failure.cause == Cause.TRANSIENT and error.failure.maybe_received, type(exc).__name__


def test_a_refused_connection_never_reached_the_server():
    try:
        requests.post("http://127.0.0.1:9/api/v3/documents/", timeout=2)
    except requests.ConnectionError as exc:
        error = classify(exc, is_post=True)
    assert error.failure.cause == Cause.UNAVAILABLE and not error.failure.maybe_received
