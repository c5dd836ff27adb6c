"""The workloads. Each scenario starts its own emulator (and daemon or tutorial process), runs,
stops everything it started, and returns raw figures as a dict (seconds, KiB, counts).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from konfuzio_watch.emulator import Emulator, Knobs
from konfuzio_watch.samples import make_pdf

from .harness import (
    PROJECT_ID,
    TOKEN,
    BenchError,
    DaemonConfig,
    DaemonProcess,
    journal_counts,
    realistic_knobs,
    results_in,
    wait_until,
    write_documents,
)

TUTORIAL_SCRIPT = Path(__file__).with_name("tutorial_flow.py")
ACTIVE_STATES = ("claiming", "claimed", "uploading", "uploaded", "exporting", "failing")


def ideal_wall_s(n: int, knobs: Knobs, concurrency: int) -> float:
    """N x upload latency / concurrency + the longest possible processing."""
    return n * knobs.upload_latency_s / concurrency + knobs.processing_s + knobs.processing_jitter_s


def _emulator(knobs: Knobs) -> Emulator:
    # callback_workers: enough that the emulator's own callback pool is never the bottleneck
    return Emulator(token=TOKEN, project_ids=(PROJECT_ID,), knobs=knobs, seed=1, callback_workers=8).start(threads=16)


# -- 1, 3, 4: one daemon: latency probes, then a burst of N files, then idle ------------------------


def daemon_run(root: Path, *, name: str, n: int, settle_s: float, concurrency: int, idle_s: float,
               latency_files: int, profile_dir: Path | None, timeout_s: float = 120.0) -> dict[str, Any]:
    knobs = realistic_knobs()
    out: dict[str, Any] = {"n": n, "settle_s": settle_s, "concurrency": concurrency,
                           "knobs": {k: getattr(knobs, k) for k in ("upload_latency_s", "processing_s",
                                                                    "processing_jitter_s")},
                           "ideal_s": ideal_wall_s(n, knobs, concurrency)}  # fmt: skip
    emu = _emulator(knobs)
    try:
        config = DaemonConfig(root / name, emu.url, settle_s=settle_s, concurrency=concurrency)
        daemon = DaemonProcess(config, profile_dir, name=name).start()
        try:
            out["ready_s"] = daemon.wait_ready()
            if latency_files:
                out["latency"] = _latency_probes(daemon, emu, latency_files, timeout_s)
            out["burst"] = _burst(daemon, emu, n, timeout_s)
            if idle_s:
                out["idle"] = _idle(daemon, emu, idle_s)
            out["memory_kib"] = daemon.memory_kib()
        finally:
            out["stop"] = daemon.stop()
    finally:
        emu.stop()
    return out


def _latency_probes(daemon: DaemonProcess, emu: Emulator, count: int, timeout_s: float,
                    spacing_s: float = 0.4) -> dict[str, Any]:
    """Write files in place like a scanner (two chunks 50 ms apart), one every ``spacing_s`` so
    that no probe queues behind another; compare the last write (mtime) with the moment the
    upload request reached the emulator (``UploadRecord.arrived_at``, before its latency sleep)."""
    cfg = daemon.config
    written: dict[str, float] = {}
    for i in range(1, count + 1):
        path = cfg.inbox / f"lat_{i:03d}.pdf"
        data = make_pdf(pages=1, label=path.name)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(0.05)
            f.write(data[len(data) // 2 :])
        written[path.name] = os.stat(path).st_mtime_ns / 1e9
        time.sleep(spacing_s)
    wait_until(lambda: len(_uploads_named(emu, written)) >= count, timeout_s, f"{count} latency probes uploaded")
    uploads = _uploads_named(emu, written)
    wait_until(lambda: len(_results_named(cfg.done, written)) >= count, timeout_s, f"{count} latency probes done")
    delays = sorted(u.arrived_at - written[u.data_file_name] - cfg.settle_s for u in uploads)
    return {
        "count": count,
        "delays_s": [round(d, 4) for d in delays],
        "median_s": statistics.median(delays),
        "max_s": max(delays),
        "method": "UploadRecord.arrived_at (emulator, request start) - file mtime (last write) - settle_seconds",
    }


def _burst(daemon: DaemonProcess, emu: Emulator, n: int, timeout_s: float) -> dict[str, Any]:
    """Drop N finished PDFs at once (rename from a staging folder on the same disk); wait for N JSONs."""
    cfg = daemon.config
    staging = cfg.workdir / "staging"
    paths = write_documents(staging, n, "doc")
    names = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    uploads_before = len(emu.uploads)
    user_before, system_before = daemon.cpu_times()
    t0 = time.time()
    for path in paths:
        os.rename(path, cfg.inbox / path.name)
    dropped_s = time.time() - t0

    def finished() -> bool:
        daemon.check_alive()
        return len(_results_named(cfg.done, names)) + len(_results_named(cfg.failed, names, ".error.json")) >= n

    wait_until(finished, timeout_s, f"{n} files in done/ or failed/", interval_s=0.05)
    seen_s = time.time() - t0
    user_after, system_after = daemon.cpu_times()
    user_s, system_s = user_after - user_before, system_after - system_before
    cpu_s = user_s + system_s
    results = _results_named(cfg.done, names)
    last_json_s = max(e.stat().st_mtime for e in results) - t0 if results else None
    uploads = [u for u in emu.uploads[uploads_before:] if u.data_file_name in names]
    wrong = 0
    for entry in results:
        body = json.loads(Path(entry.path).read_bytes())
        source_name = entry.name[: -len(".json")]
        if body.get("source", {}).get("sha256") != names.get(source_name) or names[source_name] not in body["text"]:
            wrong += 1
    arrivals = sorted(u.arrived_at - t0 for u in uploads)
    return {
        "wall_s": last_json_s,
        "seen_all_s": seen_s,
        "drop_s": dropped_s,
        "done": len(results),
        "failed": n - len(results),
        "wrong_results": wrong,
        "uploads": len(uploads),
        "duplicate_uploads": len(uploads) - len({u.data_file_name for u in uploads}),
        "first_upload_s": arrivals[0] if arrivals else None,
        "last_upload_s": arrivals[-1] if arrivals else None,
        "cpu_s": cpu_s,
        "cpu_user_s": user_s,
        "cpu_system_s": system_s,
        "cpu_per_file_ms": cpu_s / n * 1000,
    }


def _idle(daemon: DaemonProcess, emu: Emulator, idle_s: float) -> dict[str, Any]:
    """Nothing to do: no files, no pending rows. CPU used over ``idle_s`` seconds."""
    def quiet() -> bool:
        counts = journal_counts(daemon.config.journal)
        return emu.wait_idle(0.1) and not any(counts.get(s) for s in ACTIVE_STATES)

    wait_until(quiet, 30, "no active journal rows and no emulator work before the idle window")
    time.sleep(2.0)  # let the last callbacks' connections close
    log_size = daemon.log_path.stat().st_size
    requests_before = len(emu.uploads)
    cpu_before = daemon.cpu_s()
    started = time.monotonic()
    time.sleep(idle_s)  # the measurement window itself
    cpu_s = daemon.cpu_s() - cpu_before
    window_s = time.monotonic() - started
    return {
        "window_s": window_s,
        "cpu_s": cpu_s,
        "cpu_percent": cpu_s / window_s * 100,
        "log_bytes": daemon.log_path.stat().st_size - log_size,
        "uploads": len(emu.uploads) - requests_before,
    }


def _uploads_named(emu: Emulator, names: dict[str, Any]) -> list:
    return [u for u in list(emu.uploads) if u.data_file_name in names]


def _results_named(folder: Path, names: dict[str, Any], suffix: str = ".json") -> list[os.DirEntry[str]]:
    return [e for e in results_in(folder, suffix) if e.name[: -len(suffix)] in names]


# -- 2: Konfuzio's tutorial flow, same files, identical emulator ------------------------------------


def tutorial_run(root: Path, *, n: int, timeout_s: float = 300.0) -> dict[str, Any]:
    knobs = realistic_knobs()
    cwd = root / "tutorial"
    paths = write_documents(cwd, n, "doc")  # the same names and bytes as the daemon's burst
    emu = _emulator(knobs)
    try:
        env = {**os.environ, "KONFUZIO_HOST": emu.url, "KONFUZIO_TOKEN": TOKEN, "LOG_TO_FILE": "False"}
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        with open(cwd.parent / "tutorial.log", "wb") as log:
            proc = subprocess.run(
                [sys.executable, str(TUTORIAL_SCRIPT), "--project", str(PROJECT_ID), *[p.name for p in paths]],
                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, timeout=timeout_s,
            )  # fmt: skip
        elapsed = time.time() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0 or not proc.stdout.strip():
            tail = (cwd.parent / "tutorial.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"the tutorial flow exited with {proc.returncode}:\n{tail}")
        figures = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        uploads = list(emu.uploads)
    finally:
        emu.stop()
    return {
        "n": n,
        "wall_s": figures["end"] - figures["start"],
        "import_s": figures["imported"] - figures["process_start"],
        "project_s": figures["project_ready"] - figures["start"],
        "uploads_s": figures["uploads_done"] - figures["start"],
        "process_s": elapsed,
        "updated": figures["updated"],
        "uploads": len(uploads),
        "cpu_s": (usage.ru_utime + usage.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime),
    }


# -- 5: a backlog present at start-up ---------------------------------------------------------------


def backlog_run(root: Path, *, n: int, profile_dir: Path | None, timeout_s: float = 120.0,
                hold_s: float = 5.0) -> dict[str, Any]:
    """N small files already in the inbox when the daemon starts; processing never finishes during
    the run, so all N stay pending. Journal progress is read from the journal (read-only)."""
    knobs = realistic_knobs(processing_s=3600.0, processing_jitter_s=0.0)
    emu = _emulator(knobs)
    out: dict[str, Any] = {"n": n}
    try:
        config = DaemonConfig(root / "backlog", emu.url)
        config.write()
        write_documents(config.inbox, n, "bl")
        daemon = DaemonProcess(config, profile_dir, name="backlog").start()
        t0 = daemon.started_at
        peak_rss = 0
        try:
            out["ready_s"] = daemon.wait_ready(timeout_s)
            journaled_at = first_upload_at = None
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and (journaled_at is None or first_upload_at is None):
                daemon.check_alive()
                if journaled_at is None and sum(journal_counts(config.journal).values()) >= n:
                    journaled_at = time.time()
                    out["cpu_at_journaled_s"] = daemon.cpu_s()
                if first_upload_at is None and emu.uploads:
                    first_upload_at = min(u.arrived_at for u in list(emu.uploads))
                peak_rss = max(peak_rss, daemon.memory_kib()["VmRSS"])
                time.sleep(0.1)
            out["journaled_s"] = None if journaled_at is None else journaled_at - t0
            out["first_upload_s"] = None if first_upload_at is None else first_upload_at - t0
            hold_until = time.monotonic() + hold_s  # keep all N pending a little longer
            while time.monotonic() < hold_until:
                peak_rss = max(peak_rss, daemon.memory_kib()["VmRSS"])
                time.sleep(0.1)
            out["counts"] = journal_counts(config.journal)
            out["uploads"] = len(emu.uploads)
            out["cpu_s"] = daemon.cpu_s()
            out["memory_kib"] = {**daemon.memory_kib(), "sampled_peak_VmRSS": peak_rss}
            out["elapsed_s"] = time.time() - t0
        finally:
            out["stop"] = daemon.stop()
    finally:
        emu.stop()
    return out
