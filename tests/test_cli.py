"""The command line: check against the emulator, status of a real journal, run as a process."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from konfuzio_watch.checks import run_checks
from konfuzio_watch.cli import main
from konfuzio_watch.journal import State
from konfuzio_watch.samples import make_pdf
from konfuzio_watch.status import print_status

from .conftest import TOKEN, drop, wait_until
from .helpers import KONFUZIO_WATCH
from .pg import free_port

pytestmark = pytest.mark.slow  # every test starts the emulator, and the daemon in a thread or as a process


def write_config(tmp_path: Path, emulator, **overrides) -> Path:  # type: ignore[no-untyped-def]
    raw = {
        "konfuzio": {"host": emulator.url, "token": TOKEN, "project_id": 1},
        "folders": {"inbox": "inbox", "done": "done", "failed": "failed", "state": "state"},
        "watch": {"settle_seconds": 0.2},
        "callback": {"host": "127.0.0.1", "port": 0},
        "monitor": {"port": 0},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_check_passes_against_the_emulator(tmp_path, emulator, capsys):
    (tmp_path / "inbox").mkdir()
    assert main(["check", "--config", str(write_config(tmp_path, emulator))]) == 0
    out = capsys.readouterr().out
    assert "ok    Konfuzio API: project 1" in out
    assert (
        "ok    watcher: by inotify: it is on " in out
        and ", a local file system; `run` first checks with a probe file that its events arrive, else it polls" in out
    )
    assert "FAIL" not in out


def test_check_fails_on_a_wrong_token_and_an_unknown_project(tmp_path, emulator, capsys):
    (tmp_path / "inbox").mkdir()
    config = write_config(tmp_path, emulator, konfuzio={"token": "wrong", "project_id": 99})
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  Konfuzio API: Konfuzio rejected the API token (HTTP 401) -> put a valid token" in out


def test_check_names_an_unknown_project_and_what_to_do(tmp_path, emulator, capsys):
    (tmp_path / "inbox").mkdir()
    assert main(["check", "--config", str(write_config(tmp_path, emulator, konfuzio={"project_id": 99}))]) == 1
    out = capsys.readouterr().out
    assert "FAIL  Konfuzio API: project 99 not found or not visible to this token -> check konfuzio.project_id" in out


def test_check_catches_what_run_would_reject(tmp_path, emulator, capsys):
    import socket

    (tmp_path / "inbox").mkdir()
    (tmp_path / "done").mkdir()
    (tmp_path / "done").chmod(0o555)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        config = write_config(
            tmp_path,
            emulator,
            callback={"port": port},
            ngrok={"enabled": True, "authtoken": "x", "path": str(tmp_path / "no-ngrok")},
        )
        assert main(["check", "--config", str(config)]) == 1
    finally:
        busy.close()
    out = capsys.readouterr().out
    assert f"FAIL  callback.port: 127.0.0.1:{port} is in use -> stop what listens there" in out
    assert "FAIL  ngrok.path:" in out and "is missing or not executable -> install the ngrok agent" in out
    if os.geteuid() != 0:  # root may write anywhere
        assert "FAIL  folders.done: cannot write into" in out


def test_check_reports_a_missing_inbox(tmp_path, emulator, capsys):
    assert main(["check", "--config", str(write_config(tmp_path, emulator))]) == 1
    assert "FAIL  folders.inbox" in capsys.readouterr().out


def test_status_shows_where_each_file_is(tmp_path, emulator, start_daemon):
    running = start_daemon(upload={"concurrency": 1})
    emulator.knobs.processing_s = 30  # keep them pending
    for i in range(3):
        drop(running.inbox / f"doc_{i}.pdf", make_pdf(label=str(i)))
    wait_until(lambda: running.counts()[State.UPLOADED] == 3, 20, "3 uploads recorded in the journal")
    out = io.StringIO()
    print_status(running.config, show_all=False, now=time.time(), out=out)
    text = out.getvalue()
    assert "uploaded        3" in text
    assert "pending         3   oldest" in text
    for i in range(3):
        assert f"doc_{i}.pdf" in text


def test_status_watch_redraws(tmp_path, emulator, start_daemon):
    from konfuzio_watch.status import watch_status

    running = start_daemon()
    drop(running.inbox / "w.pdf", make_pdf(label="w"))
    running.wait_finished(1)
    out = io.StringIO()
    watch_status(running.config, show_all=True, interval_s=0.01, out=out, iterations=2)
    frames = out.getvalue().split("\x1b[H\x1b[2J")[1:]
    assert len(frames) == 2 and all("done            1" in f and "w.pdf" in f for f in frames)


def test_json_log_format_is_one_object_per_line(tmp_path, emulator):
    import json

    config = write_config(tmp_path, emulator)
    proc = subprocess.Popen(
        [sys.executable, "-m", "konfuzio_watch", "run", "--config", str(config), "--log-format", "json"],
        cwd=tmp_path,
        env={**os.environ, "LOG_TO_FILE": "False"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        drop(tmp_path / "inbox" / "new\nline.pdf", make_pdf(label="j"))
        wait_until(lambda: (tmp_path / "done" / "new\nline.pdf").exists(), 30, "exported")
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    entries = [json.loads(line) for line in log.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["message"] == "new\\nline.pdf: exporting -> done (done/new\\nline.pdf)" for e in entries)
    done = next(e for e in entries if e.get("state") == "done")
    assert done["file"] == "new\\nline.pdf" and done["old_state"] == "exporting"
    assert isinstance(done["document_id"], int)


def test_run_as_a_process_processes_files_and_stops_cleanly_on_sigterm(tmp_path, emulator):
    config = write_config(tmp_path, emulator)
    env = {**os.environ, "LOG_TO_FILE": "False"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "konfuzio_watch", "run", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        data = make_pdf(label="as a process")
        drop(tmp_path / "inbox" / "one.pdf", data)
        wait_until(lambda: (tmp_path / "done" / "one.pdf.json").exists(), 30, "one.pdf exported")
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "one.pdf: exporting -> done" in log
    assert TOKEN not in log
    assert not (tmp_path / "konfuzio_sdk.log").exists(), "the SDK must not write a log file into the cwd"


def test_status_and_retry_need_no_secrets(tmp_path, emulator):
    """They only read the journal and move files: the service's ${CREDENTIALS_DIRECTORY} is not set here."""
    config = write_config(tmp_path, emulator)
    text = config.read_text().replace(f"token: {TOKEN}", "token_file: ${CREDENTIALS_DIRECTORY}/konfuzio-token")
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY", "KONFUZIO_TOKEN")}
    env["LOG_TO_FILE"] = "False"
    for command in (["status"], ["retry", "--all-failed"]):
        done = subprocess.run(
            [sys.executable, "-m", "konfuzio_watch", *command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, (command, done.stderr)
        assert "Traceback" not in done.stderr
    run = subprocess.run(
        [sys.executable, "-m", "konfuzio_watch", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "CREDENTIALS_DIRECTORY is not set" in run.stderr, "commands that call the API still need the token"


def test_retry_all_failed_with_nothing_failed_says_so(tmp_path, emulator):
    config = write_config(tmp_path, emulator)

    done = subprocess.run(
        [sys.executable, "-m", "konfuzio_watch", "retry", "--all-failed", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOG_TO_FILE": "False"},
    )

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"nothing to retry: the journal holds no failed file (failed/: {tmp_path / 'failed'})\n"


def test_demo_workdir_leaves_a_config_that_status_reads_as_the_readme_says(tmp_path):
    """From a fresh folder: the demo kept in demo-run/, then status on what it left there."""
    env = {**os.environ, "LOG_TO_FILE": "False"}

    def konfuzio_watch(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "konfuzio_watch", *line.split()],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    demo = konfuzio_watch("demo --workdir demo-run --files 2")
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert demo.stdout.rstrip().endswith("konfuzio-watch status --config demo-run/config.yaml"), demo.stdout[-500:]
    status = konfuzio_watch("status --config demo-run/config.yaml")
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"^done\s+2$", status.stdout, re.M), status.stdout

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert "`.venv/bin/konfuzio-watch demo --workdir demo-run`" in readme
    assert "`.venv/bin/konfuzio-watch status --config demo-run/config.yaml`" in readme


def test_check_recognises_its_own_running_daemon_on_the_callback_and_monitor_ports(daemon_process):
    """On the machine where the daemon runs, its ports are in use by it: that is no problem to report."""
    daemon = daemon_process(monitor={"port": free_port()})
    daemon.start()
    assert daemon.proc
    pid = daemon.proc.pid
    result = subprocess.run(
        [*KONFUZIO_WATCH, "check", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOG_TO_FILE": "False"},
    )
    out = result.stdout
    assert f"ok    callback.port: 127.0.0.1:{daemon.port} is served by the running konfuzio-watch (pid {pid})" in out, (
        out
    )
    monitor_port = yaml.safe_load(daemon.config.read_text())["monitor"]["port"]
    assert f"ok    monitor.port: 127.0.0.1:{monitor_port} is served by the running konfuzio-watch (pid {pid})" in out, (
        out
    )
    assert f"ok    callbacks: yes: a probe through http://127.0.0.1:{daemon.port} arrived at " in out, out
    assert "FAIL" not in out and result.returncode == 0, out + result.stderr


def test_check_names_what_else_holds_the_monitor_port(tmp_path, emulator, capsys):
    import socket

    (tmp_path / "inbox").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["check", "--config", str(write_config(tmp_path, emulator, monitor={"port": port}))]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  monitor.port: 127.0.0.1:{port} is in use -> stop what listens there" in out, out


def test_check_on_the_daemons_machine_says_what_it_says_of_its_callbacks(start_daemon):
    """The daemon holds the callback port, so check cannot probe the route itself: it reports the daemon's answer."""
    port = free_port()
    nowhere = f"http://127.0.0.1:{free_port()}"
    running = start_daemon(callback={"port": port, "public_url": nowhere})
    wait_until(lambda: running.daemon.callbacks_arriving() is False, 20, "the daemon's probe failed")
    out = io.StringIO()
    problems = run_checks(running.config, out)
    text = out.getvalue()
    assert f"ok    callback.port: 127.0.0.1:{port} is served by the running konfuzio-watch (pid {os.getpid()})" in text
    verdict = running.daemon.callbacks_verdict().text
    assert f"FAIL  callbacks: {verdict} -> make the public callback URL reach" in text, text
    assert problems == [f"callbacks: {verdict}"]
