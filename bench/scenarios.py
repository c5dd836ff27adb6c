"""The workloads. Each scenario starts its own emulator (and daemon or tutorial process), runs,
stops everything it started, and returns raw figures as a dict (seconds, KiB, counts).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
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
    process_cpu_s,
    realistic_knobs,
    results_in,
    syscalls_between,
    wait_until,
    write_big_pdf,
    write_documents,
)

TUTORIAL_SCRIPT = Path(__file__).with_name("tutorial_flow.py")
ACTIVE_STATES = ("claiming", "claimed", "uploading", "uploaded", "exporting", "failing")


def ideal_wall_s(n: int, knobs: Knobs, concurrency: int) -> float:
    """N x upload latency / concurrency + the longest possible processing."""
    return n * knobs.upload_latency_s / concurrency + knobs.processing_s + knobs.processing_jitter_s


def _emulator(knobs: Knobs, threads: int = 16) -> Emulator:
    # callback_workers: enough that the emulator's own callback pool is never the bottleneck;
    # threads: more than the uploads in flight (each sleeps upload_latency_s in its thread)
    return Emulator(token=TOKEN, project_ids=(PROJECT_ID,), knobs=knobs, seed=1, callback_workers=8).start(
        threads=threads
    )


# -- 1, 3, 4: one daemon: latency probes, then a burst of N files, then idle ------------------------


def daemon_run(
    root: Path,
    *,
    name: str,
    n: int,
    settle_s: float,
    concurrency: int,
    idle_s: float,
    latency_files: int,
    profile_dir: Path | None,
    timeout_s: float = 120.0,
    code: Path | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    emulator_threads: int = 16,
    knobs: Knobs | None = None,
) -> dict[str, Any]:
    """``code``: run that checkout's daemon (``--before``) instead of this one's."""
    knobs = knobs or realistic_knobs()
    out: dict[str, Any] = {
        "n": n,
        "settle_s": settle_s,
        "concurrency": concurrency,
        "knobs": {k: getattr(knobs, k) for k in ("upload_latency_s", "processing_s", "processing_jitter_s")},
        "ideal_s": ideal_wall_s(n, knobs, concurrency),
    }
    emu = _emulator(knobs, threads=emulator_threads)
    try:
        config = DaemonConfig(
            root / name, emu.url, settle_s=settle_s, concurrency=concurrency, extra=extra or {}, legacy=code is not None
        )
        daemon = DaemonProcess(config, profile_dir, name=name, code=code).start()
        try:
            out["ready_s"] = daemon.wait_ready()
            if latency_files:
                out["latency"] = _latency_probes(daemon, emu, latency_files, timeout_s)
            emu.reset_request_stats()
            out["burst"] = _burst(daemon, emu, n, timeout_s)
            out["requests"] = _requests(emu)
            if idle_s:
                out["idle"] = _idle(daemon, emu, idle_s)
            out["memory_kib"] = daemon.memory_kib()
        finally:
            out["stop"] = daemon.stop()
    finally:
        emu.stop()
    return out


def _requests(emu: Emulator) -> dict[str, dict[str, int]]:
    """The API requests answered since the last reset, by kind: count, errors, bytes both ways."""
    return {kind: dict(vars(stats)) for kind, stats in emu.request_stats().items()}


def _latency_probes(
    daemon: DaemonProcess, emu: Emulator, count: int, timeout_s: float, spacing_s: float = 0.4
) -> dict[str, Any]:
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
    bench_cpu_before = process_cpu_s()
    t0 = time.time()
    for path in paths:
        os.rename(path, cfg.inbox / path.name)
    dropped_s = time.time() - t0

    def finished() -> bool:
        daemon.check_alive()
        return len(_results_named(cfg.done, names)) + len(_results_named(cfg.failed, names, ".error.json")) >= n

    wait_until(finished, timeout_s, f"{n} files in done/ or failed/", interval_s=0.05 if n <= 200 else 0.25)
    seen_s = time.time() - t0
    user_after, system_after = daemon.cpu_times()
    bench_cpu_s = process_cpu_s() - bench_cpu_before
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
        "emulator_cpu_s": bench_cpu_s,  # the bench process: the emulator, and the bench's own waiting
        "t0": t0,
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
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                timeout=timeout_s,
            )
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


# -- the floor: the same API calls, callback and durable writes per file, without the daemon ------------


def floor_run(root: Path, *, n: int, concurrency: int = 4, timeout_s: float = 300.0) -> dict[str, Any]:
    """``bench/floor.py`` in its own process against a fresh emulator (the burst's knobs): once for the
    figure, once more with each step's thread CPU (``--segments``, which costs a little itself), once
    with bare http.client instead of the SDK's session (``--http raw``)."""
    out: dict[str, Any] = {}
    for variant in ("sdk", "segments", "raw"):
        emu = _emulator(realistic_knobs())
        workdir = root / f"floor-{variant}"
        try:
            command = [
                sys.executable,
                "-m",
                "bench.floor",
                "--host",
                emu.url,
                "--workdir",
                str(workdir),
                "-n",
                str(n),
                "--concurrency",
                str(concurrency),
                "--http",
                "raw" if variant == "raw" else "sdk",
                *(["--segments"] if variant == "segments" else []),
            ]
            proc = subprocess.run(
                command,
                cwd=Path(__file__).resolve().parent.parent,
                capture_output=True,
                timeout=timeout_s,
                env={**os.environ, "LOG_TO_FILE": "False"},
            )
        finally:
            emu.stop()
        if proc.returncode != 0 or not proc.stdout.strip():
            tail = proc.stderr.decode(errors="replace")[-2000:]
            raise BenchError(f"bench.floor exited with {proc.returncode}:\n{tail}")
        figures = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        if variant == "segments":
            out["segments_ms"] = figures["segments_ms"]
        elif variant == "raw":
            out["raw_http_cpu_per_file_ms"] = figures["cpu_per_file_ms"]
        else:
            out.update(figures)
    return out


# -- 5: a backlog present at start-up ---------------------------------------------------------------


def backlog_run(
    root: Path,
    *,
    n: int,
    profile_dir: Path | None,
    timeout_s: float = 300.0,
    steady_s: float = 10.0,
    code: Path | None = None,
) -> dict[str, Any]:
    """N small files already in the inbox when the daemon starts; processing never finishes during
    the run, so all N stay pending. Journal progress is read from the journal (read-only). Uploads
    go on meanwhile: their rate while the backlog is being journaled (first upload -> all journaled)
    is compared with their rate for ``steady_s`` after it."""
    knobs = realistic_knobs(processing_s=3600.0, processing_jitter_s=0.0)
    emu = _emulator(knobs)
    out: dict[str, Any] = {"n": n}
    try:
        config = DaemonConfig(root / "backlog", emu.url, legacy=code is not None)
        config.write()
        t = time.time()
        write_documents(config.inbox, n, "bl")
        out["write_files_s"] = time.time() - t
        daemon = DaemonProcess(config, profile_dir, name="backlog", code=code).start()
        t0 = daemon.started_at
        peak_rss = 0
        try:
            out["ready_s"] = daemon.wait_ready(timeout_s)
            journaled_at = None
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and journaled_at is None:
                daemon.check_alive()
                if sum(journal_counts(config.journal).values()) >= n:
                    journaled_at = time.time()
                    out["cpu_at_journaled_s"] = daemon.cpu_s()
                peak_rss = max(peak_rss, daemon.memory_kib()["VmRSS"])
                time.sleep(0.1)
            if journaled_at is None:
                raise BenchError(f"the backlog of {n} was not journaled within {timeout_s:.0f} s")
            out["journaled_s"] = journaled_at - t0
            hold_until = time.monotonic() + steady_s  # uploads after the backlog is journaled: the steady rate
            while time.monotonic() < hold_until:
                peak_rss = max(peak_rss, daemon.memory_kib()["VmRSS"])
                time.sleep(0.1)
            arrivals = sorted(u.arrived_at for u in list(emu.uploads))
            out["first_upload_s"] = arrivals[0] - t0 if arrivals else None
            out.update(_upload_rates(arrivals, journaled_at, steady_s))
            out["counts"] = journal_counts(config.journal)
            out["uploads"] = len(arrivals)
            out["cpu_s"] = daemon.cpu_s()
            out["memory_kib"] = {**daemon.memory_kib(), "sampled_peak_VmRSS": peak_rss}
            out["elapsed_s"] = time.time() - t0
        finally:
            out["stop"] = daemon.stop()
    finally:
        emu.stop()
    return out


def _upload_rates(arrivals: list[float], journaled_at: float, steady_s: float) -> dict[str, Any]:
    """Uploads per second from the first upload until all were journaled, and over ``steady_s``
    after that (arrival times at the emulator)."""
    if not arrivals:
        return {"rate_while_journaling": None, "rate_steady": None, "rate_ratio": None}
    first = arrivals[0]
    during = [a for a in arrivals if a <= journaled_at]
    after = [a for a in arrivals if journaled_at < a <= journaled_at + steady_s]
    steady = len(after) / steady_s
    window = journaled_at - first
    if window <= 0.5:  # journaled before (or right at) the first upload: nothing to slow down
        return {
            "rate_while_journaling": None,
            "rate_steady": steady,
            "rate_ratio": None,
            "journaling_window_s": max(window, 0.0),
        }
    rate = len(during) / window
    return {
        "rate_while_journaling": rate,
        "rate_steady": steady,
        "rate_ratio": rate / steady if steady else None,
        "journaling_window_s": window,
    }


# -- memory: big files in flight -----------------------------------------------------------------------


def memory_run(
    root: Path,
    *,
    size_mb: int,
    files: int = 4,
    concurrency: int = 4,
    code: Path | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """``files`` files of ``size_mb`` MB each dropped at once, uploaded ``concurrency`` at a time;
    the daemon's peak RSS (VmHWM) over the whole run."""
    knobs = realistic_knobs()
    emu = _emulator(knobs)
    name = f"memory-{size_mb}mb"
    out: dict[str, Any] = {"size_mb": size_mb, "files": files, "concurrency": concurrency}
    try:
        config = DaemonConfig(root / name, emu.url, settle_s=0.5, concurrency=concurrency, legacy=code is not None)
        daemon = DaemonProcess(config, name=name, code=code).start()
        try:
            daemon.wait_ready()
            out["rss_ready_kib"] = daemon.memory_kib()["VmRSS"]
            staging = config.workdir / "staging"
            staging.mkdir(parents=True, exist_ok=True)
            paths = [write_big_pdf(staging / f"big_{i}.pdf", size_mb * 1000 * 1000) for i in range(files)]
            for path in paths:
                os.rename(path, config.inbox / path.name)
            names = {p.name for p in paths}
            peak = 0

            def finished() -> bool:
                nonlocal peak
                daemon.check_alive()
                peak = max(peak, daemon.memory_kib()["VmRSS"])
                return (
                    len(_results_named(config.done, names)) + len(_results_named(config.failed, names, ".error.json"))
                    >= files
                )

            wait_until(finished, timeout_s, f"{files} big files in done/ or failed/", interval_s=0.05)
            out["done"] = len(_results_named(config.done, names))
            out["memory_kib"] = {**daemon.memory_kib(), "sampled_peak_VmRSS": peak}
            out["max_in_flight"] = _max_overlap(emu)
        finally:
            out["stop"] = daemon.stop()
    finally:
        emu.stop()
    return out


def _max_overlap(emu: Emulator) -> int:
    """The most uploads the emulator was receiving at once (arrival -> stored)."""
    edges = sorted(
        [(u.arrived_at or u.received_at, 1) for u in emu.uploads] + [(u.received_at, -1) for u in emu.uploads]
    )
    most = level = 0
    for _, step in edges:
        level += step
        most = max(most, level)
    return most


# -- reconciliation after a crash in a big project -----------------------------------------------------


def reconcile_run(
    root: Path, *, seeded: int, files: int = 4, code: Path | None = None, timeout_s: float = 180.0
) -> dict[str, Any]:
    """A project of ``seeded`` documents; ``files`` uploads stored by the server whose answers the
    daemon never read (killed with SIGKILL while the server held its answers back); restarted, it
    must find them by their tokens. Counts the list requests until all are in done/."""
    knobs = realistic_knobs(stall_after_store_s=30.0)
    emu = _emulator(knobs)
    out: dict[str, Any] = {"seeded": seeded, "files": files}
    try:
        emu.seed_documents(PROJECT_ID, seeded)
        config = DaemonConfig(root / "reconcile", emu.url, settle_s=0.5, legacy=code is not None)
        daemon = DaemonProcess(config, name="reconcile", code=code).start()
        try:
            daemon.wait_ready()
            paths = write_documents(config.workdir / "staging", files, "rc")
            for path in paths:
                os.rename(path, config.inbox / path.name)
            wait_until(lambda: len(emu.uploads) >= files, 60, f"{files} uploads stored by the emulator")
        finally:
            daemon.kill()
        emu.wait_idle(30)  # processed (and their callbacks lost): the restarted daemon finds them done
        emu.knobs.stall_after_store_s = 0.0
        emu.reset_request_stats()
        daemon = DaemonProcess(config, name="reconcile-restart", code=code).start()
        try:
            daemon.wait_ready()
            names = {p.name for p in paths}
            wait_until(
                lambda: len(_results_named(config.done, names)) >= files,
                timeout_s,
                f"{files} reconciled files in done/",
            )
            stats = emu.request_stats()
            out["list_requests"] = stats["list"].count if "list" in stats else 0
            out["uploads_after_restart"] = stats["upload"].count if "upload" in stats else 0
            out["duplicate_documents"] = len(emu.uploads) - files
        finally:
            out["stop"] = daemon.stop()
    finally:
        emu.stop()
    return out


# -- fsync-class calls per file ------------------------------------------------------------------------


def fsync_run(
    root: Path, *, n: int, concurrency: int = 4, code: Path | None = None, timeout_s: float = 180.0
) -> dict[str, Any]:
    """The daemon under ``strace -f``; the fsync-class calls made between the drop of N files and
    the last result, per file."""
    knobs = realistic_knobs()
    emu = _emulator(knobs)
    out: dict[str, Any] = {"n": n}
    try:
        config = DaemonConfig(root / "fsync", emu.url, concurrency=concurrency, legacy=code is not None)
        trace = config.workdir / "strace.txt"
        config.workdir.mkdir(parents=True, exist_ok=True)
        daemon = DaemonProcess(config, name="fsync", code=code, strace_output=trace).start()
        try:
            daemon.wait_ready()
            time.sleep(1.0)  # start-up's own writes are over
            burst = _burst(daemon, emu, n, timeout_s)
            end = time.time()
        finally:
            out["stop"] = daemon.stop()
        out["wall_s"] = burst["wall_s"]
        out["calls"] = syscalls_between(trace, burst["t0"], end)
        out["per_file"] = sum(out["calls"].values()) / n
    finally:
        emu.stop()
    return out


# -- polling mode, idle, with many files in processing/ and done/ ----------------------------------------


def idle_polling_run(
    root: Path, *, n: int, window_s: float, code: Path | None = None, timeout_s: float = 300.0
) -> dict[str, Any]:
    """watch.polling on an inbox that holds done/ and failed/ (``n`` files in done/); ``n`` files
    claimed into the processing folder that wait there (their uploads hang at the server, so at most
    upload.concurrency are in flight and the others wait their turn). CPU over ``window_s``."""
    knobs = realistic_knobs(upload_latency_s=3600.0)
    emu = _emulator(knobs)
    out: dict[str, Any] = {"n": n}
    try:
        config = DaemonConfig(
            root / "idle-polling",
            emu.url,
            legacy=code is not None,
            results_in_inbox=True,
            extra={"watch": {"polling": True, "poll_interval": 5}, "konfuzio": {"timeout_seconds": 3600}},
        )
        config.write()
        for i, path in enumerate(write_documents(config.done, n // 2, "old")):
            (path.parent / (path.name + ".json")).write_bytes(b'{"document_id": %d}\n' % i)
        write_documents(config.inbox, n, "wait")
        daemon = DaemonProcess(config, name="idle-polling", code=code).start()
        try:
            daemon.wait_ready(timeout_s)

            def all_claimed() -> bool:
                daemon.check_alive()
                counts = journal_counts(config.journal)
                return sum(counts.get(s, 0) for s in ("claimed", "uploading")) >= n

            wait_until(all_claimed, timeout_s, f"{n} files claimed", interval_s=0.2)
            time.sleep(3.0)  # the last claims' log lines and the first poll after them
            cpu_before = daemon.cpu_s()
            started = time.monotonic()
            time.sleep(window_s)  # the measurement window itself
            cpu_s = daemon.cpu_s() - cpu_before
            window = time.monotonic() - started
            out.update(
                window_s=window,
                cpu_s=cpu_s,
                cpu_percent=cpu_s / window * 100,
                in_done=sum(1 for _ in results_in(config.done, "")),
            )
        finally:
            daemon.kill()  # its uploads hang at the server: a stop would wait for them
    finally:
        emu.stop()
    return out


# -- poll-only mode against callbacks ----------------------------------------------------------------


def pollonly_run(root: Path, *, n: int, first_poll_s: float, profile_dir: Path | None = None) -> dict[str, Any]:
    """The same burst as the daemon run, with ``callback.enabled: false``: wall and API requests per file."""
    extra = {"callback": {"enabled": False}, "results": {"first_poll_seconds": first_poll_s}}
    return daemon_run(
        root,
        name=f"pollonly-{first_poll_s:g}s",
        n=n,
        settle_s=2.0,
        concurrency=4,
        idle_s=0,
        latency_files=0,
        profile_dir=profile_dir,
        extra=extra,
    )


# -- what each result output costs -------------------------------------------------------------------


OUTPUTS = {
    "json": {"results": {"outputs": ["json"]}},
    "json + searchable_pdf": {"results": {"outputs": ["json", "searchable_pdf"]}},
    "json, bbox: false": {"results": {"outputs": ["json"], "bbox": False}},
}


def outputs_run(root: Path, *, n: int, which: str) -> dict[str, Any]:
    slug = which.replace(" ", "").replace(",", "-").replace(":", "").replace("+", "-")
    return daemon_run(
        root,
        name=f"outputs-{slug}",
        n=n,
        settle_s=0.5,
        concurrency=4,
        idle_s=0,
        latency_files=0,
        profile_dir=None,
        extra=OUTPUTS[which],
    )


# -- the size of a fresh `make test` virtualenv -------------------------------------------------------


def venv_run(root: Path, *, checkout: Path) -> dict[str, Any]:
    """Build ``.venv`` as ``make test`` does, from ``checkout``'s Makefile, in a fresh folder; du -sk."""
    venv = root / f"venv-{checkout.name}"
    started = time.time()
    proc = subprocess.run(
        ["make", "-C", str(checkout), f"VENV={venv}", f"{venv}/.installed"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=900,
    )
    if proc.returncode != 0:
        raise BenchError(f"building {venv} failed:\n{proc.stdout.decode(errors='replace')[-2000:]}")
    size_kib = int(subprocess.run(["du", "-sk", str(venv)], stdout=subprocess.PIPE, check=True).stdout.split()[0])
    shutil.rmtree(venv, ignore_errors=True)
    return {"size_kib": size_kib, "build_s": time.time() - started}
