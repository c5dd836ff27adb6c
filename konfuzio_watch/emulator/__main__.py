"""Serve the Konfuzio API emulator until SIGINT/SIGTERM; prints its URL on the first line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading

from konfuzio_watch.emulator.control import endpoints_help
from konfuzio_watch.emulator.core import Emulator
from konfuzio_watch.emulator.faults import FaultRule
from konfuzio_watch.emulator.knobs import Knobs

KNOB_HELP = {
    "upload_latency_s": "sleep in the upload POST before storing",
    "processing_s": "OCR + extraction time per document",
    "processing_jitter_s": "uniform extra processing time, 0..J",
    "callback_loss": "probability a callback is never sent",
    "callback_duplicate": "probability a callback is sent twice",
    "early_callback": "send the callback before the upload's 201 is written",
    "fail_rate": "probability a document ends in status 111",
    "rate_429": "probability any API request answers 429",
    "retry_after_s": "Retry-After of the 429s: seconds, or any string sent verbatim (an HTTP date)",
    "rate_5xx": "probability any API request answers 502/503",
    "upload_500_rate": 'probability the upload handler fails before storing: 500 {"detail": "Server Error"}',
    "outage": "every API request answers 503",
    "stall_after_store_s": "sleep after storing an upload, before answering",
    "callback_timeout_s": "timeout of the callback POSTs",
    "split_rate": "probability a document waits in status 41 for POST /emulator/documents/<id>/confirm-split",
    "uncategorized_share": "share of files (chosen by sha256) that get no category",
    "fault_rules": "repeatable JSON FaultRule, e.g. "
    '\'{"method": "GET", "path": "/bbox/?$", "status": 401, "count": 3}\'',
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m konfuzio_watch.emulator",
        description=__doc__,
        epilog=endpoints_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--token", default="secret-token", help="the API token clients must send")
    parser.add_argument("--project", type=int, action="append", dest="projects", help="repeatable; default 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=16)
    for field in dataclasses.fields(Knobs):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "fault_rules":
            parser.add_argument(
                "--fault-rule",
                dest="fault_rules",
                action="append",
                default=[],
                type=_fault_rule,
                help=KNOB_HELP[field.name],
            )
        elif field.name == "retry_after_s":
            parser.add_argument(flag, type=_int_or_str, default=field.default, help=KNOB_HELP[field.name])
        elif field.type in (bool, "bool"):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=field.default, help=KNOB_HELP[field.name]
            )
        else:
            kind = int if field.type in (int, "int") else float
            help_text = f"{KNOB_HELP[field.name]} (default {field.default})"
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)
    return parser


def _fault_rule(raw: str) -> FaultRule:
    try:
        return FaultRule.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"not a fault rule: {exc}") from exc


def _int_or_str(raw: str) -> int | str:
    return int(raw) if raw.strip().isdigit() else raw


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    knobs = Knobs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Knobs)})
    emu = Emulator(token=args.token, project_ids=tuple(args.projects or [1]), knobs=knobs, seed=args.seed)
    try:
        emu.start(args.host, args.port, threads=args.threads)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(emu.url, flush=True)
    try:
        stop.wait()
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
