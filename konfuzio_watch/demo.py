"""``konfuzio-watch demo``: the real daemon against the built-in Konfuzio emulator.

Starts the emulator on loopback, runs the daemon on temporary folders, drops sample documents
(one of them written slowly in chunks, some in nested folders with awkward names), prints each
file's progress, and ends with every file in done/ next to its result JSON (OCR text, category,
extracted fields) and its searchable PDF.

The daemon runs with a ``config.yaml`` the demo writes into its folder, the folders named relative to
it: with ``--workdir DIR`` it stays there, so ``konfuzio-watch status --config DIR/config.yaml`` shows
the demo's journal afterwards (and the folder may be moved).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from .config import Config, load_config
from .daemon import Daemon, run_in_thread
from .journal import FINISHED, Row, State
from .logs import configure_logging

DEMO_TOKEN = "demo-token-not-secret"
SUBFOLDERS = ("", "", "2026/Rechnungen März", 'scanner [3]/it\'s "quoted"')


def run_demo(files: int = 8, workdir: str | None = None) -> int:
    from .emulator import Emulator, Knobs
    from .samples import write_samples

    configure_logging("human", logging.WARNING, stream=sys.stdout)
    root = Path(workdir).absolute() if workdir else Path(tempfile.mkdtemp(prefix="konfuzio-watch-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    knobs = Knobs(upload_latency_s=0.1, processing_s=1.5, processing_jitter_s=1.0)
    with Emulator(token=DEMO_TOKEN, project_ids=(1,), knobs=knobs).start() as emu:
        print(f"Konfuzio API emulator on {emu.url} (processing ~1.5-2.5 s per document)")
        config = _write_demo_config(root / "config.yaml", emu.url)
        finished = threading.Event()
        progress = _Progress(files, finished)
        daemon = Daemon(config, on_transition=progress.on_transition)
        thread = run_in_thread(daemon)
        print(f"daemon ready; callbacks at {daemon.public_url}; watching {config.folders.inbox}\n")
        try:
            _drop_samples(config.folders.inbox, root / "samples", files, write_samples)
            ok = finished.wait(timeout=120)
        finally:
            daemon.request_stop()
            thread.join(60)
    _summary(config.folders.done, config.folders.failed, config.folders.inbox)
    prog = sys.argv[0] if Path(sys.argv[0]).name == "konfuzio-watch" else "konfuzio-watch"
    if workdir:
        print(
            f"\nThe demo's folders are kept in {root}, with the config it ran with; its journal:\n"
            f"  {prog} status --config {os.path.join(workdir, 'config.yaml')}"
        )
    else:
        shutil.rmtree(root, ignore_errors=True)
        print(f"\nThe demo's folders were temporary and are gone; to keep them: {prog} demo --workdir DIR")
    if not ok:
        print("demo: not every file finished within 120 s", file=sys.stderr)
        return 1
    return 0


def _write_demo_config(path: Path, host: str) -> Config:
    """The demo's config, written to ``path`` and read back from it: what runs is what stays."""
    raw = {
        "konfuzio": {"host": host, "token": DEMO_TOKEN, "project_id": 1},
        "folders": {"inbox": "inbox", "done": "done", "failed": "failed", "state": "state"},  # next to the file
        "watch": {"settle_seconds": 1.0},
        "callback": {"host": "127.0.0.1", "port": 0},
        "monitor": {"port": 0},
        "results": {"callback_timeout": 20, "poll_interval": 2, "outputs": ["json", "searchable_pdf"]},
    }
    path.write_text(
        "# written by `konfuzio-watch demo`: the emulator at konfuzio.host ended with it, and\n"
        "# `konfuzio-watch status --config` on this file shows the demo's journal\n"
        + yaml.safe_dump(raw, sort_keys=False),
        encoding="utf-8",
    )
    return load_config(path)


def _drop_samples(inbox: Path, staging: Path, count: int, write_samples) -> None:  # type: ignore[no-untyped-def]
    staging.mkdir(parents=True, exist_ok=True)
    samples = write_samples(staging, count)
    for index, sample in enumerate(samples):
        target = inbox / SUBFOLDERS[index % len(SUBFOLDERS)] / sample.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if index == 0:
            _write_slowly(sample, target)
        else:
            shutil.move(sample, target)  # like a user dropping a file
    shutil.rmtree(staging, ignore_errors=True)


def _write_slowly(sample: Path, target: Path) -> None:
    """Like a network scanner: the file grows in chunks over a few seconds, in the background."""
    data = sample.read_bytes()
    print(f"{target.name}: being written slowly in 4 chunks (a scanner on a share)")

    def writer() -> None:
        with open(target, "wb") as f:
            for i in range(4):
                f.write(data[i * len(data) // 4 : (i + 1) * len(data) // 4])
                f.flush()
                time.sleep(0.7)

    threading.Thread(target=writer, name="slow-writer", daemon=True).start()


class _Progress:
    def __init__(self, total: int, finished: threading.Event):
        self.total = total
        self.done = 0
        self.finished = finished
        self.lock = threading.Lock()

    def on_transition(self, row: Row, old: State) -> None:
        with self.lock:
            if row.state in FINISHED:
                self.done += 1
            extra = f" document {row.document_id}" if row.state == State.UPLOADED else ""
            if row.state == State.FAILED:
                extra = f" ({row.error})"
            print(f"[{self.done:>2}/{self.total}] {row.display_path}: {old.value} -> {row.state.value}{extra}")
            if self.done >= self.total:
                self.finished.set()


def _summary(done: Path, failed: Path, inbox: Path) -> None:
    print(
        "\ndone/ (each original next to <name>.json and <name>.ocr.pdf; below it the start of its OCR text,\n"
        "its category and two of the fields Konfuzio extracted):"
    )
    for path in sorted(done.rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        pages = len(data["pages"])
        document = f"document {data['document_id']}, {pages} page{'s' * (pages != 1)}"
        print(f"  {str(path.relative_to(done))[:-5]}  ({document})")
        print(f"      {_excerpt(data['text'])}")
        print(f"      {_extraction(data)}")
    failures = sorted(failed.rglob("*.error.json"))
    print(f"failed/: {len(failures)} file(s)")
    for path in failures:
        print(f"  {path.relative_to(failed)}: {json.loads(path.read_text())['error']}")
    left = [
        p
        for p in inbox.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(inbox).parts)
    ]
    print(f"inbox: {len(left)} file(s) left")


def _extraction(result: dict) -> str:
    """``Invoice (87 %): Invoice Number = INV-1A2B3C4D, Date = 2021-03-04``: the category and the
    first two single values of its fields."""
    category = result.get("category")
    if not category:
        return "no category"
    confidence = category.get("confidence")
    head = f"{category.get('name') or category['id']}" + (f" ({confidence:.0%})" if confidence is not None else "")
    shown = []
    for values in (result.get("fields") or {}).values():
        for label, value in values.items() if isinstance(values, dict) else ():
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None and len(shown) < 2:
                shown.append(f"{label} = {value}")
    return head + (": " + ", ".join(shown) if shown else "")


def _excerpt(text: str, width: int = 60) -> str:
    """The first ``width`` characters of the text on one line (line breaks and page breaks as spaces)."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[:width] + "...")
