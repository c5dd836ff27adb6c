"""python -m bench [--quick] [--before DIR] [--runs N] [--only NAME] [--skip NAME] [--json PATH] [--profile DIR]

Runs each scenario against its own emulator with realistic knobs (0.25 s per upload, 2-3 s
processing), with this checkout's daemon and, with --before DIR, with the daemon of another
checkout (e.g. `git worktree add --detach DIR be7dd22`), and prints both side by side:

  burst         latency probes, a burst of N files (100) at concurrency 4, settle 2 s, an idle window
  fsync         the same burst with the daemon under strace: fsync-class calls per file
  scale16/32    1,000 files at concurrency 16 and 32
  backlog       100,000 files present at start-up: journaling time, upload rate meanwhile
  memory        4 x 100 MB files in flight (and 4 x 10 MB: memory must not grow with file size)
  reconcile     a crash with uploads stored but unanswered, in a project of 50,000 documents
  idle_polling  polling mode, idle, with 20,000 files waiting in processing/ and 20,000 in done/
  pollonly      the burst without callbacks (after only: the code before has no poll-only mode)
  outputs       the burst with each results.outputs / results.bbox (after only)
  deliver       the burst with a webhook (deliver:) and without, interleaved: CPU, walls, deliveries per key
  floor         the burst's API calls, callback and durable writes alone, without the daemon (after only)
  venv          the size of a fresh `make test` virtualenv (not in --quick)
  tutorial      Konfuzio's tutorial flow on the burst's files (only with --only tutorial)
  page          the status page: its size with 1,000 failed and 1,000 waiting files; the burst's CPU
                with the page kept open against without, interleaved (only with --only page)
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("LOG_TO_FILE", "False")  # before anything imports konfuzio_sdk

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from . import deliver, page, profiles, report, scenarios  # noqa: E402
from .harness import PROFILE_RATE_HZ, machine_info  # noqa: E402

ALL = (
    "burst",
    "fsync",
    "floor",
    "scale16",
    "scale32",
    "backlog",
    "memory",
    "reconcile",
    "idle_polling",
    "pollonly",
    "outputs",
    "deliver",
    "venv",
    "tutorial",
    "page",
)
DEFAULT_SKIP = {"tutorial", "page"}
QUICK_SKIP = {"tutorial", "venv", "page"}
AFTER_ONLY = {
    "pollonly": "no poll-only mode",
    "outputs": "no results.outputs",
    "deliver": "no deliver section",
    "tutorial": "not compared",
    "floor": "not compared",
    "page": "not compared",
}
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    burst: int
    idle_s: float
    latency_files: int
    scale: int
    backlog: int
    steady_s: float
    seeded: int
    idle_files: int
    idle_window_s: float
    outputs: int


FULL = Sizes(
    burst=100,
    idle_s=60,
    latency_files=10,
    scale=1000,
    backlog=100_000,
    steady_s=10,
    seeded=50_000,
    idle_files=20_000,
    idle_window_s=60,
    outputs=50,
)
QUICK = Sizes(
    burst=30,
    idle_s=5,
    latency_files=3,
    scale=300,
    backlog=10_000,
    steady_s=5,
    seeded=50_000,
    idle_files=2_000,
    idle_window_s=10,
    outputs=20,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, no venv build: a smoke run")
    parser.add_argument("--before", metavar="DIR", help="a checkout of the code to compare with (PYTHONPATH)")
    parser.add_argument("--before-label", default="be7dd22", help="its name in the table (default be7dd22)")
    parser.add_argument("--runs", type=int, help="runs of each scenario; figures are ranges (default 2; quick 1)")
    parser.add_argument("-n", "--files", type=int, help="documents per burst (default 100; quick: 30)")
    parser.add_argument("--only", action="append", default=[], choices=ALL, help="run only these (repeatable)")
    parser.add_argument("--skip", action="append", default=[], choices=ALL, help="leave these out (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="save the raw figures here")
    parser.add_argument("--profile", metavar="DIR", help="record this checkout's daemons with py-spy into DIR")
    parser.add_argument("--workdir", help="work here instead of a temporary folder (kept afterwards)")
    return parser


def plan(sizes: Sizes, n: int, profile_dir: Path | None) -> dict[str, Callable[[Path, Path | None], Any]]:
    """scenario name -> run(root, code) for every scenario; a scenario may give several keys."""
    s = sizes

    def burst(root: Path, code: Path | None) -> dict[str, Any]:
        return scenarios.daemon_run(
            root,
            name="burst",
            n=n,
            settle_s=2.0,
            concurrency=4,
            idle_s=s.idle_s,
            latency_files=s.latency_files,
            profile_dir=None if code else profile_dir,
            code=code,
        )

    def scale(concurrency: int) -> Callable[[Path, Path | None], Any]:
        def run(root: Path, code: Path | None) -> dict[str, Any]:
            return scenarios.daemon_run(
                root,
                name=f"scale{concurrency}",
                n=s.scale,
                settle_s=2.0,
                concurrency=concurrency,
                idle_s=0,
                latency_files=0,
                code=code,
                profile_dir=None if code else profile_dir,
                emulator_threads=concurrency + 16,
                timeout_s=300,
                extra={"results": {"workers": 4}},
            )

        return run

    return {
        "burst": burst,
        "fsync": lambda root, code: scenarios.fsync_run(root, n=n, code=code),
        "floor": lambda root, code: scenarios.floor_run(root, n=n),
        "scale16": scale(16),
        "scale32": scale(32),
        "backlog": lambda root, code: scenarios.backlog_run(
            root, n=s.backlog, steady_s=s.steady_s, code=code, profile_dir=None if code else profile_dir
        ),
        "memory": lambda root, code: scenarios.memory_run(root, size_mb=100, code=code),
        "memory_small": lambda root, code: scenarios.memory_run(root, size_mb=10, code=code),
        "reconcile": lambda root, code: scenarios.reconcile_run(root, seeded=s.seeded, code=code),
        "idle_polling": lambda root, code: scenarios.idle_polling_run(
            root, n=s.idle_files, window_s=s.idle_window_s, code=code
        ),
        "pollonly_5s": lambda root, code: scenarios.pollonly_run(root, n=n, first_poll_s=5.0),
        "pollonly_2s": lambda root, code: scenarios.pollonly_run(root, n=n, first_poll_s=2.0),
        **{
            f"outputs_{which}": (lambda w: lambda root, code: scenarios.outputs_run(root, n=s.outputs, which=w))(which)
            for which in scenarios.OUTPUTS
        },
        **{
            f"deliver_{mode}": (lambda m: lambda root, code: deliver.deliver_run(root, n=n, mode=m))(mode)
            for mode in deliver.MODES
        },
        "venv": lambda root, code: scenarios.venv_run(root, checkout=code or REPO),
        "tutorial": lambda root, code: scenarios.tutorial_run(root, n=n),
        "page_size": lambda root, code: page.size_run(root),
        "page_without": lambda root, code: page.burst_run(root, n=n, with_page=False),
        "page_with": lambda root, code: page.burst_run(root, n=n, with_page=True),
    }


def _scenario_of(key: str) -> str:
    return (
        "memory"
        if key == "memory_small"
        else key.split("_")[0]
        if key.startswith(("pollonly_", "outputs_", "deliver_", "page_"))
        else key
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    n = args.files or sizes.burst
    runs = args.runs or (1 if args.quick else 2)
    profile_dir = Path(args.profile).absolute() if args.profile else None
    before = Path(args.before).resolve() if args.before else None
    if before is not None and not (before / "konfuzio_watch").is_dir():
        print(f"bench: --before {before}: not a konfuzio-watch checkout", file=sys.stderr)
        return 2
    wanted = set(args.only) if args.only else set(ALL) - (QUICK_SKIP if args.quick else DEFAULT_SKIP)
    wanted -= set(args.skip)
    keys = [k for k in plan(sizes, n, profile_dir) if _scenario_of(k) in wanted]
    if args.quick and "memory_small" in keys:
        keys.remove("memory_small")
    root = Path(args.workdir).absolute() if args.workdir else Path(tempfile.mkdtemp(prefix="konfuzio-watch-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    figures: dict[str, Any] = {
        "machine": machine_info(root),
        "errors": {},
        "runs": runs,
        "quick": args.quick,
        "after": {},
    }
    if before is not None:
        figures["before"] = {}
        figures["before_label"] = args.before_label
    steps = plan(sizes, n, profile_dir)
    try:
        for run in range(1, runs + 1):
            for key in keys:
                sides: list[tuple[str, Path | None]] = [("after", None)]
                if before is not None and _scenario_of(key) not in AFTER_ONLY:
                    sides.append(("before", before))
                for side, code in sides:
                    what = f"{key} ({side}, run {run} of {runs})"
                    print(f"bench: {what} ...", file=sys.stderr, flush=True)
                    t = time.monotonic()
                    workdir = root / f"{side}-{run}"
                    try:
                        result = steps[key](workdir, code)
                        figures[side].setdefault(key, []).append(result)
                    except Exception as exc:  # one broken scenario must not hide the others' figures
                        figures["errors"][f"{key} ({side}, run {run})"] = f"{type(exc).__name__}: {exc}"
                        traceback.print_exc()
                    finally:
                        if not args.workdir:
                            shutil.rmtree(workdir, ignore_errors=True)
                    print(f"bench: {what}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    finally:
        figures["bench_s"] = time.monotonic() - started
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    _print(figures, profile_dir)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n")
    return 1 if figures["errors"] else 0


def _print(figures: dict[str, Any], profile_dir: Path | None) -> None:
    m = figures["machine"]
    runs = figures["runs"]
    print(
        f"\nkonfuzio-watch benchmark{' (--quick)' if figures['quick'] else ''} — {m['nproc']} CPUs ({m['cpu']}), "
        f"Python {m['python']}, Linux {m['kernel']}, work folder on {m['workdir_fs']}; "
        f"{runs} run(s) of each scenario: a cell is the range over them, 'met?' judges the worst\n"
    )
    notes = {scenario: f"n/a ({why})" for scenario, why in AFTER_ONLY.items()}
    targets = report.target_rows(figures, notes)
    if targets:  # (none for --only page or tutorial)
        print(report.markdown_table(report.target_header(figures), targets))
    extra = report.extra_rows(figures)
    if extra:
        print()
        print(report.markdown_table(report.EXTRA_HEADER, extra))
    for line in deliver.summary(figures):
        print(line)
    floor = [r for r in figures["after"].get("floor", []) if "segments_ms" in r]
    if floor:
        print(
            f"\nThe floor's steps, thread CPU per file ({len(floor)} run(s); with --segments, which costs a "
            "little itself):"
        )
        for step in floor[0]["segments_ms"]:
            values = [r["segments_ms"].get(step) for r in floor]
            print(f"  {step}: {report.fmt_range(values, ' ms', 2)}")
    tutorial = figures["after"].get("tutorial")
    if tutorial:
        walls = [t["wall_s"] for t in tutorial]
        print(f"\nKonfuzio tutorial flow, same {tutorial[0]['n']} files: {min(walls):.2f}-{max(walls):.2f} s")
    if any(key.startswith("page_") for key in figures["after"]):
        print("\nThe status page:\n" + "\n".join(page.summary(figures)))
    print()
    print("\n".join(report.methods(figures)))
    for key, error in figures["errors"].items():
        print(f"\nscenario {key} did not finish: {error}")
    if profile_dir is not None:
        print()
        print(profiles.summary(profile_dir, rate_hz=PROFILE_RATE_HZ))
    print(f"\nbenchmark run took {figures['bench_s']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
