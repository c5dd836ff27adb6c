"""What an admin is told: callbacks that cannot arrive, poll-only mode, a rejected token, and
notifications — each end to end with the real daemon, the emulator and a local webhook."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from konfuzio_watch.journal import State
from konfuzio_watch.monitor import local_url
from konfuzio_watch.samples import make_pdf

from .conftest import TOKEN, drop, make_config, wait_until
from .helpers import KONFUZIO_WATCH, assert_own_result

pytestmark = pytest.mark.slow  # every test starts the real daemon against the emulator


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(running, name: str, **labels: str) -> float | None:  # type: ignore[no-untyped-def]
    text = requests.get(local_url(running.daemon.monitor) + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def messages(caplog, text: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_public_url_that_leads_nowhere_is_said_at_start_and_results_are_polled_soon(start_daemon, emulator, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    nowhere = f"http://127.0.0.1:{closed_port()}"
    running = start_daemon(
        callback={"public_url": nowhere},
        results={"callback_timeout": 600, "first_poll_seconds": 0.3, "poll_interval": 1},
    )
    wait_until(lambda: messages(caplog, "callbacks arriving: no"), 20, "the probe's warning")
    (warning,) = messages(caplog, "callbacks arriving: no")
    assert f"a probe through {nowhere} failed at " in warning
    assert ": cannot connect to 127.0.0.1:" in warning and "connection refused" in warning
    assert "; results are polled (0.3 s after the upload, then less and less often up to every 1 s)" in warning
    assert metric(running, "konfuzio_watch_callbacks_arriving") == 0
    status = requests.get(local_url(running.daemon.monitor) + "/status", timeout=5).json()
    assert status["callbacks"]["arriving"] is False and "connection refused" in status["callbacks"]["text"]

    data = make_pdf(label="no callback can come")
    drop(running.inbox / "polled.pdf", data)
    running.wait_finished(1, timeout_s=20)  # not after callback_timeout (600 s)
    assert_own_result(running.done, "polled.pdf", data)


def test_poll_only_mode_needs_no_inbound_port_and_finishes_soon_after_processing(start_daemon, emulator):
    emulator.knobs.processing_s = 1.0
    running = start_daemon(
        callback={"enabled": False}, results={"callback_timeout": 600, "first_poll_seconds": 0.3, "poll_interval": 30}
    )
    assert running.daemon.server is None and running.daemon.public_url is None
    data = make_pdf(label="poll only")
    drop(running.inbox / "p.pdf", data)
    running.wait_finished(1, timeout_s=15)
    assert_own_result(running.done, "p.pdf", data)
    assert emulator.uploads[0].callback_url in (None, ""), "no callback URL is sent"
    assert emulator.callbacks == []
    row = running.daemon.journal.rows(limit=1)[0]
    assert row.finished_at - row.uploaded_at < 4.0, "found within seconds of being processed"


def test_callbacks_that_stop_arriving_are_said_once(start_daemon, emulator, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    emulator.knobs.callback_loss = 1.0  # the route works (the probe passes), Konfuzio's callbacks get lost
    running = start_daemon(results={"callback_timeout": 0.3, "poll_interval": 0.3})
    wait_until(lambda: messages(caplog, "callbacks arriving: yes: a probe through"), 20, "the probe passed")
    for i in range(5):
        drop(running.inbox / f"lost{i}.pdf", make_pdf(label=f"lost {i}"))
    running.wait_finished(5, timeout_s=30)
    (warning,) = messages(caplog, "callbacks arriving: no")
    assert "callbacks arriving: no: 3 results in a row were found by polling, their callbacks never came" in warning
    assert metric(running, "konfuzio_watch_callbacks_arriving") == 0
    said = requests.get(local_url(running.daemon.monitor) + "/healthz", timeout=5).json()["callbacks"]
    assert said["arriving"] is False and f"callbacks arriving: {said['text']} (check" in warning


def test_a_rejected_token_blocks_visibly_and_a_rotated_token_file_resumes(tmp_path, emulator, start_daemon, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    token_file = tmp_path / "konfuzio-token"
    token_file.write_text("an-old-token\n")
    config = make_config(
        tmp_path,
        emulator,
        konfuzio={"token": None, "token_file": str(token_file)},
        upload={"backoff_base_seconds": 0.1, "backoff_cap_seconds": 0.3},
    )
    running = start_daemon(config)
    data = make_pdf(label="waits for a token")
    drop(running.inbox / "t.pdf", data)
    wait_until(lambda: running.daemon.gates.blocked(), 20, "the API blocked")
    (gate,) = running.daemon.gates.blocked()
    assert gate.reason == "Konfuzio rejected the API token (HTTP 401)"
    health = requests.get(local_url(running.daemon.monitor) + "/healthz", timeout=5).json()
    assert health["blocked"] and "rejected the API token" in json.dumps(health["blocked"])
    assert "BLOCKED: Konfuzio rejected the API token (HTTP 401)" in running.daemon.status_line()
    assert metric(running, "konfuzio_watch_blocked", scope="api") == 1
    assert emulator.uploads == [] and running.counts()[State.FAILED] == 0

    token_file.write_text(TOKEN + "\n")  # systemd's credential rotated, no restart
    running.wait_finished(1, timeout_s=20)
    assert_own_result(running.done, "t.pdf", data)
    assert len(messages(caplog, "Konfuzio rejected the API token")) == 1, "one ERROR, not one per try"
    assert messages(caplog, "the API token in") and messages(caplog, "changed; trying the new one")
    row = running.daemon.journal.rows(limit=1)[0]
    assert row.attempts == 1, "the wait cost the file no attempt"


def test_failed_files_and_blocks_reach_the_admin_by_webhook(start_daemon, emulator, receiver):
    rec, server = receiver
    running = start_daemon(alerts={"urls": [f"json://127.0.0.1:{server.port}/kw"], "min_interval_seconds": 0.5})
    drop(running.inbox / "notes.txt", b"not a document\n")
    running.wait_finished(1)
    wait_until(rec.accepted, 30, "a notification")
    (message,) = rec.accepted()
    assert "notes.txt" in message["message"] and "failed" in message["title"]


def said_by_status(config) -> list[str]:  # type: ignore[no-untyped-def]
    """What ``konfuzio-watch status`` (a process of its own) says about callbacks."""
    result = subprocess.run(
        [*KONFUZIO_WATCH, "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOG_TO_FILE": "False"},
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if "callback" in line]


def callbacks_said(daemon, arriving: bool) -> dict:  # type: ignore[no-untyped-def]
    """The monitor's /healthz once it says ``arriving``; the callbacks part of it."""

    def said() -> dict | None:
        found = requests.get(f"{daemon.monitor_url}/healthz", timeout=5).json().get("callbacks") or {}
        return found if found.get("arriving") is arriving else None

    return wait_until(
        said, 20, lambda: f"/healthz saying callbacks arriving: {arriving} (log: {daemon.log.read_text()[-1500:]})"
    )


def prometheus(daemon, name: str) -> float | None:  # type: ignore[no-untyped-def]
    text = requests.get(f"{daemon.monitor_url}/metrics", timeout=5).text
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name), None)


def test_callbacks_that_cannot_arrive_are_one_truth_in_status_healthz_metrics_and_the_log(daemon_process):
    nowhere = f"http://127.0.0.1:{closed_port()}"
    daemon = daemon_process(callback={"public_url": nowhere})
    daemon.start()

    said = callbacks_said(daemon, arriving=False)
    text = said["text"]
    assert text.startswith(f"no: a probe through {nowhere} failed at "), text
    assert "cannot connect to 127.0.0.1:" in text and "connection refused" in text, text
    assert text.endswith("; results are polled"), text
    assert said_by_status(daemon.config) == [f"  callbacks arriving: {text}"]
    assert requests.get(f"{daemon.monitor_url}/status", timeout=5).json()["callbacks"] == said
    assert prometheus(daemon, "konfuzio_watch_callbacks_arriving") == 0
    wait_until(
        lambda: f"WARNING callbacks arriving: {text}" in daemon.log.read_text(),
        10,
        lambda: f"the log saying it: {daemon.log.read_text()[-1500:]}",
    )


def test_callbacks_that_arrive_are_yes_in_status_healthz_metrics_and_the_log(daemon_process, emulator):
    daemon = daemon_process()
    daemon.start()
    said = callbacks_said(daemon, arriving=True)
    assert said["text"].startswith(f"yes: a probe through http://127.0.0.1:{daemon.port} arrived at "), said
    assert f"INFO    callbacks arriving: {said['text']}" in daemon.log.read_text()

    data = make_pdf(label="called back")
    drop(daemon.root / "inbox" / "called.pdf", data)
    wait_until(lambda: (daemon.root / "done" / "called.pdf.json").exists(), 30, "called.pdf done")
    assert emulator.callbacks and not emulator.callbacks[0].error, "the file's callback arrived"
    said = callbacks_said(daemon, arriving=True)
    assert said["text"].startswith("yes: the last callback arrived at "), said
    assert said_by_status(daemon.config) == [f"  callbacks arriving: {said['text']}"]
    assert prometheus(daemon, "konfuzio_watch_callbacks_arriving") == 1
    assert "callbacks arriving: no" not in daemon.log.read_text()
