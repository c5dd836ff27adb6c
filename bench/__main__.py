"""python -m bench [--quick] [--idle-seconds S] [--json PATH] [--profile DIR]

Runs, in this order, each against its own emulator with realistic knobs:
  daemon (settle 2 s): latency probes, a burst of N files, an idle window;
  daemon (settle 0.5 s): latency probes and the same burst;
  Konfuzio's tutorial flow on the same N files;
  a backlog of 10 000 files present at start-up.
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
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from . import profiles, report, scenarios  # noqa: E402
from .harness import PROFILE_RATE_HZ, machine_info  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: N=20, 10 s idle, backlog of 1000")
    parser.add_argument("-n", "--files", type=int, help="documents per burst (default 100; quick: 20)")
    parser.add_argument("--idle-seconds", type=float, help="idle window (default 60; quick: 10)")
    parser.add_argument("--backlog", type=int, help="files present at start-up (default 10000; quick: 1000)")
    parser.add_argument("--concurrency", type=int, default=4, help="upload.concurrency (default 4)")
    parser.add_argument("--settle", type=float, default=2.0, help="watch.settle_seconds of the main run (default 2)")
    parser.add_argument("--fast-settle", type=float, default=0.5,
                        help="settle_seconds of the second run; 0 skips it (default 0.5)")
    parser.add_argument("--skip", action="append", default=[], choices=("tutorial", "backlog", "fast"),
                        help="leave a scenario out (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="save the raw figures here")
    parser.add_argument("--profile", metavar="DIR", help="record the daemons with py-spy into DIR")
    parser.add_argument("--workdir", help="work here instead of a temporary folder (kept afterwards)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n = args.files or (20 if args.quick else 100)
    idle_s = args.idle_seconds if args.idle_seconds is not None else (10.0 if args.quick else 60.0)
    backlog_n = args.backlog or (1000 if args.quick else 10_000)
    profile_dir = Path(args.profile).absolute() if args.profile else None
    root = Path(args.workdir).absolute() if args.workdir else Path(tempfile.mkdtemp(prefix="konfuzio-watch-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    figures: dict[str, Any] = {"machine": machine_info(root), "errors": {}}

    def step(key: str, what: str, run: Callable[[], dict[str, Any]]) -> None:
        print(f"bench: {what} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            figures[key] = run()
        except Exception as exc:  # one broken scenario must not hide the others' figures
            figures["errors"][key] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"bench: {what}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)

    try:
        step("daemon", f"daemon, settle {args.settle:g} s: latency probes, {n} files, {idle_s:g} s idle",
             lambda: scenarios.daemon_run(root, name="daemon", n=n, settle_s=args.settle,
                                          concurrency=args.concurrency, idle_s=idle_s, latency_files=10,
                                          profile_dir=profile_dir))
        if args.fast_settle and "fast" not in args.skip:
            step("daemon_settle_fast", f"daemon, settle {args.fast_settle:g} s: latency probes, {n} files",
                 lambda: scenarios.daemon_run(root, name="daemon-fast", n=n, settle_s=args.fast_settle,
                                              concurrency=args.concurrency, idle_s=0, latency_files=5,
                                              profile_dir=profile_dir))
        if "tutorial" not in args.skip:
            step("tutorial", f"Konfuzio tutorial flow, {n} files", lambda: scenarios.tutorial_run(root, n=n))
        if "backlog" not in args.skip:
            step("backlog", f"backlog of {backlog_n} files at start-up",
                 lambda: scenarios.backlog_run(root, n=backlog_n, profile_dir=profile_dir))
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
    print(f"\nkonfuzio-watch benchmark — {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, "
          f"Linux {m['kernel']}, work folder on {m['workdir_fs']}\n")
    print(report.markdown_table(report.rows(figures)))
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
