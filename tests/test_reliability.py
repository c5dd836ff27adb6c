"""The fault matrix (RELIABILITY.md), in process: callbacks, API faults, hostile files, duplicates."""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import socket
import time

import pytest
import requests

from konfuzio_watch.cli import main
from konfuzio_watch.emulator.faults import FaultRule
from konfuzio_watch.journal import State
from konfuzio_watch.samples import make_pdf

from .conftest import TOKEN, drop, wait_until
from .helpers import (
    assert_all_done_once,
    assert_own_result,
    callback_url_of,
    drop_batch,
)

pytestmark = pytest.mark.slow  # every test starts the daemon against the emulator

# -- callbacks -------------------------------------------------------------------------------


def test_lost_and_duplicated_callbacks(start_daemon, emulator):
    emulator.knobs.callback_loss = 0.5
    emulator.knobs.callback_duplicate = 0.2
    running = start_daemon(results={"callback_timeout": 1.0, "poll_interval": 0.3})
    files = drop_batch(running, 30)

    running.wait_finished(30, timeout_s=60)

    assert_all_done_once(running, emulator, files)
    assert emulator.dropped_callbacks, "the knob lost no callback: the poll fallback was not exercised"
    sent = collections.Counter(c.doc_id for c in emulator.callbacks)
    assert any(n == 2 for n in sent.values()), "no callback was duplicated"
    assert all(c.status_code in (200, 202) for c in emulator.callbacks if c.status_code), "a callback got an error"


def test_callback_never_comes_then_polling_finishes_the_file(start_daemon, emulator):
    emulator.knobs.callback_loss = 1.0
    running = start_daemon(results={"callback_timeout": 0.5, "poll_interval": 0.2})
    data = make_pdf(label="no callback")
    drop(running.inbox / "quiet.pdf", data)
    running.wait_finished(1, timeout_s=20)
    assert_own_result(running.done, "quiet.pdf", data)
    assert emulator.callbacks == []


def test_replayed_callback_after_done_changes_nothing(start_daemon, emulator):
    running = start_daemon()
    data = make_pdf(label="replay")
    drop(running.inbox / "replay.pdf", data)
    running.wait_finished(1)
    url = callback_url_of(emulator, "replay.pdf")
    details = next(d for d in emulator.documents() if d["data_file_name"] == "replay.pdf")
    before = sorted(p.name for p in running.done.rglob("*"))

    for _ in range(3):
        response = requests.post(url, json=details, timeout=5)
        assert response.status_code == 200 and response.json() == {"status": "finished"}

    assert sorted(p.name for p in running.done.rglob("*")) == before
    assert running.counts()[State.DONE] == 1


def test_forged_and_garbage_callbacks_move_nothing_and_never_5xx(start_daemon, emulator):
    emulator.knobs.callback_loss = 1.0  # only our forged callbacks arrive
    emulator.knobs.processing_s = 60  # the documents stay unfinished on the server
    running = start_daemon(results={"callback_timeout": 600})
    drop(running.inbox / "a.pdf", make_pdf(label="a"))
    drop(running.inbox / "b.pdf", make_pdf(label="b"))
    wait_until(lambda: running.counts()[State.UPLOADED] == 2, 20, "both uploaded")
    url_a = callback_url_of(emulator, "a.pdf")
    doc_b = next(u.doc_id for u in emulator.uploads if u.data_file_name == "b.pdf")
    base = url_a.rsplit("/", 1)[0]
    done_details = {"id": doc_b, "status_data": 2, "text": "forged text", "data_file_name": "a.pdf"}

    cases = [
        ("post", f"{base}/{'x' * 43}", {"json": done_details}, 404),  # unknown token
        ("post", f"{base}/", {"json": done_details}, 404),  # no token
        ("post", f"{base}/../../healthz", {"json": {}}, 404),  # path games (health is the monitor's)
        ("post", running.daemon.server.url + "/", {"json": done_details}, 404),  # guessed paths
        ("post", running.daemon.server.url + "/callback", {"json": done_details}, 404),
        ("post", f"{base}/ab", {"json": done_details}, 404),  # malformed token
        ("post", url_a, {"json": done_details}, 403),  # right token, another document's id
        # read as json reads it, also where orjson would refuse (UTF-16, NaN): still that other id
        ("post", url_a, {"data": json.dumps(done_details).encode("utf-16")}, 403),
        ("post", url_a, {"data": json.dumps({**done_details, "ocr_time": float("nan")}).encode()}, 403),
        ("post", url_a, {"data": b"\x00\xffnot json"}, 400),
        ("post", url_a, {"json": [1, 2, 3]}, 400),
        ("post", url_a, {"json": {"id": "1; DROP TABLE files"}}, 400),
        ("post", url_a, {"data": b"[" * 60_000}, 400),  # nesting deep enough to blow the parser's stack
        ("post", url_a, {"data": b"{" + b" " * 100_000 + b"}"}, 413),  # oversized
        ("get", url_a, {}, 405),
    ]
    for method, url, kwargs, expected in cases:
        response = getattr(requests, method)(url, timeout=5, **kwargs)
        assert response.status_code == expected, (url, kwargs.keys(), response.status_code, response.text)
        assert response.status_code < 500

    assert running.counts()[State.UPLOADED] == 2, "a forged callback moved a file"
    assert running.counts()[State.DONE] == 0
    assert not list(running.done.rglob("*"))
    # A callback on the right token with the right id is only a hint: the API says "not done".
    assert requests.post(url_a, json={"id": doc_b - 1 if doc_b > 1 else doc_b + 1}, timeout=5).status_code == 202
    assert running.counts()[State.UPLOADED] == 2


def test_slow_clients_do_not_starve_the_callback_server(start_daemon, emulator):
    running = start_daemon()
    server = running.daemon.server
    slow = []
    try:
        for _ in range(30):  # slowloris: connections that never finish their headers
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"POST /konfuzio-callback/x HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        huge = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        slow.append(huge)
        huge.sendall(
            b"POST /konfuzio-callback/" + b"a" * 43 + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2147483648\r\n\r\n"
        )
        assert huge.recv(100).startswith(b"HTTP/1.1 413"), "a 2 GB body must be refused up front"
        assert requests.get(f"{running.daemon.monitor.url}/healthz", timeout=5).status_code == 200
        data = make_pdf(label="still served")
        drop(running.inbox / "served.pdf", data)
        running.wait_finished(1)
        assert_own_result(running.done, "served.pdf", data)
    finally:
        for s in slow:
            s.close()


# -- API faults ------------------------------------------------------------------------------


def test_throttling_and_server_errors_on_uploads(start_daemon, emulator):
    emulator.knobs.rate_429 = 0.1
    emulator.knobs.rate_5xx = 0.05
    emulator.knobs.retry_after_s = 0
    running = start_daemon(upload={"backoff_base_seconds": 0.05, "backoff_cap_seconds": 0.3})
    files = drop_batch(running, 30)

    running.wait_finished(30, timeout_s=90)

    assert_all_done_once(running, emulator, files)
    assert running.metric("upload_retries_total") > 0, "no fault was injected"


def test_outage_longer_than_the_backoff_cap_delays_files_and_loses_none(start_daemon, emulator):
    emulator.knobs.outage = True
    running = start_daemon(upload={"backoff_base_seconds": 0.1, "backoff_cap_seconds": 0.5, "max_attempts": 2})
    files = drop_batch(running, 10)
    wait_until(lambda: running.metric("upload_retries_total") >= 3, 20, "uploads failing during the outage")
    cpu_before, wall_before = time.process_time(), time.monotonic()
    retries_before = running.metric("upload_retries_total")
    # (the same 3 s on a fake clock, without the daemon: test_api_outage.py)
    time.sleep(3.0)  # a measurement window, not a wait: the outage goes on for 6x the backoff cap
    cpu = time.process_time() - cpu_before
    attempts = running.metric("upload_retries_total") - retries_before
    assert attempts <= 3.0 / 0.25 + 4, f"{attempts} upload attempts in 3 s: not backing off"
    assert cpu < 0.5 * (time.monotonic() - wall_before), f"spinning: {cpu:.2f} s CPU in 3 s"
    assert running.counts()[State.FAILED] == 0, "an outage must not burn the files' attempts"
    emulator.knobs.outage = False

    running.wait_finished(10, timeout_s=30)
    assert_all_done_once(running, emulator, files)


def test_read_timeout_after_the_server_stored_the_upload_is_reconciled_not_reuploaded(start_daemon, emulator):
    emulator.knobs.stall_after_store_s = 3.0
    running = start_daemon(konfuzio={"timeout_seconds": 1})
    data = make_pdf(label="stalled")
    drop(running.inbox / "stalled.pdf", data)
    wait_until(lambda: len(emulator.uploads) == 1, 20, "the upload stored on the server")
    emulator.knobs.stall_after_store_s = 0.0

    running.wait_finished(1, timeout_s=30)

    assert_own_result(running.done, "stalled.pdf", data)
    assert len(emulator.uploads) == 1, "the file was uploaded twice"


def upload_refused(count: int | None = None) -> FaultRule:
    """The server refuses the file itself (a fresh rule each time: a rule counts its hits)."""
    return FaultRule(
        "POST", r"^/api/v3/documents/?$", 400, body={"data_file": ["The submitted data was not a file."]}, count=count
    )


def test_a_file_rejected_by_the_server_fails_with_the_reason(start_daemon, emulator):
    emulator.knobs.fault_rules = [upload_refused()]
    running = start_daemon()
    drop(running.inbox / "x.pdf", make_pdf(label="x"))
    running.wait_finished(1)
    report = json.loads((running.failed / "x.pdf.error.json").read_text())
    assert report["stage"] == "upload" and "400" in report["error"] and "not a file" in report["error"]


def test_an_unknown_project_blocks_visibly_and_files_wait_at_no_cost(start_daemon, emulator, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    running = start_daemon(konfuzio={"project_id": 3}, upload={"backoff_base_seconds": 0.1, "backoff_cap_seconds": 0.3})
    data = make_pdf(label="for project 3")
    drop(running.inbox / "p3.pdf", data)
    wait_until(lambda: running.daemon.gates.blocked(), 20, "the API blocked")
    (gate,) = running.daemon.gates.blocked()
    assert gate.reason == "project 3 not found or not visible to this token"
    assert "BLOCKED: project 3 not found" in running.daemon.status_line()
    assert emulator.uploads == [] and running.counts()[State.FAILED] == 0, "the file waits, it is not failed"
    emulator.project_ids = frozenset({1, 2, 3})  # the admin adds the token's user to the project

    running.wait_finished(1, timeout_s=20)
    assert_own_result(running.done, "p3.pdf", data)
    assert len([r for r in caplog.records if "project 3 not found" in r.getMessage()]) == 1, "said once"


# -- hostile files ---------------------------------------------------------------------------


def test_symlinks_fifos_and_directories_are_never_read(start_daemon, emulator, tmp_path):
    secret = tmp_path / "secret.pdf"
    secret.write_bytes(make_pdf(label="must never be uploaded"))
    running = start_daemon(watch={"settle_seconds": 0.2})
    running.inbox.mkdir(exist_ok=True)
    os.symlink(secret, running.inbox / "link.pdf")
    os.symlink("/etc/passwd", running.inbox / "passwd.pdf")
    os.mkfifo(running.inbox / "pipe.pdf")
    (running.inbox / "folder.pdf").mkdir()

    running.wait_finished(3)

    assert emulator.uploads == []
    for name in ("link.pdf", "passwd.pdf", "pipe.pdf"):
        report = json.loads((running.failed / (name + ".error.json")).read_text())
        assert report["stage"] == "validate"
        assert "symbolic link" in report["error"] or "FIFO" in report["error"]
    assert os.path.islink(running.failed / "link.pdf"), "the link itself is moved, never its target"
    assert secret.exists()
    assert (running.inbox / "folder.pdf").is_dir()


HOSTILE_NAMES = [
    b"new\nline.pdf",
    b"scan\xff\xfe.pdf",
    b"x" * 240 + b".pdf",
    b"-rf --help.pdf",
    b"up..\\..\\evil.pdf",
    b"tab\there.pdf",
    b"$(reboot).pdf",
]


def test_hostile_names_are_uploaded_safely_and_keep_their_names(start_daemon, emulator, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    running = start_daemon()
    inbox = os.fsencode(running.inbox)
    os.makedirs(inbox, exist_ok=True)
    contents = {}
    for raw in HOSTILE_NAMES:
        data = make_pdf(label=repr(raw))
        contents[raw] = data
        tmp = os.path.join(inbox, b".incoming")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(inbox, raw))

    running.wait_finished(len(HOSTILE_NAMES))

    done = os.fsencode(running.done)
    for raw, data in contents.items():
        with open(os.path.join(done, raw), "rb") as f:
            assert f.read() == data, f"{raw!r} lost its name or content"
        sidecars = [n for n in os.listdir(done) if n.startswith(raw[:100]) and n.endswith(b".json")]
        assert len(sidecars) == 1, raw
    for upload in emulator.uploads:
        assert upload.data_file_name.isascii() and upload.data_file_name.isprintable()
        assert not upload.data_file_name.startswith("-")
    for record in caplog.records:
        assert "\n" not in record.getMessage(), "a file name forged a log line"
    long_sidecar = [n for n in os.listdir(done) if n.startswith(b"xxxx") and n.endswith(b".json")][0]
    assert len(long_sidecar) <= 255


def test_files_over_the_size_cap_fail_unread(start_daemon, emulator):
    running = start_daemon(upload={"max_file_mb": 0.01})
    drop(running.inbox / "big.pdf", make_pdf(label="big") + b"%" * 20_000 + b"\n%%EOF\n")
    running.wait_finished(1)
    report = json.loads((running.failed / "big.pdf.error.json").read_text())
    assert "max_file_mb" in report["error"]
    assert emulator.uploads == []


# -- duplicates, retry, secrets ----------------------------------------------------------------


def test_duplicate_content_goes_to_failed_with_a_pointer_when_configured(start_daemon, emulator):
    running = start_daemon(upload={"on_duplicate": "fail"})
    data = make_pdf(label="same content")
    drop(running.inbox / "first.pdf", data)
    running.wait_finished(1)
    drop(running.inbox / "again/second.pdf", data)
    running.wait_finished(2)
    report = json.loads((running.failed / "again/second.pdf.error.json").read_text())
    assert report["stage"] == "duplicate"
    assert "first.pdf" in report["error"] and "done/first.pdf.json" in report["error"]
    assert len(emulator.uploads) == 1


def test_duplicate_content_is_processed_again_by_default(start_daemon, emulator):
    running = start_daemon()
    data = make_pdf(label="same content")
    drop(running.inbox / "first.pdf", data)
    running.wait_finished(1)
    drop(running.inbox / "second.pdf", data)
    running.wait_finished(2)
    assert_own_result(running.done, "second.pdf", data)
    assert len(emulator.uploads) == 2


def test_retry_puts_failed_files_back_through_the_pipeline(start_daemon, emulator, tmp_path, capsys):
    import yaml

    emulator.knobs.fault_rules = [upload_refused(count=1)]
    running = start_daemon()
    drop(running.inbox / "sub/retry me.pdf", make_pdf(label="retry"))
    running.wait_finished(1)
    assert (running.failed / "sub/retry me.pdf").exists()
    running.stop()

    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "konfuzio": {"host": emulator.url, "token": TOKEN, "project_id": 1},
                "folders": {k: str(getattr(running.config.folders, k)) for k in ("inbox", "done", "failed", "state")},
                "watch": {"settle_seconds": 0.3},
                "callback": {"host": "127.0.0.1", "port": 0},
            }
        )
    )
    assert main(["retry", "--config", str(config), "nothing/like/this.pdf"]) == 1
    assert main(["retry", "--config", str(config), "--all-failed"]) == 0
    assert "sub/retry me.pdf: back in the inbox" in capsys.readouterr().out
    assert not (running.failed / "sub/retry me.pdf.error.json").exists()

    again = start_daemon(running.config)
    wait_until(lambda: again.counts()[State.DONE] == 1, 30, "the retried file done")
    assert (again.done / "sub/retry me.pdf.json").exists()
    assert again.counts()[State.RETRIED] == 1


def test_no_token_ever_reaches_the_logs_even_at_debug_level(start_daemon, emulator):
    from konfuzio_watch.logs import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in logging.root.manager.loggerDict})
    stream = io.StringIO()
    try:
        configure_logging("human", logging.DEBUG, stream=stream)  # what `run --verbose` does
        running = start_daemon()
        drop_batch(running, 5)
        running.wait_finished(5)
        running.stop()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
    text = stream.getvalue()
    assert "doc_001.pdf: exporting -> done" in text
    assert TOKEN not in text
    tokens = [u.callback_url.rsplit("/", 1)[1] for u in emulator.uploads]
    assert tokens and not any(t in text for t in tokens)


def test_journal_survives_integrity_check(start_daemon, emulator):
    running = start_daemon()
    drop(running.inbox / "a.pdf", make_pdf(label="a"))
    running.wait_finished(1)
    assert running.daemon.journal.integrity_check() == "ok"


def test_files_with_the_same_name_exported_at_once_keep_their_own_results(tmp_path, emulator, start_daemon):
    emulator.knobs.callback_loss = 1.0  # both results wait; the restart makes them due together
    running = start_daemon(results={"callback_timeout": 600, "workers": 2})
    first, second = make_pdf(label="first scan"), make_pdf(label="second scan")
    drop(running.inbox / "scan.pdf", first)
    wait_until(lambda: running.counts()[State.UPLOADED] == 1, 20, "the first scan.pdf uploaded")
    drop(running.inbox / "scan.pdf", second)  # the scanner reuses its file name
    wait_until(lambda: running.counts()[State.UPLOADED] == 2, 20, "the second scan.pdf uploaded")
    running.stop()

    again = start_daemon(running.config)
    again.wait_finished(2)
    results = {}
    for name in ("scan.pdf", "scan (2).pdf"):
        data = (again.done / name).read_bytes()
        results[name] = assert_own_result(again.done, name, data)
    assert {(again.done / n).read_bytes() for n in results} == {first, second}


def test_polling_never_follows_a_symlinked_folder_out_of_the_inbox(start_daemon, emulator, tmp_path):
    outside = tmp_path / "outside"
    drop(outside / "secret.pdf", make_pdf(label="outside the inbox"))
    running = start_daemon(watch={"polling": True, "poll_interval": 0.1, "rescan_interval": 0.3})
    os.symlink(outside, running.inbox / "link")
    drop(running.inbox / "real.pdf", make_pdf(label="inside"))
    running.wait_finished(1)
    rescan = next(d for d in running.daemon.scheduler.duties if d.name == "rescan")
    runs = rescan.runs
    wait_until(lambda: rescan.runs >= runs + 3, 10, "three more rescans (and the polls between them)")
    assert (outside / "secret.pdf").exists()
    assert [u.data_file_name for u in emulator.uploads] == ["real.pdf"]
