"""Helpers shared by the test modules: a daemon as a real process, result checks, fakes.

Test modules import from here and from conftest, never from each other.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask import Flask, request
from konfuzio_sdk.urls import get_upload_document_url

from konfuzio_watch.emulator.content import facts_of, layout_for
from konfuzio_watch.journal import State
from konfuzio_watch.locks import DAEMON_LOCK_NAME, INBOX_LOCK_NAME, PROCESSING_LOCK_NAME
from konfuzio_watch.node_markers import NODE_MARKER_PREFIX
from konfuzio_watch.samples import make_pdf, make_png
from konfuzio_watch.server import ServerThread

from .conftest import TOKEN, drop, wait_until
from .pg import free_port

KONFUZIO_WATCH = [sys.executable, "-m", "konfuzio_watch"]
README = Path(__file__).resolve().parent.parent / "README.md"
DOCS = README.parent / "docs"  # the README's pages


def readme_block(marker: str, lang: str = "sh") -> str:
    """The one fenced ``lang`` block right after ``<!-- marker ... -->`` in the README or a page of
    docs/ (e.g. marker ``cluster: database``, in docs/cluster.md): a block the tests run or read as written."""
    pattern = rf"<!-- {re.escape(marker)}\b[^>]*-->\n```{lang}\n(.*?)```"
    pages = (README, *sorted(DOCS.glob("*.md")))
    found = [block for page in pages for block in re.findall(pattern, page.read_text(encoding="utf-8"), re.S)]
    assert len(found) == 1, f"README.md and docs/ need one ```{lang} block right after <!-- {marker} ... -->"
    return found[0]


# systemd-analyze security's score of the unit when it was first hardened; it must not grow
MAX_EXPOSURE = 1.4


def unit_settings(text: str) -> dict[str, list[str]]:
    """A systemd unit's ``key=value`` lines: each key with its values in order (comments left out)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";")):
            found.setdefault(key.strip(), []).append(value.strip())
    return found


class FakeClock:
    """The tests' one fake clock: a ``konfuzio_watch.clock.Clock`` (``now()``) that moves only when the
    test moves it (``advance``, ``advance_to``, or ``t`` set to step it, as a wall clock set back).
    Code that takes a function for the time gets ``clock.now``."""

    def __init__(self, start: float = 1_000_000.0):
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t

    def advance_to(self, t: float) -> float:
        """On to ``t``, or nowhere if that is past."""
        self.t = max(self.t, t)
        return self.t


class InlineExecutor:
    """An executor that runs each task at once on the caller's thread (the test's)."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


class HeldExecutor:
    """An executor that keeps tasks until the test runs them (``run_all``), on the test's thread."""

    def __init__(self) -> None:
        self.pending: list[tuple[Future, Callable[..., Any], tuple, dict]] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            self.pending.append((future, fn, args, kwargs))
        return future

    def run_all(self) -> int:
        with self._lock:
            tasks, self.pending = self.pending, []
        for future, fn, args, kwargs in tasks:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)
        return len(tasks)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def _parent_pid(pid: object) -> int | None:
    """The parent of ``pid`` (a daemon started under a ``prefix`` such as strace is its child)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


class DaemonProcess:
    """``konfuzio-watch run`` in a subprocess, its log appended to one file across restarts."""

    def __init__(self, root: Path, emulator, **overrides: dict) -> None:  # type: ignore[no-untyped-def]
        self.root = root
        self.port = free_port()
        raw = {
            "konfuzio": {"host": emulator.url, "token": TOKEN, "project_id": 1, "timeout_seconds": 10},
            "folders": {name: str(root / name) for name in ("inbox", "done", "failed", "state")},
            "watch": {"settle_seconds": 0.2},
            "callback": {"host": "127.0.0.1", "port": self.port},
            "monitor": {"port": 0},  # any free port: the daemon's lock file names it (monitor_url)
            "upload": {"backoff_base_seconds": 0.1, "backoff_cap_seconds": 0.5, "reconcile_window_seconds": 0.5},
            "results": {"callback_timeout": 2, "poll_interval": 0.3},
        }
        for section, values in overrides.items():
            raw.setdefault(section, {}).update(values)
        self.state = Path(raw["folders"]["state"])
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump(raw))
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self, prefix: list[str] | None = None, wait_ready: bool = True) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*(prefix or []), *KONFUZIO_WATCH, "run", "--config", str(self.config)],
                cwd=self.root,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, "LOG_TO_FILE": "False"},
            )
        if wait_ready:
            wait_until(self.is_ready, 30, lambda: f"daemon ready (log: {self.log.read_text()[-2000:]})")

    def is_ready(self) -> bool:
        assert self.proc
        if self.proc.poll() is not None:
            pytest.fail(f"daemon exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        url = self.monitor_url
        if url is None:
            return False
        try:
            return requests.get(f"{url}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    @property
    def monitor_url(self) -> str | None:
        """The running process's monitor, as its lock file names it (None before it is bound)."""
        assert self.proc
        try:
            holder = json.loads((self.state / DAEMON_LOCK_NAME).read_text())
        except (OSError, ValueError):
            return None
        pid = holder.get("pid")
        if holder.get("stopped_at") or not (pid == self.proc.pid or _parent_pid(pid) == self.proc.pid):
            return None  # a previous run's, or another daemon's
        return holder.get("monitor_url")

    def kill9(self) -> None:
        assert self.proc
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def journal(self, sql: str) -> list[tuple]:
        with sqlite3.connect(f"file:{self.root / 'state' / 'journal.sqlite3'}?mode=ro", uri=True) as db:
            return db.execute(sql).fetchall()

    def done_count(self) -> int:
        return len(list((self.root / "done").rglob("*.json")))


def write_in_place(path: Path, text: str) -> None:
    """Rewrite a file in place (same inode), as an editor that keeps the file does."""
    with open(path, "r+", encoding="utf-8") as f:
        f.truncate(0)
        f.write(text)


def write_and_rename(path: Path, text: str) -> None:
    """Replace a file by a rename (a new inode), as most tools and configuration management do."""
    new = path.with_name(path.name + ".new")
    new.write_text(text, encoding="utf-8")
    os.replace(new, path)


def injecting(calls: str, error: str, *, paths: tuple[str, ...] = (), when: str | None = None) -> list[str]:
    """An strace prefix that makes ``calls`` (e.g. ``"link,linkat"``) fail with ``error`` (an errno name),
    on the calls naming one of ``paths`` if any are given, from the ``when``-th call on (strace's syntax:
    ``"1"``, ``"1..3"``) if given; strace's own output goes nowhere."""
    inject = f"inject={calls}:error={error}" + (f":when={when}" if when else "")
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={calls}", "-e", inject] + [
        arg for path in paths for arg in ("-P", path)
    ]


def predictable_temp(path: Path) -> Path:
    """The hidden name under which konfuzio-watch up to 2026-12 wrote ``path`` before linking it: a hash
    of the name alone, so anyone could compute it and plant something there beforehand."""
    return path.with_name(f".konfuzio-watch-{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]}.tmp")


def sample_files(n: int, prefix: str) -> dict[str, bytes]:
    return {
        (f"{prefix}/{i:03d}.pdf" if i % 2 else f"{prefix}/{i:03d}.png"): (
            make_pdf(label=f"{prefix}{i}") if i % 2 else make_png(label=f"{prefix}{i}")
        )
        for i in range(n)
    }


def assert_each_file_finished_exactly_once(root: Path, emulator, files: dict[str, bytes]) -> None:  # type: ignore[no-untyped-def]
    done = root / "done"
    for rel, data in files.items():
        assert (done / rel).read_bytes() == data, f"{rel} missing or changed in done/"
        result = json.loads((done / (rel + ".json")).read_text())
        assert hashlib.sha256(data).hexdigest() in result["text"], f"{rel} got another file's result"
    assert len(list(done.rglob("*.json"))) == len(files), "an extra result in done/"
    assert not list((root / "failed").rglob("*")), "a file failed"
    leftovers = [p for p in (root / "inbox").rglob("*") if p.is_file() and not is_daemons_own(p)]
    assert leftovers == [], f"left behind: {leftovers}"
    per_sha = collections.Counter(u.sha256 for u in emulator.uploads)
    twice = {sha: n for sha, n in per_sha.items() if n > 1}
    assert not twice, f"{len(twice)} file(s) uploaded more than once"
    assert len(per_sha) == len(files)


def inbox_files(running) -> list[Path]:  # type: ignore[no-untyped-def]
    return [p for p in running.inbox.rglob("*") if p.is_file() and not is_daemons_own(p)]


def is_daemons_own(path: Path) -> bool:
    """The daemon's own files in the inbox: its processing folder, the inbox marker and the marker of
    each node of a cluster (a killed node's stays) (locks.py)."""
    return ".konfuzio-watch" in path.parts or path.name == INBOX_LOCK_NAME or path.name.startswith(NODE_MARKER_PREFIX)


def waiting_in(processing: Path) -> list[Path]:
    """The claimed files in a processing folder: everything in it but its lock."""
    return sorted(p for p in processing.iterdir() if p.name != PROCESSING_LOCK_NAME)


def assert_own_result(done: Path, rel: str, data: bytes) -> dict:
    """The file is in done/ unchanged, next to a JSON whose OCR text is this file's own."""
    target = done / rel
    assert target.read_bytes() == data
    result = json.loads((done / (rel + ".json")).read_text(encoding="utf-8"))
    sha = hashlib.sha256(data).hexdigest()
    assert result["source"]["sha256"] == sha
    assert result["source"]["size"] == len(data)
    assert sha in result["text"], "the OCR text belongs to another file"
    assert isinstance(result["document_id"], int)
    assert result["status"] == "done"
    assert len(result["pages"]) == result["konfuzio"]["number_of_pages"]
    assert "\f".join(p["text"] for p in result["pages"]) == result["text"]
    assert result["bbox"], "character boxes are exported when the server has them"
    return result


def documents_per_sha(emulator) -> collections.Counter:  # type: ignore[no-untyped-def]
    return collections.Counter(u.sha256 for u in emulator.uploads)


def drop_batch(running, n: int, prefix: str = "doc") -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    files = {}
    for i in range(n):
        name = f"{prefix}_{i:03d}.pdf" if i % 3 else f"{prefix}_{i:03d}.png"
        files[name] = make_pdf(label=name) if i % 3 else make_png(label=name)
        drop(running.inbox / name, files[name])
    return files


def assert_all_done_once(running, emulator, files: dict[str, bytes]) -> None:  # type: ignore[no-untyped-def]
    for name, data in files.items():
        assert_own_result(running.done, name, data)
    per_sha = documents_per_sha(emulator)
    assert all(per_sha[hashlib.sha256(d).hexdigest()] == 1 for d in files.values()), "a file was uploaded twice"
    assert running.counts()[State.DONE] == len(files)
    assert inbox_files(running) == []
    assert list(running.failed.rglob("*")) == []


def callback_url_of(emulator, name: str) -> str:  # type: ignore[no-untyped-def]
    return next(u.callback_url for u in emulator.uploads if u.data_file_name == name)


@dataclass
class Receiver:
    """A webhook endpoint: records every POST with the status it answered."""

    status: int = 200
    hold: threading.Event | None = None  # set: requests wait for it
    posts: list[tuple[int, dict]] = field(default_factory=list)

    def app(self, environ: dict, start_response: Callable) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if self.hold is not None:
            self.hold.wait(10)
        status = self.status
        self.posts.append((status, json.loads(body)))
        start_response(
            f"{status} {'OK' if status == 200 else 'Internal Server Error'}", [("Content-Type", "text/plain")]
        )
        return [b"ok" if status == 200 else b"down"]

    def accepted(self) -> list[dict]:
        return [payload for status, payload in self.posts if status == 200]


# -- the emulator, driven through the SDK's own requests (test_emulator*.py) -----------------------


class CallbackReceiver:
    """A real Flask app under Waitress that records callbacks posted to /cb/<token>."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.answer_status = 200
        self._cond = threading.Condition()
        app = Flask("receiver")
        app.add_url_rule("/cb/<token>", view_func=self._receive, methods=["POST"])
        self.server = ServerThread(app, "127.0.0.1", 0, name="test-receiver", threads=4)

    def _receive(self, token: str):  # type: ignore[no-untyped-def]
        with self._cond:
            self.calls.append({"token": token, "body": request.get_json(), "at": time.monotonic()})
            self._cond.notify_all()
        return "", self.answer_status

    def url(self, token: str) -> str:
        return f"{self.server.url}/cb/{token}"

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[dict]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.calls) >= count, timeout_s):
                raise AssertionError(f"within {timeout_s} s, {count} callbacks never arrived: {self.calls}")
            return list(self.calls)


def upload(session, host: str, data: bytes, name: str = "scan.pdf", **fields):  # type: ignore[no-untyped-def]
    """POST exactly the form upload_file_konfuzio_api builds, to the URL it would use."""
    form = {
        "project": 1,
        "dataset_status": 0,
        "category": None,
        "sync": False,
        "callback_url": "",
        "callback_status_code": None,
    }
    form.update(fields)
    files = {"data_file": (name, data, "multipart/form-data")}
    return session.post(get_upload_document_url(host), files=files, data=form)


def api(emu, method: str, path: str, token: str | None = TOKEN, headers=None, **kwargs) -> requests.Response:  # type: ignore[no-untyped-def]
    """A request to the emulator with the token (``None``: without an Authorization header)."""
    headers = {**({"Authorization": f"Token {token}"} if token else {}), **(headers or {})}
    return requests.request(method, emu.url + path, headers=headers, timeout=5, **kwargs)


# -- documents of a kind, and what a searchable PDF says --------------------------------------------


def file_of(kind: str, pages: int = 1, tag: str = "", ibans: int | None = None, png: bool = False) -> bytes:
    """The first sample (by label) whose content the emulated AI reads as ``kind``."""
    for n in range(1000):
        data = make_png(90, 60, label=f"{tag} {n}") if png else make_pdf(pages, label=f"{tag} {n}")
        layout = layout_for(facts_of(data), "x")
        if layout.kind == kind and (ibans is None or sum(f.key == "iban" for f in layout.fields) == ibans):
            return data
    raise AssertionError(f"no sample of kind {kind}")


def pdf_page_texts(data: bytes) -> list[str]:
    """A small PDF reader for what the emulator writes: follows the xref, the page tree and each
    font's ToUnicode CMap; one line per text matrix (Tm)."""
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    xref_at = int(re.search(rb"startxref\s+(\d+)", data[-64:]).group(1))
    assert data[xref_at:].startswith(b"xref")
    count = int(re.match(rb"xref\s+0 (\d+)", data[xref_at:]).group(1))
    table = data[xref_at:].split(b"\n", 2)[2]
    offsets = [int(table[20 * i : 20 * i + 10]) for i in range(1, count)]
    objects = {}
    for number, offset in enumerate(offsets, start=1):
        assert data[offset:].startswith(b"%d 0 obj" % number), number
        objects[number] = data[offset : data.index(b"endobj", offset)]

    def ref(obj: bytes, key: bytes) -> int:
        return int(re.search(rb"/" + key + rb"\s+(\d+) 0 R", obj).group(1))

    def stream(number: int) -> bytes:
        obj = objects[number]
        body = obj[obj.index(b"stream\n") + 7 : obj.rindex(b"\nendstream")]
        return zlib.decompress(body) if b"/FlateDecode" in obj else body

    root = objects[ref(data[xref_at:], b"Root")]
    kids = re.search(rb"/Kids \[([^\]]*)\]", objects[ref(root, b"Pages")]).group(1)
    pages = []
    for page_id in map(int, re.findall(rb"(\d+) 0 R", kids)):
        page = objects[page_id]
        fonts = {}
        for font_name, font_id in re.findall(rb"/(F\d+) (\d+) 0 R", page):
            cmap = stream(ref(objects[int(font_id)], b"ToUnicode"))
            pairs = [
                pair
                for block in re.findall(rb"beginbfchar(.*?)endbfchar", cmap, re.S)
                for pair in re.findall(rb"<([0-9A-F]{2})> <([0-9A-F]+)>", block)
            ]
            fonts[font_name] = {int(code, 16): bytes.fromhex(uni.decode()).decode("utf-16-be") for code, uni in pairs}
        lines: list[str] = []
        font = None
        for token in re.finditer(rb"/(F\d+) [\d.]+ Tf|<([0-9A-F]*)> Tj|Tm", stream(ref(page, b"Contents"))):
            if token.group(0) == b"Tm":
                lines.append("")
            elif token.group(1):
                font = fonts[token.group(1)]
            else:
                lines[-1] += "".join(font[b] for b in bytes.fromhex(token.group(2).decode()))
        pages.append("\n".join(lines))
    return pages


def pdftotext_pages(path: Path) -> list[str] | None:
    """The text of each page as poppler's ``pdftotext`` reads it; None when it is not installed."""
    if shutil.which("pdftotext") is None:
        return None
    out = subprocess.run(
        ["pdftotext", "-enc", "UTF-8", str(path), "-"], capture_output=True, text=True, check=True
    ).stdout
    return [page.strip("\n") for page in out.split("\f")[:-1]]


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def can_drop_privileges() -> bool:
    """Root with setpriv, and this interpreter usable as nobody: a daemon can run as another user."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import konfuzio_watch"], capture_output=True, timeout=60)
    return probe.returncode == 0


# -- a cluster of nodes on one PostgreSQL journal ------------------------------------------------------


def cluster_node(shared: Path, node_id: str, emulator, pg_url: str, **overrides: dict) -> DaemonProcess:  # type: ignore[no-untyped-def]
    """A node of a cluster: its own folder (config, log, state folder with its daemon lock) and ports;
    the inbox, done/ and failed/ of ``shared``, and the journal ``pg_url``, are the cluster's."""
    root = shared / f"node-{node_id}"
    root.mkdir(exist_ok=True)
    sections: dict[str, dict] = {
        "folders": {
            "inbox": str(shared / "inbox"),
            "done": str(shared / "done"),
            "failed": str(shared / "failed"),
            "state": str(root / "state"),
        },
        "journal": {"url": pg_url},
        "node": {"id": node_id, "lease_seconds": 3},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return DaemonProcess(root, emulator, **sections)


class CallbackBalancer:
    """One public callback URL in front of several nodes, as a load balancer: each request goes to the
    next node in turn, and to the one after it if that one does not answer (stopped, killed)."""

    def __init__(self) -> None:
        self.backends: list[str] = []
        self._next = 0
        self._lock = threading.Lock()
        self.forwarded: collections.Counter = collections.Counter()  # backend -> requests it answered

    def app(self, environ: dict, start_response: Callable) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        path = environ.get("PATH_INFO", "/")
        with self._lock:
            order = self.backends[self._next :] + self.backends[: self._next]
            self._next = (self._next + 1) % max(1, len(self.backends))
        for backend in order:
            try:
                answer = requests.post(
                    backend + path,
                    data=body,
                    timeout=5,
                    headers={"Content-Type": environ.get("CONTENT_TYPE", "application/json")},
                )
            except requests.RequestException:
                continue  # that node is down: the next one
            self.forwarded[backend] += 1
            start_response(f"{answer.status_code} {answer.reason}", [("Content-Type", "application/json")])
            return [answer.content]
        start_response("502 Bad Gateway", [("Content-Type", "application/json")])
        return [b'{"detail": "no node answers"}']


# A trigger the tests install on the journal: every state move, with the node that made it (its
# connection's application_name) and who held the row's lease then. No production code writes it.
MOVE_AUDIT = """
CREATE TABLE IF NOT EXISTS test_moves (
    seq BIGSERIAL PRIMARY KEY, row_id BIGINT NOT NULL, old_state TEXT NOT NULL, new_state TEXT NOT NULL,
    writer TEXT NOT NULL, lease_node TEXT, lease_until TIMESTAMPTZ, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION test_audit_move() RETURNS trigger AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        INSERT INTO test_moves (row_id, old_state, new_state, writer, lease_node, lease_until)
        VALUES (OLD.id, OLD.state, NEW.state, current_setting('application_name'), OLD.lease_node, OLD.lease_until);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS test_audit_move ON files;
CREATE TRIGGER test_audit_move AFTER UPDATE ON files FOR EACH ROW EXECUTE FUNCTION test_audit_move();
"""


def install_move_audit(pg_url: str) -> None:
    """Create the journal's schema (as a node would) and the audit of state moves on it."""
    import psycopg

    from konfuzio_watch.journal.pg import PgJournal

    PgJournal(pg_url, node_id="schema", wait_s=5.0).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(MOVE_AUDIT)  # type: ignore[arg-type]


def pg_rows(pg_url: str, sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def moves_not_under_own_lease(pg_url: str) -> list[tuple]:
    """State moves a node made on a row whose lease it did not hold (another node's, or nobody's).
    Leases pass from node to node only through the journal, so if every move was made by the row's
    lease holder, no two nodes ever worked on one file at the same time."""
    return pg_rows(
        pg_url,
        "SELECT row_id, old_state, new_state, writer, lease_node FROM test_moves"
        " WHERE lease_node IS NULL OR writer <> 'konfuzio-watch ' || lease_node ORDER BY seq",
    )


def illegal_move_chains(pg_url: str) -> list[tuple]:
    """Moves that do not continue from the state the row's previous move left it in."""
    return pg_rows(
        pg_url,
        "SELECT row_id, seq, old_state, prev FROM (SELECT row_id, seq, old_state, LAG(new_state)"
        " OVER (PARTITION BY row_id ORDER BY seq) AS prev FROM test_moves) m"
        " WHERE prev IS NOT NULL AND prev <> old_state",
    )


def net_uploads_per_sha(emulator) -> collections.Counter:  # type: ignore[no-untyped-def]
    """Documents on the server per content: uploads minus the extra copies the daemon deleted."""
    by_doc = {u.doc_id: u.sha256 for u in emulator.uploads}
    count = collections.Counter(u.sha256 for u in emulator.uploads)
    for deletion in emulator.deletions:
        count[by_doc[deletion.doc_id]] -= 1
    return count


# -- deliveries (issue 25): a receiver of the next system -----------------------------------------


@dataclass
class Delivered:
    """One POST the receiver answered: its key, event, placed path, the status it answered, whether the
    signature was valid and whether the placed file and its JSON were there when it came."""

    key: str
    event: str
    path: str
    status: int
    signed: bool
    placed: bool
    body: bytes


class DeliveryReceiver:
    """The next system's webhook, as a real Waitress server: it checks the HMAC of every body and that
    the placed file is in done/ (or failed/) when it is called, and answers ``status`` (a 2xx, or 500
    while a test says so), after ``delay_s`` (slower than the daemon's timeout: it gave up before the
    answer), or holds every request until ``hold`` is set. ``close`` and ``open`` take the port away
    and bring it back (a receiver that is down)."""

    def __init__(self, secret: bytes, done: Path, failed: Path):
        self.secret, self.done, self.failed = secret, done, failed
        self.status = 200
        self.delay_s = 0.0
        self.hold: threading.Event | None = None
        self.holding = threading.Event()  # a request is being held
        self.got: list[Delivered] = []
        self.in_flight: collections.Counter = collections.Counter()  # key -> requests being answered now
        self.in_parallel: list[str] = []  # keys that came while the same key was being answered
        self._lock = threading.Lock()
        self.port = 0
        self.server: ServerThread | None = None

    def app(self, environ: dict, start_response: Callable) -> list[bytes]:
        import hmac
        from urllib.parse import unquote_to_bytes

        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        key = environ.get("HTTP_IDEMPOTENCY_KEY", "")
        event = environ.get("HTTP_X_KONFUZIO_WATCH_EVENT", "")
        path = environ.get("HTTP_X_KONFUZIO_WATCH_PATH", "")
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        signed = hmac.compare_digest(environ.get("HTTP_X_KONFUZIO_WATCH_SIGNATURE", ""), expected)
        root = self.failed if event == "failed" else self.done
        placed_file = root / os.fsdecode(unquote_to_bytes(path))
        json_name = ".error.json" if event == "failed" else ".json"
        placed = placed_file.is_file() and placed_file.with_name(placed_file.name + json_name).is_file()
        status = self.status
        with self._lock:
            if self.in_flight[key]:
                self.in_parallel.append(key)
            self.in_flight[key] += 1
        try:
            if self.hold is not None:
                self.holding.set()
                self.hold.wait(30)
            if self.delay_s:
                time.sleep(self.delay_s)  # the receiver is slow: the point of the test
        finally:
            with self._lock:
                self.in_flight[key] -= 1
                self.got.append(Delivered(key, event, path, status, signed, placed, body))
        start_response(f"{status} {'OK' if status < 300 else 'Nope'}", [("Content-Type", "text/plain")])
        return [b"ok" if status < 300 else b"not now"]

    def open(self) -> DeliveryReceiver:
        self.server = ServerThread(self.app, "127.0.0.1", self.port, name="delivery-receiver", threads=4).start()
        self.port = self.server.port
        return self

    def close(self) -> None:
        if self.server is not None:
            if self.hold is not None:
                self.hold.set()
            self.server.close(timeout_s=5)
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/konfuzio"

    def taken(self) -> list[Delivered]:
        """The deliveries answered with a 2xx."""
        with self._lock:
            return [d for d in self.got if 200 <= d.status < 300]

    def per_key(self) -> collections.Counter:
        """Key -> how many times it was taken (a 2xx); more than once: a repeat."""
        return collections.Counter(d.key for d in self.taken())

    def figures(self) -> str:
        """What the issue asks to count, in one line (printed by the tests)."""
        with self._lock:
            got = list(self.got)
        per_key = self.per_key()
        return (
            f"requests {len(got)}, 2xx {sum(per_key.values())} for {len(per_key)} keys, repeats "
            f"{sum(n - 1 for n in per_key.values())}, refused (non-2xx) {sum(1 for d in got if d.status >= 300)}, "
            f"bad signatures {sum(1 for d in got if not d.signed)}, before placed {sum(1 for d in got if not d.placed)}"
        )

    def assert_each_once_signed_and_placed(self, keys: set[str], *, slow: bool = False) -> None:
        """Every key taken at least once, nothing else; every request signed, each after its file was placed;
        never one key twice at once (unless the receiver was ``slow``: the daemon gave up on a request it
        was still answering, and tried again)."""
        with self._lock:
            got = list(self.got)
        assert all(d.signed for d in got), "a delivery with a bad signature"
        assert all(d.placed for d in got), "a delivery came before its file was placed"
        assert slow or self.in_parallel == [], f"sent twice in parallel: {self.in_parallel}"
        assert set(self.per_key()) == keys, f"keys taken {sorted(self.per_key())} != {sorted(keys)}"
