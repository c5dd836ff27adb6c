"""The status page's cost (``--only page``): the page's size with 1,000 failed and 1,000 waiting files,
and the daemon's CPU during the burst while a client keeps the page open (a GET of ``/`` every 2 s, as
an open browser tab does at most; the page itself refreshes every ``page.REFRESH_S`` s) against the
same burst without, in interleaved runs; and the CPU of one page render, measured over 50 renders.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import requests

from konfuzio_watch.locks import read_daemon_lock

from .harness import DaemonConfig, DaemonProcess, realistic_knobs, wait_until, write_documents
from .scenarios import _burst, _emulator, journal_counts

FETCH_EVERY_S = 2.0
RENDERS = 50


def monitor_url(daemon: DaemonProcess) -> str:
    holder = read_daemon_lock(daemon.config.state)
    assert holder is not None and holder.monitor_url, "the daemon's lock file names no monitor"
    return holder.monitor_url


class PageFetcher:
    """A thread that GETs the page every ``every_s`` seconds, like a browser tab left open."""

    def __init__(self, url: str, every_s: float = FETCH_EVERY_S):
        self.url, self.every_s = url, every_s
        self.sizes: list[int] = []
        self.latencies_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-fetcher", daemon=True)

    def __enter__(self) -> PageFetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with requests.Session() as session:
            while True:
                started = time.perf_counter()
                answer = session.get(self.url, timeout=10)
                self.latencies_s.append(time.perf_counter() - started)
                self.sizes.append(len(answer.content))
                if self._stop.wait(self.every_s):
                    return


def burst_run(root: Path, *, n: int, with_page: bool) -> dict[str, Any]:
    """The burst of ``n`` files at concurrency 4, with or without the page kept open."""
    emu = _emulator(realistic_knobs())
    try:
        daemon = DaemonProcess(DaemonConfig(root / "page", emu.url), name="page").start()
        try:
            daemon.wait_ready()
            url = monitor_url(daemon) + "/"
            out: dict[str, Any] = {"n": n, "with_page": with_page}
            if with_page:
                with PageFetcher(url) as fetcher:
                    out["burst"] = _burst(daemon, emu, n, timeout_s=120)
                out["fetches"] = len(fetcher.sizes)
                out["page_bytes"] = max(fetcher.sizes)
                out["fetch_ms_max"] = max(fetcher.latencies_s) * 1000
                out["render_cpu_ms"] = _render_cpu_ms(daemon, url)
            else:
                out["burst"] = _burst(daemon, emu, n, timeout_s=120)
        finally:
            out["stop"] = daemon.stop()
    finally:
        emu.stop()
    return out


def _render_cpu_ms(daemon: DaemonProcess, url: str) -> float:
    """The daemon's CPU per page, over ``RENDERS`` GETs of it in a row (the daemon idle meanwhile)."""
    with requests.Session() as session:
        session.get(url, timeout=10)
        before = daemon.cpu_s()
        for _ in range(RENDERS):
            session.get(url, timeout=10)
        return (daemon.cpu_s() - before) / RENDERS * 1000


def size_run(root: Path, *, failed: int = 1000, waiting: int = 1000) -> dict[str, Any]:
    """The page's bytes (and render time) with ``failed`` files in failed/ and ``waiting`` files waiting
    (Konfuzio down: claimed, the API gate blocked), against /status's."""
    knobs = realistic_knobs(upload_latency_s=0.0)
    emu = _emulator(knobs)
    try:
        config = DaemonConfig(root / "page-size", emu.url, settle_s=0.5)
        daemon = DaemonProcess(config, name="page-size").start()
        try:
            daemon.wait_ready()
            staging = config.workdir / "staging"
            staging.mkdir(parents=True, exist_ok=True)
            for i in range(failed):  # not a document: failed before any upload
                (staging / f"notes_{i:05d}.txt").write_bytes(b"just some text, not a document\n")
            for path in sorted(staging.iterdir()):
                os.rename(path, config.inbox / path.name)
            wait_until(lambda: journal_counts(config.journal).get("failed", 0) >= failed, 300, f"{failed} files failed")
            emu.knobs.outage = True
            for path in write_documents(staging, waiting, "waiting"):
                os.rename(path, config.inbox / path.name)
            active = ("claiming", "claimed", "uploading", "uploaded", "exporting", "failing")
            wait_until(
                lambda: sum(journal_counts(config.journal).get(s, 0) for s in active) >= waiting,
                300,
                f"{waiting} files waiting",
            )
            url = monitor_url(daemon)
            with requests.Session() as session:
                started = time.perf_counter()
                page = session.get(url + "/", timeout=30)
                page_s = time.perf_counter() - started
                status = session.get(url + "/status", timeout=30)
            return {
                "failed": failed,
                "waiting": waiting,
                "page_bytes": len(page.content),
                "page_ms": page_s * 1000,
                "status_bytes": len(status.content),
                "counts": journal_counts(config.journal),
            }
        finally:
            daemon.stop()
    finally:
        emu.stop()


def summary(figures: dict[str, Any]) -> list[str]:
    """Lines for the report: ranges over the runs."""
    after = figures["after"]
    lines = []

    def span(values: list[float], unit: str, digits: int = 1) -> str:
        if not values:
            return "n/a"
        low, high = min(values), max(values)
        return (
            f"{low:.{digits}f}{unit}"
            if round(low, digits) == round(high, digits)
            else f"{low:.{digits}f}-{high:.{digits}f}{unit}"
        )

    sizes = after.get("page_size", [])
    if sizes:
        s = sizes[0]
        lines.append(
            f"page size with {s['failed']} failed and {s['waiting']} waiting files: "
            f"{span([r['page_bytes'] / 1024 for r in sizes], ' KiB')} (/status: "
            f"{span([r['status_bytes'] / 1024 for r in sizes], ' KiB')}), served in "
            f"{span([r['page_ms'] for r in sizes], ' ms')}"
        )
    without, with_page = after.get("page_without", []), after.get("page_with", [])
    if without and with_page:
        cpu = lambda runs: [r["burst"]["cpu_s"] for r in runs]  # noqa: E731
        wall = lambda runs: [r["burst"]["wall_s"] for r in runs if r["burst"]["wall_s"]]  # noqa: E731
        lines.append(
            f"burst of {without[0]['n']} files, daemon CPU: without the page {span(cpu(without), ' s', 2)}, "
            f"with it open (GET / every {FETCH_EVERY_S:g} s) {span(cpu(with_page), ' s', 2)}; wall "
            f"{span(wall(without), ' s')} vs {span(wall(with_page), ' s')}"
        )
        lines.append(
            f"  pages fetched during the burst: {span([r['fetches'] for r in with_page], '', 0)}, "
            f"{span([r['page_bytes'] / 1024 for r in with_page], ' KiB')} each, slowest "
            f"{span([r['fetch_ms_max'] for r in with_page], ' ms')}; one page render: "
            f"{span([r['render_cpu_ms'] for r in with_page], ' ms CPU', 2)} (mean of {RENDERS}, idle)"
        )
    return lines
