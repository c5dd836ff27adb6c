"""Operations: routing, polling and the inotify fallback, sd_notify, SIGTERM drain, /metrics."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from watchdog.observers.api import BaseObserver, EventEmitter

from konfuzio_watch.config import Route
from konfuzio_watch.events import Wake
from konfuzio_watch.journal import State
from konfuzio_watch.samples import make_pdf
from konfuzio_watch.sdnotify import Notifier
from konfuzio_watch.watcher import make_observer

from .conftest import drop, make_config, wait_until
from .helpers import DaemonProcess, assert_each_file_finished_exactly_once, assert_own_result, sample_files

pytestmark = pytest.mark.slow  # every test starts the daemon against the emulator


def test_routes_send_subfolders_to_their_project_and_category(start_daemon, emulator, tmp_path):
    config = dataclasses.replace(
        make_config(tmp_path, emulator),
        routes=(
            Route(match="accounting/*", project_id=2, category_id=7),
            Route(match="*.png", dataset_status=3),
        ),
    )
    running = start_daemon(config)
    drop(running.inbox / "accounting/2026/invoice.pdf", make_pdf(label="acc"))
    drop(running.inbox / "hr/contract.pdf", make_pdf(label="hr"))
    running.wait_finished(2)
    by_name = {u.data_file_name: u for u in emulator.uploads}
    assert (by_name["invoice.pdf"].project, by_name["invoice.pdf"].category) == (2, 7)
    assert (by_name["contract.pdf"].project, by_name["contract.pdf"].category) == (1, None)
    assert (running.done / "accounting/2026/invoice.pdf.json").exists()


def test_polling_mode_for_network_shares(start_daemon, emulator):
    running = start_daemon(watch={"polling": True, "poll_interval": 0.2})
    assert running.daemon.watcher.polling
    data = make_pdf(label="polled")
    drop(running.inbox / "share/scan.pdf", data)
    running.wait_finished(1)
    assert_own_result(running.done, "share/scan.pdf", data)


class _DeadEmitter(EventEmitter):
    """inotify that never delivers (as on an SMB/NFS mount written by another machine)."""

    def queue_events(self, timeout: float) -> None:
        self.stopped_event.wait(timeout)


def _dead_inotify(polling: bool, interval_s: float, skip: frozenset[str]) -> BaseObserver:
    return make_observer(True, interval_s, skip) if polling else BaseObserver(emitter_class=_DeadEmitter)


def test_dead_inotify_is_detected_and_polling_takes_over(start_daemon, emulator, caplog):
    caplog.set_level(logging.WARNING, logger="konfuzio_watch")
    running = start_daemon(watch={"poll_interval": 0.2}, daemon_kwargs={"observer_factory": _dead_inotify})
    assert running.daemon.watcher.polling, "did not fall back to polling"
    assert any("polling every" in r.getMessage() for r in caplog.records)
    data = make_pdf(label="arrived over SMB")
    drop(running.inbox / "scan.pdf", data)
    running.wait_finished(1)
    assert_own_result(running.done, "scan.pdf", data)


def test_periodic_rescan_finds_files_the_events_missed(start_daemon, emulator):
    never = lambda polling, interval, skip: BaseObserver(emitter_class=_DeadEmitter)  # noqa: E731
    running = start_daemon(watch={"rescan_interval": 0.5}, daemon_kwargs={"observer_factory": never})
    data = make_pdf(label="missed event")
    drop(running.inbox / "missed.pdf", data)
    running.wait_finished(1)
    assert_own_result(running.done, "missed.pdf", data)


def _notify_socket(tmp_path):  # type: ignore[no-untyped-def]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(10)
    return sock, path


def _messages_until(sock: socket.socket, wanted: str, deadline_s: float = 20) -> list[str]:
    seen: list[str] = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        seen.append(sock.recv(4096).decode())
        if wanted in seen[-1]:
            return seen
    pytest.fail(f"{wanted} never arrived; got {seen}")


def test_sd_notify_ready_status_watchdog_stopping(start_daemon, emulator, tmp_path):
    sock, path = _notify_socket(tmp_path)
    try:
        notifier = Notifier(path, watchdog_usec=200_000)
        running = start_daemon(daemon_kwargs={"notifier": notifier})
        first = _messages_until(sock, "READY=1")
        assert "STATUS=0 pending, 0 done, 0 failed" in first[-1]
        assert requests.get(f"{running.daemon.monitor.url}/healthz", timeout=5).status_code == 200
        watchdogs = [m for m in _messages_until(sock, "WATCHDOG=1") if m == "WATCHDOG=1"]
        watchdogs += [m for m in _messages_until(sock, "WATCHDOG=1") if m == "WATCHDOG=1"]
        assert len(watchdogs) >= 2
        drop(running.inbox / "x.pdf", make_pdf(label="x"))
        running.wait_finished(1)
        _messages_until(sock, "STATUS=0 pending, 1 done, 0 failed")
        running.stop()
        assert "STOPPING=1" in _messages_until(sock, "STOPPING=1")[-1]
    finally:
        sock.close()


def test_sigterm_with_files_in_flight_drains_and_loses_nothing(emulator, tmp_path):
    emulator.knobs.upload_latency_s = 0.8
    emulator.knobs.processing_s = 0.5
    sock, path = _notify_socket(tmp_path)
    daemon = DaemonProcess(tmp_path, emulator, upload={"concurrency": 2})
    files = sample_files(8, "batch")
    try:
        os.environ["NOTIFY_SOCKET"] = path
        try:
            daemon.start()
        finally:
            del os.environ["NOTIFY_SOCKET"]
        assert "READY=1" in _messages_until(sock, "READY=1")[-1]
        for rel, data in files.items():
            drop(tmp_path / "inbox" / rel, data)
        wait_until(
            lambda: daemon.journal("SELECT COUNT(*) FROM files WHERE state = 'uploading'")[0][0] >= 1,
            30,
            "uploads in flight",
        )
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(60) == 0
        assert time.monotonic() - started < 30, "the drain must fit well inside TimeoutStopSec"
        assert "STOPPING=1" in _messages_until(sock, "STOPPING=1")[-1]
        states = dict(daemon.journal("SELECT state, COUNT(*) FROM files GROUP BY state"))
        assert "uploading" not in states, f"a step in hand was abandoned: {states}"

        daemon.start()
        wait_until(lambda: daemon.done_count() >= 8, 60, "all files done after the restart")
        assert daemon.terminate() == 0
        assert_each_file_finished_exactly_once(tmp_path, emulator, files)
    finally:
        daemon.cleanup()
        sock.close()


def test_metrics_are_prometheus_text(start_daemon, emulator):
    running = start_daemon()
    for i in range(3):
        drop(running.inbox / f"m{i}.pdf", make_pdf(label=str(i)))
    drop(running.inbox / "bad.txt", b"not a document")
    running.wait_finished(4)
    response = requests.get(f"{running.daemon.monitor.url}/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    files = {s.labels["state"]: s.value for s in families["konfuzio_watch_files"].samples}
    assert files["done"] == 3 and files["failed"] == 1
    assert families["konfuzio_watch_uploads"].samples[0].value == 3
    assert families["konfuzio_watch_up"].samples[0].value == 1
    latency = {
        s.name: s.value for s in families["konfuzio_watch_callback_latency_seconds"].samples if not s.labels.get("le")
    }
    recorded = running.metric("callbacks_total", outcome="recorded")
    assert latency["konfuzio_watch_callback_latency_seconds_count"] == recorded
    assert running.counts()[State.DONE] == 3


def test_tunnel_url_is_used_for_callbacks_reopened_when_the_agent_dies_and_closed_on_exit(
    start_daemon, emulator, agent_path, records
):
    emulator.knobs.callback_loss = 1.0  # the made-up public URL leads nowhere: results come by polling
    running = start_daemon(
        ngrok={"enabled": True, "path": str(agent_path), "authtoken": "ngrok-secret"},
        results={"callback_timeout": 0.3, "poll_interval": 0.2},
    )
    first_url = running.daemon.public_url
    assert first_url.startswith("https://") and first_url != running.daemon.server.url
    drop(running.inbox / "one.pdf", make_pdf(label="one"))
    running.wait_finished(1)
    assert emulator.uploads[0].callback_url.startswith(f"{first_url}/konfuzio-callback/")

    os.kill(running.daemon.tunnel.agent_pid, signal.SIGKILL)
    next(d for d in running.daemon.scheduler.duties if d.name == "tunnel").next_at = 0.0  # don't wait 30 s
    running.daemon.scheduler.report(Wake())
    wait_until(lambda: running.daemon.public_url != first_url, 30, "the tunnel reopened under a new URL")
    drop(running.inbox / "two.pdf", make_pdf(label="two"))
    running.wait_finished(2)
    assert emulator.uploads[1].callback_url.startswith(f"{running.daemon.public_url}/konfuzio-callback/")

    agent = running.daemon.tunnel.agent_pid
    running.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(agent, 0)


def test_a_failed_start_stops_what_it_had_started(tmp_path, emulator):
    from konfuzio_watch.daemon import Daemon

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = make_config(tmp_path, emulator, callback={"port": busy.getsockname()[1]})
        with pytest.raises(OSError):
            Daemon(config).start()
    # the autouse thread-leak check proves the pools and the journal were closed
