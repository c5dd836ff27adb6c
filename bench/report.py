"""Turn the raw figures into tables: the targets (before | after | target | met?), the extras
(poll-only mode, result outputs), and how each figure was taken.

Every scenario may have run several times (``--runs``): a cell shows the range over the runs
(``min-max``), never the best run alone, and "met?" judges the worst run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIB = 1024
Runs = list[dict[str, Any]]


@dataclass(frozen=True)
class Target:
    """One row: ``get`` reads the figure from one run of ``scenario``; ``limit`` with ``at_most``
    (or at least) is the target; ``unit`` formats it."""

    label: str
    scenario: str
    get: Callable[[dict[str, Any]], float | None]
    limit: float | None
    at_most: bool = True
    unit: str = ""
    digits: int = 2
    before_note: str = ""  # shown instead of a figure when the code before cannot run it


def _path(*keys: str | int) -> Callable[[dict[str, Any]], float | None]:
    def get(run: dict[str, Any]) -> float | None:
        value: Any = run
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    return get


def _ratio_to_ideal_settle(run: dict[str, Any]) -> float | None:
    wall = run.get("burst", {}).get("wall_s")
    return None if wall is None else wall / (run["ideal_s"] + run["settle_s"])


def _kib_to_mib(get: Callable[[dict[str, Any]], float | None]) -> Callable[[dict[str, Any]], float | None]:
    def mib(run: dict[str, Any]) -> float | None:
        value = get(run)
        return None if value is None else value / MIB

    return mib


def _kib_as_du_h(get: Callable[[dict[str, Any]], float | None]) -> Callable[[dict[str, Any]], float | None]:
    """KiB as `du -sh` shows a size from 10 MiB on: whole MiB, rounded up (`make` prints the venv's so)."""

    def mib(run: dict[str, Any]) -> float | None:
        value = get(run)
        return None if value is None else float(math.ceil(value / MIB))

    return mib


def _per_file(get: Callable[[dict[str, Any]], float | None], n_key: str = "n", scale: float = 1.0):
    def per_file(run: dict[str, Any]) -> float | None:
        value = get(run)
        return None if value is None else value / run[n_key] * scale

    return per_file


TARGETS = [
    Target(
        "peak RSS, 4 x 100 MB files in flight, concurrency 4 (VmHWM)",
        "memory",
        _kib_to_mib(_path("memory_kib", "VmHWM")),
        150,
        unit=" MiB",
        digits=0,
    ),
    Target(
        "   peak RSS, 4 x 10 MB files (memory must not grow with file size)",
        "memory_small",
        _kib_to_mib(_path("memory_kib", "VmHWM")),
        None,
        unit=" MiB",
        digits=0,
    ),
    Target(
        "reconciliation: list requests, 4 recent uploads, project of 50,000 documents",
        "reconcile",
        _path("list_requests"),
        3,
        digits=0,
    ),
    Target("   documents uploaded twice after the restart", "reconcile", _path("duplicate_documents"), 0, digits=0),
    Target(
        "daemon CPU per file, 100-file burst (utime+stime / N)",
        "burst",
        _path("burst", "cpu_per_file_ms"),
        6,
        unit=" ms",
        digits=1,
    ),
    Target(
        "   floor: the same API calls, callback and durable writes alone (bench/floor.py)",
        "floor",
        _path("cpu_per_file_ms"),
        None,
        unit=" ms",
        digits=1,
    ),
    Target(
        "   floor with bare http.client instead of the SDK's session (not shippable)",
        "floor",
        _path("raw_http_cpu_per_file_ms"),
        None,
        unit=" ms",
        digits=1,
    ),
    Target("fsync-class calls per file in the burst (strace -f)", "fsync", _path("per_file"), 2, digits=1),
    Target("   of which fsync / fdatasync per file", "fsync", lambda r: None, None),  # filled in by _fsync_split
    Target(
        "   floor: WAL fdatasyncs + the JSON's fsync + done/'s fsync (bench/floor.py)",
        "floor",
        lambda r: r["wal_syncs_per_file"] + 2 if "wal_syncs_per_file" in r else None,
        None,
        digits=1,
    ),
    Target("1,000 files, concurrency 16: wall / (ideal + settle)", "scale16", _ratio_to_ideal_settle, 1.10),
    Target("   wall (ideal + settle)", "scale16", _path("burst", "wall_s"), None, unit=" s", digits=1),
    Target("   daemon CPU / emulator+bench CPU during the burst", "scale16", lambda r: None, None),
    Target("1,000 files, concurrency 32: wall / (ideal + settle)", "scale32", _ratio_to_ideal_settle, 1.20),
    Target("   wall (ideal + settle)", "scale32", _path("burst", "wall_s"), None, unit=" s", digits=1),
    Target("   daemon CPU / emulator+bench CPU during the burst", "scale32", lambda r: None, None),
    Target(
        "backlog at start-up: all journaled (s from exec)", "backlog", _path("journaled_s"), 30, unit=" s", digits=1
    ),
    Target("   upload rate while journaling / steady rate after", "backlog", _path("rate_ratio"), 0.90, at_most=False),
    Target("   uploads/s while journaling / steady", "backlog", lambda r: None, None),
    Target("   first upload (s from exec) / peak RSS", "backlog", lambda r: None, None),
    Target(
        "polling mode, idle CPU, files waiting in processing/ and in done/",
        "idle_polling",
        _path("cpu_percent"),
        0.2 - 1e-9,
        unit=" %",
        digits=3,
    ),
    Target("fresh `make test` venv (`du -sh`)", "venv", _kib_as_du_h(_path("size_kib")), 250, unit="M", digits=0),
    Target("100 files, concurrency 4, settle 2 s: wall / (ideal + settle)", "burst", _ratio_to_ideal_settle, 1.05),
    Target("   wall (ideal + settle)", "burst", _path("burst", "wall_s"), None, unit=" s"),
    Target("   every file done once, with its own result", "burst", lambda r: None, None),
    Target(
        "   idle CPU (inotify, nothing pending)", "burst", _path("idle", "cpu_percent"), 0.2 - 1e-9, unit=" %", digits=3
    ),
    Target(
        "   stable -> upload start beyond settle, max of the probes",
        "burst",
        _path("latency", "max_s"),
        None,
        unit=" s",
        digits=3,
    ),
]


def _fmt(values: list[float | None], unit: str, digits: int) -> str:
    found = [v for v in values if v is not None]
    if not found:
        return "—"
    low, high = min(found), max(found)
    text = f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else f"{low:.{digits}f}-{high:.{digits}f}"
    missing = len(values) - len(found)
    return text + unit + (f" ({missing} run(s) without)" if missing else "")


fmt_range = _fmt  # the printouts under the tables use the same ranges


def _worst(values: list[float | None], at_most: bool) -> float | None:
    found = [v for v in values if v is not None]
    if not found or len(found) < len(values):
        return None
    return max(found) if at_most else min(found)


def _met(values: list[float | None], target: Target) -> str:
    if target.limit is None:
        return ""
    worst = _worst(values, target.at_most)
    if worst is None:
        return "NO (no figure)"
    return "yes" if (worst <= target.limit if target.at_most else worst >= target.limit) else "**NO**"


def _limit_text(target: Target) -> str:
    if target.limit is None:
        return "(info)"
    limit = 0.2 if target.unit == " %" else target.limit
    sign = "<" if target.unit == " %" else ("<=" if target.at_most else ">=")
    return f"{sign} {limit:g}{target.unit}"


def _special(target: Target, runs: Runs) -> str | None:
    """Rows that combine several figures per run."""
    if not runs:
        return None
    if target.label.startswith("   of which fsync"):
        parts = []
        for call in ("fsync", "fdatasync", "msync", "sync_file_range"):
            values = [r["calls"][call] / r["n"] for r in runs if "calls" in r]
            if any(values):
                parts.append(f"{call} {_fmt(values, '', 1)}")
        return " / ".join(parts) or "none"
    if target.label.startswith("   daemon CPU / emulator"):
        daemon = [r["burst"]["cpu_s"] for r in runs if "burst" in r]
        emulator = [r["burst"].get("emulator_cpu_s") for r in runs if "burst" in r]
        return f"{_fmt(daemon, ' s', 1)} / {_fmt(emulator, ' s', 1)}"
    if target.label.startswith("   wall (ideal"):
        walls = [r.get("burst", {}).get("wall_s") for r in runs]
        return f"{_fmt(walls, ' s', 2)} ({runs[0]['ideal_s'] + runs[0]['settle_s']:.2f} s)"
    if target.label.startswith("   every file done once"):
        bits = [
            (r["burst"]["done"], r["burst"]["failed"], r["burst"]["duplicate_uploads"], r["burst"]["wrong_results"])
            for r in runs
            if "burst" in r
        ]
        sound = all(b[1] == 0 and b[2] == 0 and b[3] == 0 for b in bits)
        done = _fmt([b[0] for b in bits], "", 0)
        return f"{done} done, {'0 failed, 0 dup. uploads, 0 wrong' if sound else 'NOT all sound: ' + repr(bits)}"
    if target.label.startswith("   uploads/s while"):
        during = [r.get("rate_while_journaling") for r in runs]
        steady = [r.get("rate_steady") for r in runs]
        return f"{_fmt(during, '', 1)} / {_fmt(steady, '', 1)}"
    if target.label.startswith("   first upload"):
        first = [r.get("first_upload_s") for r in runs]
        rss = [r.get("memory_kib", {}).get("VmHWM", 0) / MIB for r in runs]
        return f"{_fmt(first, ' s', 1)} / {_fmt(rss, ' MiB', 0)}"
    return None


def _cell(target: Target, runs: Runs | None, note: str = "") -> str:
    if runs is None:
        return note or "not run"
    special = _special(target, runs)
    if special is not None:
        return special
    return _fmt([target.get(r) for r in runs], target.unit, target.digits)


def _scenario_label(target: Target, figures: dict[str, Any]) -> str:
    """The row's label with the run's own sizes (a --quick run is smaller)."""
    runs = (figures.get("after") or {}).get(target.scenario) or (figures.get("before") or {}).get(target.scenario)
    if not runs:
        return target.label
    run = runs[0]
    label = target.label
    if target.scenario == "burst" and "n" in run:
        label = label.replace("100 files", f"{run['n']} files").replace("100-file", f"{run['n']}-file")
    if target.scenario in ("scale16", "scale32") and "n" in run:
        label = label.replace("1,000 files", f"{run['n']:,} files")
    if target.scenario == "backlog":
        label = label.replace("backlog at start-up", f"backlog of {run['n']:,} files at start-up")
    if target.scenario == "idle_polling":
        label = label.replace("files waiting", f"{run['n']:,} files waiting").replace(
            "in done/", f"{run.get('in_done', 0):,} in done/"
        )
    if target.scenario == "reconcile":
        label = label.replace("50,000", f"{run['seeded']:,}")
    if target.scenario == "fsync":
        label = label.replace("in the burst", f"in a {run['n']}-file burst")
    return label


def target_rows(figures: dict[str, Any], before_notes: dict[str, str]) -> list[tuple[str, ...]]:
    has_before = "before" in figures
    rows = []
    for target in TARGETS:
        after = (figures.get("after") or {}).get(target.scenario)
        before = (figures.get("before") or {}).get(target.scenario) if has_before else None
        if after is None and before is None:
            continue
        row = [_scenario_label(target, figures)]
        if has_before:
            row.append(_cell(target, before, before_notes.get(target.scenario, "")))
        row += [
            _cell(target, after),
            _limit_text(target),
            _met([target.get(r) for r in after], target) if after else "",
        ]
        rows.append(tuple(row))
    return rows


def target_header(figures: dict[str, Any]) -> tuple[str, ...]:
    if "before" in figures:
        return ("metric", f"before ({figures.get('before_label', 'before')})", "after (this branch)", "target", "met?")
    return ("metric", "measured", "target", "met?")


# -- poll-only mode and result outputs -----------------------------------------------------------------


def _requests_per_file(run: dict[str, Any]) -> tuple[float, float, float, str]:
    """(requests, KiB received by the daemon, KiB sent by it) per file, and requests by kind."""
    n = run["n"]
    stats = run.get("requests", {})
    count = sum(s["count"] for s in stats.values())
    sent = sum(s["bytes_sent"] for s in stats.values())  # by the emulator: what the daemon received
    received = sum(s["bytes_received"] for s in stats.values())
    kinds = ", ".join(f"{kind} {s['count'] / n:.2g}" for kind, s in sorted(stats.items()) if s["count"])
    return count / n, sent / n / 1024, received / n / 1024, kinds


def extra_rows(figures: dict[str, Any]) -> list[tuple[str, ...]]:
    after = figures.get("after") or {}
    rows: list[tuple[str, ...]] = []
    modes = [("callbacks (the burst above)", after.get("burst"))]
    modes += [
        (f"poll-only, first_poll_seconds {key.split('_')[-1]}", runs)
        for key, runs in sorted(after.items())
        if key.startswith("pollonly_")
    ]
    modes += [
        (f"results.outputs: {key[len('outputs_') :]}", runs)
        for key, runs in after.items()
        if key.startswith("outputs_")
    ]
    for label, runs in modes:
        if not runs:
            continue
        per = [_requests_per_file(r) for r in runs]
        walls = [r["burst"]["wall_s"] for r in runs]
        ratio = [_ratio_to_ideal_settle(r) for r in runs]
        cpu = [r["burst"]["cpu_per_file_ms"] for r in runs]
        rows.append(
            (
                f"{label} ({runs[0]['n']} files, settle {runs[0]['settle_s']:g} s)",
                f"{_fmt(walls, ' s', 2)} ({_fmt(ratio, ' x', 2)})",
                _fmt([p[0] for p in per], "", 1),
                f"{_fmt([p[1] for p in per], '', 1)} / {_fmt([p[2] for p in per], '', 1)}",
                _fmt(cpu, " ms", 1),
                per[0][3],
            )
        )
    return rows


EXTRA_HEADER = (
    "mode (after)",
    "wall (/ ideal+settle)",
    "API requests per file",
    "KiB in / out per file",
    "daemon CPU per file",
    "requests per file by kind",
)


def markdown_table(header: tuple[str, ...], table: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in table]
    return "\n".join(lines)


def methods(figures: dict[str, Any]) -> list[str]:
    """How each figure was taken, printed under the tables."""
    return [
        "Method:",
        "- Emulator (every scenario): upload latency 0.25 s, processing 2 s + uniform jitter 0..1 s, in the bench "
        "process, a fresh one per run; the daemon is `konfuzio-watch run` in its own process. `before` runs the "
        "same scenarios with the checkout given by --before first on PYTHONPATH (same venv, same emulator).",
        "- ideal = N x upload latency / concurrency + max processing (3 s); the ratios divide the wall time by "
        "ideal + watch.settle_seconds (no file may be taken before it has been stable that long).",
        "- Burst: N one-page PDFs written to a staging folder, renamed into the inbox (t0 = first rename); wall = "
        "newest mtime among the N JSONs - t0. CPU = utime+stime of the daemon (all threads, /proc/<pid>/stat) from "
        "just before the drop until the last result; emulator+bench CPU = this process's over the same span.",
        "- fsync: a separate run of the same burst with the daemon under `strace -f --seccomp-bpf -ttt -e "
        "trace=fsync,fdatasync,msync,sync_file_range`; calls stamped between the drop and the last result / N.",
        "- Memory: 4 PDFs of 100 MB (10 MB) padded with comment lines, dropped at once, concurrency 4, settle 0.5 s; "
        "VmHWM of the daemon at the end (also sampled every 50 ms).",
        "- Reconciliation: emulator seeded with 50,000 done documents; 4 files dropped; the emulator stores each "
        "upload and holds its answer back 30 s; the daemon is killed (SIGKILL) once all 4 are stored, restarted, "
        "and the list requests are counted until the 4 are in done/.",
        "- Backlog: N small PDFs in the inbox before the daemon starts; processing 3600 s so all stay pending; "
        "journal progress by SELECT COUNT(*) on a read-only connection every 0.1 s; upload rates from the "
        "emulator's arrival times: first upload -> all journaled, then 10 s (quick: 5 s) after.",
        "- Polling idle: watch.polling (poll_interval 5 s), done/ and failed/ inside the inbox with N files in "
        "done/; N files in the inbox at start, claimed into the processing folder (default place), where they "
        "wait: their uploads hang at the emulator (latency 3600 s), so 4 are in flight; CPU over the window.",
        "- venv: `make VENV=<fresh dir> <fresh dir>/.installed` from each checkout's own Makefile, then du -sk, "
        "shown as `du -sh` does (and `make` prints): whole MiB, rounded up.",
        "- Floor (bench/floor.py, its own process, the burst's emulator): per file only the token armed durably, "
        "the streamed upload, the callback through Waitress and the callback app, the details, annotations and "
        "boxes, the final path recorded durably, the result JSON written and fsynced, the file linked into done/ "
        "and done/ fsynced; 4 upload and 2 result threads. No watching, settling, sniffing, hashing, scheduling "
        "loop, logging or rich result. CPU = its own utime+stime over the N files. A third run sends the same requests "
        "on bare http.client (one kept-alive connection per thread): the floor without requests and urllib3.",
        "- Poll-only / outputs: the burst with callback.enabled false (results.first_poll_seconds as given), or "
        "with results.outputs / results.bbox as given; requests and bytes from the emulator's request_stats().",
    ]
