"""deliver.command: real subprocesses, real process groups, hostile file names (issue 25)."""

from __future__ import annotations

import ast
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from konfuzio_watch.deliver_command import EX_TEMPFAIL, command_args, command_env, run_command
from konfuzio_watch.delivery import Delivery

from .conftest import wait_until

PY = sys.executable
# A name a user may well give a file: a newline, quotes, a placeholder's spelling, bytes that are not UTF-8
HOSTILE = b"we\"ird\n'name {key} \xff\xfe.pdf"


def delivery(folder: Path, name: bytes = b"scan.pdf", *, document_id: int | None = 7, revision: int | None = 2):
    file_path = Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))
    json_path = Path(os.fsdecode(os.fsencode(file_path) + b".json"))
    key = f"{document_id}:{revision}" if document_id is not None else "failed:3"
    return Delivery(key, "done", json_path, file_path, document_id, revision, b'{"a": 1}')


def is_running(pid: int) -> bool:
    """Alive and not a zombie (in a container nobody may reap an orphan at once)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def sh(script: str, *args: str) -> list[str]:
    return ["sh", "-c", script, "sh", *args]


# -- the pure parts ------------------------------------------------------------------------------


def test_placeholders_are_filled_per_argument_in_one_pass(tmp_path: Path) -> None:
    d = delivery(tmp_path, HOSTILE)
    json_b, file_b = os.fsencode(d.json_path), os.fsencode(d.file_path)
    args = command_args(["/bin/x", "{json}", "--file={file}", "{event}/{key}", "{nope}", "{json}{json}", "{{key}}"], d)
    assert args == [
        b"/bin/x",
        json_b,
        b"--file=" + file_b,
        b"done/7:2",
        b"{nope}",
        json_b + json_b,
        b"{7:2}",
    ]
    assert b"{key}" in file_b  # the name's own "{key}" was not filled in again


def test_environment_carries_the_facts_and_not_the_daemons_secrets(tmp_path: Path) -> None:
    d = delivery(tmp_path, HOSTILE, document_id=None, revision=None)
    base = {
        b"PATH": b"/usr/bin",
        b"KONFUZIO_TOKEN": b"secret",
        b"NOTIFY_SOCKET": b"/run/x",
        b"KONFUZIO_WATCH_KEY": b"old",
    }
    env = command_env(d, base)
    assert env[b"PATH"] == b"/usr/bin"
    assert b"KONFUZIO_TOKEN" not in env and b"NOTIFY_SOCKET" not in env
    assert env[b"KONFUZIO_WATCH_KEY"] == b"failed:3"
    assert env[b"KONFUZIO_WATCH_FILE"] == os.fsencode(d.file_path)
    assert env[b"KONFUZIO_WATCH_DOCUMENT_ID"] == env[b"KONFUZIO_WATCH_REVISION"] == b""


# -- real commands -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("code", "ok", "retry"),
    [(0, True, False), (EX_TEMPFAIL, False, True), (1, False, False), (2, False, False)],
)
def test_exit_code_decides(tmp_path: Path, code: int, ok: bool, retry: bool) -> None:
    sent = run_command(sh('echo "it went: $1" >&2; exit "$1"', str(code)), delivery(tmp_path), timeout_s=30)
    assert (sent.ok, sent.retry) == (ok, retry), sent
    assert "\n" not in sent.detail
    if code:
        assert f"exited with {code}" in sent.detail and f"it went: {code}" in sent.detail


@pytest.mark.slow
def test_stdin_is_closed(tmp_path: Path) -> None:
    reads_stdin = [PY, "-c", "import sys; sys.exit(0 if sys.stdin.buffer.read() == b'' else 1)"]
    assert run_command(reads_stdin, delivery(tmp_path), timeout_s=30).ok


@pytest.mark.slow
def test_killed_by_a_signal_fails(tmp_path: Path) -> None:
    sent = run_command(sh("kill -SEGV $$"), delivery(tmp_path), timeout_s=30)
    assert (sent.ok, sent.retry) == (False, False) and "SIGSEGV" in sent.detail


@pytest.mark.slow
def test_a_program_that_cannot_run_fails_with_one_line(tmp_path: Path) -> None:
    not_executable = tmp_path / "import-result"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    for program, why in ((tmp_path / "missing", "No such file"), (not_executable, "Permission denied")):
        sent = run_command([str(program), "{json}"], delivery(tmp_path), timeout_s=30)
        assert (sent.ok, sent.retry) == (False, False), sent
        assert why in sent.detail and str(program) in sent.detail and "\n" not in sent.detail


@pytest.mark.slow
def test_timeout_kills_the_whole_group_in_time(tmp_path: Path) -> None:
    """The command leaves a child that would outlive it (holding its output open) and hangs itself:
    at the timeout both are gone, and the call has not taken much longer than the timeout."""
    pid_file = tmp_path / "child.pid"
    script = 'sleep 300 & echo $! > "$1"; trap "" TERM; sleep 300'
    started = time.monotonic()
    sent = run_command(sh(script, str(pid_file)), delivery(tmp_path), timeout_s=1.0)
    took = time.monotonic() - started
    assert (sent.ok, sent.retry) == (False, True) and "timed out after 1 s" in sent.detail, sent
    assert 1.0 <= took < 3.0, took
    child = int(pid_file.read_text())
    wait_until(lambda: not is_running(child), 5, f"the command's child {child} killed with its group")


@pytest.mark.slow
def test_a_hanging_command_writing_without_end_is_held_to_the_timeout(tmp_path: Path) -> None:
    started = time.monotonic()
    sent = run_command(["yes", "all work and no play"], delivery(tmp_path), timeout_s=1.0)
    assert sent.retry and not sent.ok
    assert time.monotonic() - started < 3.0


@pytest.mark.slow
def test_a_child_left_running_is_not_waited_for(tmp_path: Path) -> None:
    """The command exits 0 but leaves a child holding its stdout: delivered at once, not at the timeout."""
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    sent = run_command(sh('sleep 60 & echo $! > "$1"; echo imported', str(pid_file)), delivery(tmp_path), timeout_s=30)
    try:
        assert sent.ok, sent
        assert time.monotonic() - started < 5.0
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.slow
def test_output_is_bounded_and_logged_one_line_per_stream(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    ten_mb = 10_000_000
    writer = f"import sys\nfor s in (sys.stdout, sys.stderr):\n    s.buffer.write(b'x\\n' * {ten_mb // 2})\nsys.exit(1)"
    sent = run_command([PY, "-c", writer], delivery(tmp_path), timeout_s=60, max_output=4096)
    assert (sent.ok, sent.retry) == (False, False) and "exited with 1" in sent.detail
    assert len(sent.detail) < 500
    lines = [r.getMessage() for r in caplog.records if r.name == "konfuzio_watch"]
    assert len(lines) == 2, lines
    for stream, line in zip(("stdout", "stderr"), lines, strict=True):
        assert "python" in line and f" {stream}: " in line
        assert f"[... {ten_mb - 4096} more bytes not kept]" in line
        assert "\n" not in line and len(line) < 4096 * 2 + 300


@pytest.mark.slow
def test_hostile_file_name_reaches_the_command_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONFUZIO_TOKEN", "the-api-token")
    # The daemon's own KONFUZIO_WATCH_ variables (CI sets one) pass on like the rest of its
    # environment: the test pins them to one known value instead of inheriting the runner's.
    for name in [k for k in os.environ if k.startswith("KONFUZIO_WATCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KONFUZIO_WATCH_CONFIG", "/etc/konfuzio-watch/config.yaml")
    d = delivery(tmp_path, HOSTILE)
    d.file_path.write_bytes(b"%PDF-1.4\n")
    d.json_path.write_bytes(d.body)
    report = tmp_path / "report.txt"
    script = tmp_path / "import_result.py"
    script.write_text(
        "import os, sys\n"
        "names = [k for k in os.environb if k.startswith(b'KONFUZIO_WATCH_') or k == b'KONFUZIO_TOKEN']\n"
        "facts = {'argv': [os.fsencode(a) for a in sys.argv[2:]],\n"
        "         'env': {k: os.environb[k] for k in names},\n"
        "         'exist': [os.path.exists(a) for a in sys.argv[2:4]],\n"
        "         'own_session': os.getsid(0) == os.getpid()}\n"
        "open(sys.argv[1], 'w').write(repr(facts))\n"
    )
    argv = [PY, str(script), str(report), "{json}", "{file}", "{event}", "{key}"]
    sent = run_command(argv, d, timeout_s=30)
    assert sent.ok, sent
    facts = ast.literal_eval(report.read_text())
    json_b, file_b = os.fsencode(d.json_path), os.fsencode(d.file_path)
    assert facts["argv"] == [json_b, file_b, b"done", b"7:2"]
    assert facts["exist"] == [True, True]
    assert facts["own_session"]
    assert facts["env"] == {
        b"KONFUZIO_WATCH_EVENT": b"done",
        b"KONFUZIO_WATCH_KEY": b"7:2",
        b"KONFUZIO_WATCH_JSON": json_b,
        b"KONFUZIO_WATCH_FILE": file_b,
        b"KONFUZIO_WATCH_DOCUMENT_ID": b"7",
        b"KONFUZIO_WATCH_REVISION": b"2",
        b"KONFUZIO_WATCH_CONFIG": b"/etc/konfuzio-watch/config.yaml",
    }
