"""The monitor port (/healthz, /metrics, /status) apart from the public callback port; `konfuzio-watch status`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from konfuzio_watch.journal import Journal, State
from konfuzio_watch.locks import DAEMON_LOCK_NAME
from konfuzio_watch.samples import make_pdf
from konfuzio_watch.status import print_status
from konfuzio_watch.watcher import make_observer

from .conftest import TOKEN, drop, make_config, wait_until
from .helpers import KONFUZIO_WATCH, assert_own_result

pytestmark = pytest.mark.slow  # every test starts the daemon's servers

SLOW_CLIENTS = 150  # more than Waitress' connection_limit (100) on the public port


def get(url: str) -> requests.Response:
    return requests.get(url, timeout=5)


def test_the_monitor_answers_and_files_complete_while_slow_clients_hold_the_public_port(start_daemon, emulator):
    emulator.knobs.callback_timeout_s = 1.0  # the emulator's callbacks give up soon on the starved port
    running = start_daemon(results={"callback_timeout": 0.5, "poll_interval": 0.3})
    public, monitor = running.daemon.server, running.daemon.monitor
    assert monitor.port != public.port
    slow: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:  # slowloris: a header line now and then, so the connections never idle out
        while not stop.wait(2.0):  # the attacker's pace
            for s in slow:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow: 1\r\n")

    for _ in range(SLOW_CLIENTS):
        s = socket.create_connection(("127.0.0.1", public.port), timeout=5)
        s.sendall(b"POST /konfuzio-callback/" + b"a" * 43 + b" HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    trickler = threading.Thread(target=trickle, name="slowloris")
    trickler.start()
    try:
        try:
            requests.post(f"{public.url}/konfuzio-callback/{'b' * 43}", json={}, timeout=2)
            starved = False
        except requests.Timeout:
            starved = True
        assert starved, "the slow clients did not exhaust the public port: this test proves nothing"

        health = get(f"{monitor.url}/healthz")
        assert health.status_code == 200
        said = {k: v for k, v in health.json().items() if k != "callbacks"}
        assert said == {"status": "ok", "line": "0 pending, 0 done, 0 failed", "blocked": []}
        metrics = get(f"{monitor.url}/metrics")
        assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")

        data = make_pdf(label="served while attacked")
        drop(running.inbox / "attacked.pdf", data)
        running.wait_finished(1, timeout_s=30)
        assert_own_result(running.done, "attacked.pdf", data)
        wait_until(lambda: emulator.callbacks, 10, "the emulator's callback attempt")
        assert emulator.callbacks[0].error, "the callback got through: the public port was not starved"
        families = {f.name: f for f in text_string_to_metric_families(get(f"{monitor.url}/metrics").text)}
        assert {s.labels["state"]: s.value for s in families["konfuzio_watch_files"].samples}["done"] == 1
    finally:
        stop.set()
        trickler.join()
        for s in slow:
            s.close()


def test_the_public_port_serves_only_the_callback_path(start_daemon):
    running = start_daemon()
    for path in ("/healthz", "/metrics", "/status", "/"):
        response = get(f"{running.daemon.server.url}{path}")
        assert response.status_code == 404, path
        assert response.json() == {"detail": "Not Found"}
    assert get(f"{running.daemon.monitor.url}/nothing").status_code == 404


def test_healthz_is_503_while_starting_and_stopping_and_200_while_blocked(tmp_path, emulator):
    from konfuzio_watch.daemon import Daemon

    release = threading.Event()

    def slow_observer(polling: bool, interval_s: float, skip: frozenset[str]):  # type: ignore[no-untyped-def]
        release.wait(30)  # start-up is held here, after the monitor is bound
        return make_observer(polling, interval_s, skip)

    daemon = Daemon(make_config(tmp_path, emulator), observer_factory=slow_observer)
    starter = threading.Thread(target=daemon.start, name="starter")
    starter.start()
    try:
        wait_until(lambda: daemon.monitor is not None, 20, "the monitor bound")
        starting = get(f"{daemon.monitor.url}/healthz")
        assert starting.status_code == 503 and starting.json()["status"] == "starting"
    finally:
        release.set()
        starter.join(30)
    runner = threading.Thread(target=daemon.run, name="runner")
    runner.start()
    try:
        assert get(f"{daemon.monitor.url}/healthz").status_code == 200

        emulator.knobs.outage = True  # Konfuzio answers 503: the API gate blocks, a restart would not help
        drop(daemon.config.folders.inbox / "waits.pdf", make_pdf(label="waits"))
        wait_until(lambda: daemon.gates.blocked(), 20, "the API gate blocked")
        blocked = get(f"{daemon.monitor.url}/healthz")
        assert blocked.status_code == 200
        (gate,) = blocked.json()["blocked"]
        assert gate["scope"] == "api" and "503" in gate["reason"] and gate["since"].endswith("Z")
        assert "BLOCKED" in blocked.json()["line"]

        emulator.knobs.outage = False
        wait_until(lambda: daemon.journal.counts()[State.DONE] == 1, 30, "waits.pdf done once Konfuzio is back")
        emulator.knobs.upload_latency_s = 5.0  # a step in hand while stopping
        drop(daemon.config.folders.inbox / "in-hand.pdf", make_pdf(label="in hand"))
        wait_until(
            lambda: daemon.journal.counts()[State.UPLOADING] == 1 and daemon.dispatcher.inflight,
            30,
            "in-hand.pdf uploading",
        )
        daemon.request_stop()

        def unhealthy() -> dict | None:
            response = get(f"{daemon.monitor.url}/healthz")
            return response.json() if response.status_code == 503 else None

        assert wait_until(unhealthy, 10, "503 while stopping")["status"] == "stopping"
        assert daemon.dispatcher.inflight, "the step in hand finished before the check: it proves nothing"
    finally:
        daemon.request_stop()
        runner.join(30)
    assert not runner.is_alive()


def test_status_json_carries_the_gates_and_the_extra_facts(start_daemon, emulator):
    running = start_daemon()
    running.daemon.status_sources["candidates"] = lambda: {"settling": ["a.pdf", "b.pdf"], "unreadable": []}
    running.daemon.status_sources["broken"] = lambda: 1 / 0
    status = get(f"{running.daemon.monitor.url}/status").json()
    assert status["status"] == "ok" and status["pid"] == os.getpid() and status["blocked"] == []
    assert status["line"] == "0 pending, 0 done, 0 failed" and status["in_hand"] == 0
    assert status["state_folder"] == str(running.config.folders.state)
    assert status["extra"]["watcher"].startswith("by inotify: it is on ")
    extra = {k: v for k, v in status["extra"].items() if k not in ("callbacks", "watcher")}
    assert extra == {
        "candidates": {"settling": ["a.pdf", "b.pdf"], "unreadable": []},
        "broken": {"error": "ZeroDivisionError: division by zero"},
    }
    lock = json.loads((running.config.folders.state / DAEMON_LOCK_NAME).read_text())
    assert lock["monitor_url"] == running.daemon.monitor.url and lock["pid"] == os.getpid()

    emulator.knobs.outage = True
    drop(running.inbox / "x.pdf", make_pdf(label="x"))
    wait_until(lambda: running.daemon.gates.blocked(), 20, "the API gate blocked")
    out = io.StringIO()
    print_status(running.config, show_all=False, now=time.time(), out=out)  # reads the lock file, asks the monitor
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"daemon: running (pid {os.getpid()} on host {socket.gethostname()}, since ")
    assert any(line.startswith("  BLOCKED api for ") and "503" in line for line in lines), lines
    assert "  candidates settling: 2: a.pdf, b.pdf" in lines and "  candidates unreadable: 0" in lines
    emulator.knobs.outage = False


def test_without_a_monitor_status_says_so(start_daemon):
    running = start_daemon(monitor={"enabled": False})
    assert running.daemon.monitor is None
    out = io.StringIO()
    print_status(running.config, show_all=False, now=time.time(), out=out)
    assert out.getvalue().splitlines()[1] == (
        "  its monitor is off (monitor.enabled: false) or not yet up: no live state to show"
    )


def status_process(config: Path, **kwargs) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [*KONFUZIO_WATCH, "status", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LOG_TO_FILE": "False"},
        **kwargs,
    )


def write_config(tmp_path: Path, emulator, **sections: dict) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "konfuzio": {"host": emulator.url, "token": TOKEN, "project_id": 1},
                "folders": {name: str(tmp_path / name) for name in ("inbox", "done", "failed", "state")},
                "callback": {"host": "127.0.0.1", "port": 0},
                **sections,
            }
        )
    )
    return path


def test_status_into_a_closed_pipe_prints_no_traceback(tmp_path, emulator):
    config = write_config(tmp_path, emulator)
    journal = Journal(tmp_path / "state" / "journal.sqlite3")
    journal.add_claims([f"pending/{i:04d}.pdf".encode() for i in range(400)], time.time())  # a long listing
    journal.close()
    proc = status_process(config)
    assert proc.stdout
    proc.stdout.close()  # `| head -1` that has read its line: nobody reads the rest
    _, err = proc.communicate(timeout=30)
    assert err == b"", err.decode()
    assert proc.returncode == 0


def test_status_on_a_corrupt_or_unreadable_journal_is_one_line(tmp_path, emulator):
    config = write_config(tmp_path, emulator)
    path = tmp_path / "state" / "journal.sqlite3"
    path.parent.mkdir()
    garbage = b"this is no SQLite database, just some bytes\n" * 100
    path.write_bytes(garbage)
    proc = status_process(config)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.decode() == f"konfuzio-watch: cannot read the journal {path}: file is not a database\n"
    assert out.decode() == "daemon: no daemon running\n\n"
    assert path.read_bytes() == garbage

    path.unlink()
    path.mkdir()  # unreadable as a database, even for root
    proc = status_process(config)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.decode() == f"konfuzio-watch: cannot read the journal {path}: unable to open database file\n"


def test_a_taken_monitor_port_is_one_line(tmp_path, emulator):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, emulator, monitor={"port": port})
        proc = subprocess.Popen(
            [*KONFUZIO_WATCH, "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LOG_TO_FILE": "False"},
        )
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert (
        err == f"konfuzio-watch: cannot start: monitor.port: cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n"
    )
