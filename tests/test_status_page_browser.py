"""The status page in a real headless browser (Debian's chromium) against a real daemon process with
done, failed, waiting and blocked files: its numbers are ``status``'s, hostile file names stay text,
a click on the retry button moves a failed file back, and forged POSTs are refused."""

from __future__ import annotations

import html
import os
import re
import subprocess
from pathlib import Path

import pytest
import requests

from konfuzio_watch.emulator import FAIL_MARKER
from konfuzio_watch.journal import State
from konfuzio_watch.samples import make_pdf

from .browser import Tab, dump_dom, needs_chromium, screenshot
from .conftest import drop, wait_until
from .helpers import KONFUZIO_WATCH

# A folder and a file name that would be markup if they were not escaped, with quotes, a newline
# and a byte that is not UTF-8.
HOSTILE_DIR = b'<script>document.title="pwned"<'
HOSTILE_FILE = b"script><img src=x onerror=alert(1)> \"q' \n\xff.pdf"


def status_counts(config: Path) -> dict[str, int]:
    """The files by state (and pending) as ``konfuzio-watch status`` prints them."""
    out = subprocess.run(
        [*KONFUZIO_WATCH, "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "LOG_TO_FILE": "False"},
    ).stdout
    table = out.split("state       files\n", 1)[1]
    counts = {}
    for line in table.splitlines():
        found = re.match(r"^(\w+)\s+(\d+)", line)
        if not found:
            break
        counts[found[1]] = int(found[2])
    return counts


def page_counts(dom: str) -> dict[str, int]:
    return {state: int(n) for state, n in re.findall(r'data-state="(\w+)">(\d+)<', dom)}


def failed_forms(dom: str) -> dict[str, tuple[str, str]]:
    """The page's retry forms: the file's name as shown -> (row, token)."""
    found = {}
    for row in re.findall(r'<tr data-row="\d+">.*?</tr>', dom, re.S):
        name = html.unescape(re.search(r'<td class="name">(.*?)</td>', row, re.S)[1])
        token = html.unescape(re.search(r'name="token" value="([^"]*)"', row)[1])
        row_id = re.search(r'name="row" value="(\d+)"', row)[1]
        found[name] = (row_id, token)
    return found


@needs_chromium
@pytest.mark.slow
def test_the_page_in_a_browser_shows_what_status_shows_and_its_retry_button_works(daemon_process, emulator, tmp_path):
    daemon = daemon_process()
    daemon.start()
    inbox = tmp_path / "inbox"
    for i in range(3):
        drop(inbox / f"good_{i}.pdf", make_pdf(label=f"good {i}"))
    drop(inbox / "server-fails.pdf", make_pdf(label="fails") + FAIL_MARKER)
    hostile = Path(os.fsdecode(inbox / os.fsdecode(HOSTILE_DIR) / os.fsdecode(HOSTILE_FILE)))
    drop(hostile, make_pdf(label="hostile") + FAIL_MARKER)

    def by_state() -> dict[str, int]:
        return dict(daemon.journal("SELECT state, COUNT(*) FROM files GROUP BY state"))

    wait_until(lambda: by_state() == {"done": 3, "failed": 2}, 60, lambda: f"3 done, 2 failed (have {by_state()})")
    emulator.knobs.outage = True  # Konfuzio answers 503: the API gate blocks, two files wait
    for i in range(2):
        drop(inbox / f"waiting_{i}.pdf", make_pdf(label=f"waiting {i}"))
    url = daemon.monitor_url
    wait_until(lambda: requests.get(f"{url}/status", timeout=5).json()["blocked"], 60, "the API gate blocked")
    wait_until(lambda: by_state().get("claimed", 0) + by_state().get("uploading", 0) == 2, 30, "two files waiting")

    profile = tmp_path / "chromium"
    for _ in range(10):  # the numbers of one moment: status before and after the page agree
        before = status_counts(daemon.config)
        dom = dump_dom(f"{url}/", profile)
        live = requests.get(f"{url}/status", timeout=5).json()
        if status_counts(daemon.config) == before:
            break
    else:
        pytest.fail("the journal kept changing under status")
    assert page_counts(dom) == before, (page_counts(dom), before)
    assert before["done"] == 3 and before["failed"] == 2 and before["pending"] == 2
    pending, done, failed = (
        int(n) for n in re.match(r"(\d+) pending, (\d+) done, (\d+) failed", live["line"]).groups()
    )
    assert (pending, done, failed) == (before["pending"], before["done"], before["failed"])
    assert re.search(r'data-finished="done_1h">3<', dom) and re.search(r'data-finished="failed_24h">2<', dom)
    assert 'data-scope="api"' in dom and "503" in dom  # what is blocked, and why
    assert dom.count("waiting_0.pdf") == 1 and "<svg" in dom
    assert f"{emulator.url}/d/" in dom  # a failed file's document in Konfuzio

    # The hostile name is text on the page: no element came of it, the title is the page's own.
    assert dom.count("<script") == 1 and "<img" not in dom and "pwned</title>" not in dom
    shown = 'document.title="pwned"&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt; "q\' \\n\\xff.pdf'
    assert shown in dom

    shot = screenshot(f"{url}/", tmp_path / "status-page.png", profile)
    print(f"\nstatus page screenshot: {shot}")

    forms = failed_forms(dom)
    assert len(forms) == 2, forms
    row_id, token = forms["server-fails.pdf"]
    post = f"{url}/retry"
    forged = [
        ({"row": row_id}, {"Origin": url}),  # no token
        ({"row": row_id, "token": "x" * len(token)}, {"Origin": url}),  # a wrong one
        ({"row": row_id, "token": token}, {"Origin": "http://evil.example"}),  # another site's page
        ({"row": row_id, "token": token}, {"Referer": "http://evil.example/page"}),
        ({"row": row_id, "token": token}, {"Host": "evil.example", "Origin": "http://evil.example"}),  # rebinding
    ]
    for data, headers in forged:
        answer = requests.post(post, data=data, headers=headers, allow_redirects=False, timeout=10)
        assert answer.status_code == 403, (data, headers, answer.status_code, answer.text)
    assert status_counts(daemon.config)["failed"] == 2 and (tmp_path / "failed" / "server-fails.pdf").exists()

    # The button, clicked in the browser: it posts the form from the page's own origin and follows
    # the answer back to the page, which says what happened.
    with Tab(profile) as tab:
        tab.goto(f"{url}/")
        tab.click(f'tr[data-row="{int(row_id)}"] button[type="submit"]')
        tab.wait_for("location.search.startsWith('?m=') && document.readyState === 'complete'", "page after retry", 30)
        shown = tab.evaluate("document.body.innerText")
    assert "server-fails.pdf: back in the inbox as server-fails.pdf" in shown, shown
    assert not (tmp_path / "failed" / "server-fails.pdf").exists()
    assert dict(daemon.journal(f"SELECT state, 1 FROM files WHERE id = {int(row_id)}")) == {"retried": 1}
    assert status_counts(daemon.config)["failed"] == 1


@pytest.mark.slow
def test_off_loopback_the_page_is_read_only_unless_allowed(start_daemon):
    running = start_daemon(monitor={"host": "0.0.0.0", "port": 0})
    drop(running.inbox / "notes.txt", b"just some text, not a document\n")  # refused before any upload
    running.wait_finished(1)
    url = f"http://127.0.0.1:{running.daemon.monitor.port}"
    page = requests.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and "notes.txt" in page.text
    assert "<form" not in page.text and "Read-only here" in page.text
    assert "script-src 'nonce-" in page.headers["Content-Security-Policy"] and page.headers["X-Frame-Options"] == "DENY"
    row_id = running.daemon.journal.rows([State.FAILED])[0].id
    refused = requests.post(f"{url}/retry", data={"row": row_id, "token": "guess"}, headers={"Origin": url}, timeout=10)
    assert refused.status_code == 403 and "read-only" in refused.text
    running.stop()

    running = start_daemon(monitor={"host": "0.0.0.0", "port": 0, "allow_retry": True})
    url = f"http://127.0.0.1:{running.daemon.monitor.port}"
    assert '<form method="post" action="/retry">' in requests.get(f"{url}/", timeout=10).text
    foreign = requests.get(f"{url}/", headers={"Host": "evil.example"}, timeout=10).text  # DNS rebinding
    assert "notes.txt" in foreign and "<form" not in foreign  # the page, without the token
