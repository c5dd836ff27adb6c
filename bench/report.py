"""Turn the raw figures into the markdown table: metric | measured | target | ok?"""

from __future__ import annotations

from typing import Any

MIB = 1024

Row = tuple[str, str, str, str]


def _ok(value: float | None, limit: float, at_most: bool = True) -> str:
    """"yes" if ``value`` is within ``limit`` (at most, or at least)."""
    if value is None:
        return "NO (no figure)"
    return "yes" if (value <= limit if at_most else value >= limit) else "**NO**"


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f} s"


def rows(figures: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    main = figures.get("daemon")
    fast = figures.get("daemon_settle_fast")
    tutorial = figures.get("tutorial")
    backlog = figures.get("backlog")
    for run in (main, fast):
        if not run or "burst" not in run:
            continue
        burst, ideal, settle = run["burst"], run["ideal_s"], run["settle_s"]
        label = f"{run['n']} docs, concurrency {run['concurrency']}, settle {settle:g} s"
        wall = burst["wall_s"]
        out.append((f"1. wall, first drop -> last JSON ({label})", _s(wall),
                    f"<= {1.15 * ideal:.2f} s (1.15 x ideal {ideal:.2f} s)", _ok(wall, 1.15 * ideal)))
        ratio = None if wall is None else wall / ideal
        out.append(("   ratio to ideal (N x upload latency / concurrency + max processing)",
                    "—" if ratio is None else f"{ratio:.2f}", "<= 1.15", _ok(ratio, 1.15)))
        with_settle = ideal + settle
        ratio_settle = None if wall is None else wall / with_settle
        out.append((f"   ratio to ideal + settle_seconds ({with_settle:.2f} s)",
                    "—" if ratio_settle is None else f"{ratio_settle:.2f}", "(info)", ""))
        out.append(("   first upload after the drop / last upload", f"{_s(burst['first_upload_s'])} / "
                    f"{_s(burst['last_upload_s'])}", "(info)", ""))
        sound = burst["failed"] == 0 and burst["wrong_results"] == 0 and burst["duplicate_uploads"] == 0
        out.append(("   every file done once, with its own result",
                    f"{burst['done']} done, {burst['failed']} failed, {burst['duplicate_uploads']} dup. uploads, "
                    f"{burst['wrong_results']} wrong", "all done, 0, 0", "yes" if sound else "**NO**"))
    if tutorial and main and "burst" in main:
        out.append((f"2. Konfuzio tutorial flow, same {tutorial['n']} files, identical emulator",
                    _s(tutorial["wall_s"]), "(baseline)", ""))
        out.append(("   of which Project(id_=...) / the serial from_file loop",
                    f"{_s(tutorial['project_s'])} / {_s(tutorial['uploads_s'])}", "(info)", ""))
        wall = main["burst"]["wall_s"]
        speedup = None if not wall else tutorial["wall_s"] / wall
        out.append((f"   daemon speed-up (tutorial wall / daemon wall, settle {main['settle_s']:g} s)",
                    "—" if speedup is None else f"{speedup:.2f} x", ">= 2.5 x", _ok(speedup, 2.5, at_most=False)))
        if fast and "burst" in fast and fast["burst"]["wall_s"]:
            speedup = tutorial["wall_s"] / fast["burst"]["wall_s"]
            out.append((f"   daemon speed-up (settle {fast['settle_s']:g} s)", f"{speedup:.2f} x", ">= 2.5 x",
                        _ok(speedup, 2.5, at_most=False)))
        out.append(("   tutorial process CPU per file", f"{tutorial['cpu_s'] / tutorial['n'] * 1000:.1f} ms", "(info)",
                    ""))
    if main and "burst" in main:
        burst = main["burst"]
        per_file = burst["cpu_per_file_ms"]
        split = ""
        if "cpu_user_s" in burst:
            n = main["n"]
            split = f" ({burst['cpu_user_s'] / n * 1000:.1f} user + {burst['cpu_system_s'] / n * 1000:.1f} system)"
        out.append(("3. daemon CPU per file (utime+stime during the burst / N)", f"{per_file:.1f} ms{split}",
                    "<= 10 ms", _ok(per_file, 10)))
        hwm = main.get("memory_kib", {}).get("VmHWM")
        out.append(("   daemon peak RSS (VmHWM, whole run)", "—" if hwm is None else f"{hwm / MIB:.1f} MiB",
                    "<= 150 MiB", _ok(hwm, 150 * MIB)))
    if main and "idle" in main:
        idle = main["idle"]
        out.append((f"   daemon idle CPU over {idle['window_s']:.0f} s", f"{idle['cpu_percent']:.3f} %", "< 0.2 %",
                    _ok(idle["cpu_percent"], 0.2 - 1e-9)))
    for run in (main, fast):
        if run and "latency" in run:
            lat = run["latency"]
            out.append((f"4. stable -> upload start beyond settle ({run['settle_s']:g} s), {lat['count']} probes",
                        f"median {lat['median_s']:.3f} s, max {lat['max_s']:.3f} s", "<= 0.2 s",
                        _ok(lat["max_s"], 0.2)))
    if backlog:
        n = backlog["n"]
        out.append((f"5. backlog of {n} files at start-up: all journaled", _s(backlog.get("journaled_s")),
                    "<= 30 s", _ok(backlog.get("journaled_s"), 30)))
        out.append(("   first upload (from the daemon's exec)", _s(backlog.get("first_upload_s")), "<= 30 s",
                    _ok(backlog.get("first_upload_s"), 30)))
        hwm = backlog.get("memory_kib", {}).get("VmHWM")
        out.append((f"   peak RSS with {n} pending (VmHWM)", "—" if hwm is None else f"{hwm / MIB:.1f} MiB",
                    "<= 150 MiB", _ok(hwm, 150 * MIB)))
        if "cpu_at_journaled_s" in backlog:
            out.append(("   daemon CPU from exec until all journaled", _s(backlog["cpu_at_journaled_s"]), "(info)", ""))
        out.append(("   daemon start-up to 'ready:' / shutdown with the backlog pending",
                    f"{_s(backlog.get('ready_s'))} / {_s(backlog.get('stop', {}).get('stop_s'))}", "(info)", ""))
    return out


def markdown_table(table: list[Row]) -> str:
    header = ("metric", "measured", "target", "ok?")
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(4)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in table]
    return "\n".join(lines)


def methods(figures: dict[str, Any]) -> list[str]:
    """How each figure was taken, printed under the table."""
    return [
        "Method:",
        "- Emulator knobs (every scenario): upload latency 0.25 s, processing 2 s + uniform jitter 0..1 s; "
        "a fresh Emulator per scenario, in the bench process; the daemon is `konfuzio-watch run` in its own process.",
        "- 1: N one-page PDFs are written to a staging folder on the inbox's disk, then renamed into the inbox "
        "one after the other (t0 = first rename); wall = newest mtime among the N JSONs in done/ - t0.",
        "- 2: bench/tutorial_flow.py (the tutorial's code: Project(id_), a serial Document.from_file(sync=False, "
        "callback_url) loop, a Flask callback, a thread per document calling update()) in a subprocess against a "
        "fresh emulator; wall = Project() -> last update() returned (SDK import excluded, like the daemon's start-up).",
        "- 3: utime+stime from /proc/<pid>/stat (all threads; resolution 1/CLK_TCK) just before the drop and when "
        "the last result appeared; VmHWM from /proc/<pid>/status; idle = CPU over the window after the last file "
        "finished, with no active journal rows.",
        "- 4: files written in place in two chunks 50 ms apart, one every 0.4 s (no queueing); delay = time the "
        "upload request reached the emulator (UploadRecord.arrived_at, before its latency sleep) - file mtime "
        "(last write; ext4 timestamps are jiffy-coarse, a few ms) - settle_seconds.",
        "- 5: N small PDFs in the inbox before the daemon starts; emulator processing 3600 s so every file stays "
        "pending; progress = SELECT COUNT(*) FROM files on a read-only connection every 0.1 s; times from the "
        "daemon's exec; first upload = earliest arrived_at at the emulator.",
    ]
