"""A real headless browser for the status page's tests: Debian's ``chromium``, driven from the
command line (``--dump-dom``: the DOM after the page loaded and its scripts ran; ``--screenshot``).
Tests skip without it; ``.ci/run`` installs it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
TIMEOUT_S = 90  # a cold start on a busy two-core machine


def _run(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",  # as root in a container; the page is our own
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        *args,
    ]
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
