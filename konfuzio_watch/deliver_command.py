"""The command transport: ``deliver.command`` run once per delivery, as the service's user.

``argv`` comes from the config; in each argument the placeholders ``{json}`` (the placed result
JSON), ``{file}`` (the placed file), ``{event}`` and ``{key}`` are replaced, in one pass (a file
name that itself contains ``{key}`` stays as it is). Paths are passed as their bytes: a name that
is not UTF-8, or holds a newline or a quote, reaches the command unchanged. No shell is involved.

The command runs in a session (and process group) of its own, stdin closed, with the daemon's
environment (less what is meant for the daemon alone: systemd's notify and watchdog variables, and
the API token the SDK reads from ``KONFUZIO_TOKEN``) and the delivery's facts in
``KONFUZIO_WATCH_EVENT``, ``_KEY``, ``_JSON``, ``_FILE``, ``_DOCUMENT_ID`` and ``_REVISION`` (empty
when there is none, e.g. a failed file's document id). Its stdout and stderr are read as they come,
the first ``max_output`` bytes of each kept and the rest only counted, and logged as one line each.

Exit 0: delivered. Exit 75 (EX_TEMPFAIL) or the timeout: worth trying again later; at the timeout
the whole process group is killed (SIGKILL), so a child left behind does not outlive it. Any other
exit, a signal, or a program that cannot be run: the delivery fails, with one line saying why.
The call returns when the command has exited (or at the timeout): a child that keeps its output
open after the command exited is not waited for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence

from .delivery import Delivery, Sent
from .journal import display_name

log = logging.getLogger("konfuzio_watch")

EX_TEMPFAIL = 75
PLACEHOLDERS = ("json", "file", "event", "key")
_PLACEHOLDER = re.compile(rb"\{(" + b"|".join(p.encode() for p in PLACEHOLDERS) + rb")\}")
ENV_PREFIX = "KONFUZIO_WATCH_"
# Meant for the daemon alone: systemd's sockets and watchdog, and the token konfuzio_sdk reads.
NOT_PASSED_ON = frozenset(
    {
        b"NOTIFY_SOCKET",
        b"WATCHDOG_USEC",
        b"WATCHDOG_PID",
        b"LISTEN_FDS",
        b"LISTEN_PID",
        b"LISTEN_FDNAMES",
        b"KONFUZIO_TOKEN",
    }
)
READ_CHUNK = 65536
DRAIN_S = 0.2  # after the exit: reading what is left in the pipes
DETAIL_MAX = 300  # characters of the command's stderr in a failure's one-line reason


def _facts(delivery: Delivery) -> dict[str, bytes]:
    def text(value: object) -> bytes:
        return b"" if value is None else str(value).encode("utf-8")

    return {
        "json": os.fsencode(delivery.json_path),
        "file": os.fsencode(delivery.file_path),
        "event": text(delivery.event),
        "key": text(delivery.key),
        "document_id": text(delivery.document_id),
        "revision": text(delivery.revision),
    }


def command_args(argv: Sequence[str | bytes], delivery: Delivery) -> list[bytes]:
    """``argv`` with each argument's placeholders replaced by the delivery's bytes, in one pass."""
    facts = _facts(delivery)
    return [_PLACEHOLDER.sub(lambda m: facts[m.group(1).decode()], os.fsencode(arg)) for arg in argv]


def command_env(delivery: Delivery, base: dict[bytes, bytes] | None = None) -> dict[bytes, bytes]:
    """The command's environment: ``base`` (the daemon's) less ``NOT_PASSED_ON``, plus the facts."""
    env = {k: v for k, v in (os.environb if base is None else base).items() if k not in NOT_PASSED_ON}
    for name, value in _facts(delivery).items():
        env[(ENV_PREFIX + name.upper()).encode()] = value
    return env


class _Capture:
    """The first ``limit`` bytes of a stream; the rest counted."""

    def __init__(self, limit: int) -> None:
        self.limit, self.kept, self.dropped = limit, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        room = max(0, self.limit - len(self.kept))
        self.kept += chunk[:room]
        self.dropped += len(chunk) - min(room, len(chunk))

    def line(self) -> str:
        text = display_name(bytes(self.kept).rstrip(b"\n"))
        return text + (f" [... {self.dropped} more bytes not kept]" if self.dropped else "")

    def last_line(self) -> str:
        lines = [line for line in bytes(self.kept).splitlines() if line.strip()]
        text = display_name(lines[-1].strip()) if lines else ""
        return text[:DETAIL_MAX] + ("..." if len(text) > DETAIL_MAX else "")


def run_command(argv: Sequence[str | bytes], delivery: Delivery, *, timeout_s: float, max_output: int = 4096) -> Sent:
    """Run the command for ``delivery``; see the module's docstring for what its outcome means."""
    if not argv:
        return Sent(ok=False, retry=False, detail="deliver.command is empty")
    args = command_args(argv, delivery)
    program = display_name(args[0])
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=command_env(delivery),
            start_new_session=True,
        )
    except OSError as exc:  # missing, not executable, not a program (ENOEXEC), a folder
        return Sent(ok=False, retry=False, detail=f"command {program} cannot be run: {exc.strerror or exc}")
    with proc:
        out, err = _Capture(max_output), _Capture(max_output)
        exited = _read_until_exit(proc, {proc.stdout: out, proc.stderr: err}, started + timeout_s)
        if not exited:
            _kill_group(proc)
        code = proc.wait()
    seconds = time.monotonic() - started
    _log_output(delivery, program, {"stdout": out, "stderr": err})
    if not exited:
        return Sent(ok=False, retry=True, detail=f"command {program} timed out after {timeout_s:g} s and was killed")
    if code == 0:
        return Sent(ok=True, retry=False, detail=f"command {program} exited with 0 after {seconds:.1f} s")
    said = err.last_line() or out.last_line()
    said = f": {said}" if said else ""
    if code == EX_TEMPFAIL:
        return Sent(ok=False, retry=True, detail=f"command {program} exited with 75 (try again later){said}")
    if code < 0:
        return Sent(ok=False, retry=False, detail=f"command {program} was killed by {_signal_name(-code)}{said}")
    return Sent(ok=False, retry=False, detail=f"command {program} exited with {code}{said}")


def _log_output(delivery: Delivery, program: str, captures: dict[str, _Capture]) -> None:
    """One line per stream the command wrote to."""
    name = display_name(os.fsencode(delivery.file_path.name))
    for stream, capture in captures.items():
        if capture.kept or capture.dropped:
            said = capture.line()
            log.info("%s: delivery %s: %s %s: %s", name, delivery.key, program, stream, said, extra={"file": name})


def _read_until_exit(proc: subprocess.Popen, captures: dict, deadline: float) -> bool:
    """Read the command's output until it has exited (then what is in the pipes, for at most
    ``DRAIN_S``) or the deadline has passed; True if it exited in time. The pipes are read as they
    fill, so a command writing much never blocks on a full pipe; a child that inherited them and
    lives on is not waited for."""
    exit_fd = os.pidfd_open(proc.pid)
    try:
        with selectors.DefaultSelector() as selector:
            for stream in captures:
                os.set_blocking(stream.fileno(), False)
                selector.register(stream, selectors.EVENT_READ)
            selector.register(exit_fd, selectors.EVENT_READ)
            exited = False
            while not exited or selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return exited
                ready = selector.select(0 if exited else remaining)
                if exited and not ready:
                    break
                for key, _ in ready:
                    if key.fileobj == exit_fd:
                        selector.unregister(exit_fd)
                        exited, deadline = True, min(deadline, time.monotonic() + DRAIN_S)
                        continue
                    chunk = _read(key.fileobj)
                    if chunk:
                        captures[key.fileobj].add(chunk)
                    elif chunk == b"":
                        selector.unregister(key.fileobj)
            return True
    finally:
        os.close(exit_fd)


def _read(stream) -> bytes | None:  # type: ignore[no-untyped-def]
    """A chunk, b"" at the end, None if nothing is there after all."""
    try:
        return os.read(stream.fileno(), READ_CHUNK)
    except BlockingIOError:
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(proc.pid, signal.SIGKILL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
