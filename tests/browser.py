"""A real headless browser for the status page's tests: Debian's ``chromium``, driven from the
command line (``--dump-dom``: the DOM after the page loaded and its scripts ran; ``--screenshot``)
and, to click, over the DevTools protocol (``Tab``). Tests skip without it; ``.ci/run`` installs it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
TIMEOUT_S = 90  # a cold start on a busy two-core machine
_FLAGS = (
    "--headless",
    "--disable-gpu",
    "--no-sandbox",  # as root in a container; the page is our own
    "--no-first-run",
    "--disable-extensions",
    "--disable-background-networking",
)


def _run(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done


def dump_dom(url: str, profile: Path) -> str:
    """The DOM as the browser built it, serialized (what it shows, after its scripts ran)."""
    return _run(profile, "--dump-dom", url).stdout


def screenshot(url: str, path: Path, profile: Path, size: str = "1280,1600") -> Path:
    _run(profile, f"--screenshot={path}", f"--window-size={size}", "--hide-scrollbars", url)
    assert path.exists() and path.stat().st_size > 0, f"no screenshot at {path}"
    return path


class Tab:
    """One tab of a headless chromium, driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: commands on the browser's descriptor 3, answers and events on 4,
    each a JSON text ended by a NUL byte). No library is needed, and a click is the browser's own:
    a mouse press and release at the element, so the form is submitted as a person's would be
    (the browser's Origin, its cookies, its navigation)."""

    def __init__(self, profile: Path):
        assert CHROMIUM is not None
        commands_r, self._commands = _high_pipe()
        self._answers, answers_w = _high_pipe()
        # A small Python puts the pipe's ends at 3 and 4 for chromium (a preexec_fn would do it in a
        # forked copy of this threaded process, which Python warns against; dash knows no fd >= 10).
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _AT_3_AND_4,
                str(commands_r),
                str(answers_w),
                CHROMIUM,
                *_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=(commands_r, answers_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_r)
        os.close(answers_w)
        self._buffer = b""
        self._last_id = 0
        try:
            target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Tab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def goto(self, url: str) -> None:
        self._call("Page.navigate", {"url": url}, session=True)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", "the page")

    def evaluate(self, expression: str) -> Any:
        answer = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    def click(self, selector: str) -> None:
        """A left click in the middle of the element (scrolled into view first)."""
        x, y = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            event = {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
            self._call("Input.dispatchMouseEvent", event, session=True)

    def wait_for(self, expression: str, what: str, timeout_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._truthy(expression):
            assert time.monotonic() < deadline, f"chromium: no {what} within {timeout_s:.0f} s"
            time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            self._send("Browser.close", {})
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._commands, self._answers):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _truthy(self, expression: str) -> bool:
        try:
            return bool(self.evaluate(expression))
        except RuntimeError:  # between two pages: no context to evaluate in for a moment
            return False

    def _send(self, method: str, params: dict[str, Any], session: bool = False) -> int:
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        return self._last_id

    def _call(self, method: str, params: dict[str, Any], session: bool = False) -> dict[str, Any]:
        """Send a command; its answer (the events in between are not needed here)."""
        sent = self._send(method, params, session)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if message.get("id") == sent:
                    if "error" in message:
                        raise RuntimeError(f"chromium: {method}: {message['error']}")
                    return message["result"]
            ready, _, _ = select.select([self._answers], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"chromium did not answer {method} within {TIMEOUT_S} s")
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise EOFError(f"chromium exited ({self._proc.poll()}) before answering {method}")
            self._buffer += chunk


_AT_3_AND_4 = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.dup2(int(sys.argv[2]), 4)\n"
    "os.close(int(sys.argv[1]))\n"
    "os.close(int(sys.argv[2]))\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def _high_pipe() -> tuple[int, int]:
    """A pipe whose ends are numbered 10 or above (never 3 or 4, which are filled in for chromium)."""
    ends = os.pipe()
    try:
        return fcntl.fcntl(ends[0], fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(ends[1], fcntl.F_DUPFD_CLOEXEC, 10)
    finally:
        os.close(ends[0])
        os.close(ends[1])
