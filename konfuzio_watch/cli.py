"""Command line: ``konfuzio-watch run|check|status|retry|redeliver|demo|install-files``. Maps errors to
exit codes; no logic."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from . import __version__
from .config import Config, ConfigError, load_config
from .journal import JournalError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
DEFAULT_CONFIG = "/etc/konfuzio-watch/config.yaml"
DESCRIPTION = """\
Watch a folder and send every file dropped into it through Konfuzio: the original lands in
done/ next to <name>.json with its OCR result, or in failed/ next to <name>.error.json."""
EPILOG = f"""\
--config defaults to $KONFUZIO_WATCH_CONFIG, else {DEFAULT_CONFIG}.
Try it without an account: konfuzio-watch demo. Help on a command: konfuzio-watch COMMAND --help.

exit codes:
  0    success
  1    failure: check found a problem, the daemon could not start (e.g. another one runs on
       the same state folder or inbox) or stopped because another one took its inbox, status
       cannot read the journal, a file to retry was not found, the demo did not finish,
       install-files left something to do
  2    usage or configuration error (one line on stderr names it)
  130  interrupted (Ctrl-C)"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, JournalError) as exc:
        print(f"konfuzio-watch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `konfuzio-watch status | head -1`: the reader has all it wanted
        _silence_stdout()
        return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="konfuzio-watch",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    _config_arg(run)
    run.add_argument("--log-format", choices=("human", "json"), default="human")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate the config, the folders and the API access")
    _config_arg(check)
    check.add_argument(
        "--as",
        dest="as_user",
        metavar="USER",
        help="judge the folders for this user (a name or uid; trying writes as another user needs "
        "root). Default, as root: the user konfuzio-watch last ran as (its daemon.lock), else "
        "the system user konfuzio-watch if there is one; otherwise: you",
    )
    check.set_defaults(func=cmd_check)

    status = sub.add_parser("status", help="where every file is")
    _config_arg(status)
    status.add_argument("--all", action="store_true", help="list finished files too")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    status.set_defaults(func=cmd_status)

    retry = sub.add_parser("retry", help="put failed files back through the pipeline")
    _config_arg(retry)
    retry.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="a file in failed/ (or its path relative to the inbox); a pending file is retried now",
    )
    retry.add_argument("--all-failed", action="store_true", help="every file in failed/")
    retry.set_defaults(func=cmd_retry)

    redeliver = sub.add_parser("redeliver", help="send deliveries to the next system again (deliver:)")
    _config_arg(redeliver)
    redeliver.add_argument(
        "paths", nargs="*", metavar="PATH", help="a placed file in done/ or failed/: its last delivery is sent again"
    )
    redeliver.add_argument("--all-failed", action="store_true", help="every delivery that failed")
    redeliver.set_defaults(func=cmd_redeliver)

    demo = sub.add_parser("demo", help="the real pipeline against the built-in Konfuzio emulator")
    demo.add_argument("--files", type=int, default=8, help="how many sample documents to drop")
    demo.add_argument("--workdir", help="keep the demo's folders here (default: a temporary folder)")
    demo.set_defaults(func=cmd_demo)

    install = sub.add_parser("install-files", help="install the systemd unit, its user and an example config")
    install.add_argument("--prefix", default="/", help="install under this root (default: /)")
    install.add_argument(
        "--force", action="store_true", help="replace a unit or sysusers.d file that differs (never the config)"
    )
    install.set_defaults(func=cmd_install_files)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    from_env = os.environ.get("KONFUZIO_WATCH_CONFIG")
    default = f"{from_env}, from $KONFUZIO_WATCH_CONFIG" if from_env else DEFAULT_CONFIG
    parser.add_argument(
        "--config", "-c", default=from_env or DEFAULT_CONFIG, help=f"path to config.yaml (default: {default})"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon
    from .journal import JournalWriteError
    from .lock_file import LockHeld
    from .logs import configure_logging
    from .sdnotify import Notifier
    from .tunnel import TunnelError

    config = load_config(args.config)
    configure_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    # The worker threads mostly wait on sockets and disks and need the interpreter only briefly after
    # each wait; while the loop thread claims a large backlog they would queue for it up to the
    # default switch interval each time, which slowed the uploads down (docs/performance.md). A short
    # interval keeps them going at a small cost.
    sys.setswitchinterval(0.001)
    daemon = Daemon(config, notifier=Notifier.from_env(), config_path=str(args.config))
    stops = 0

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            logging.getLogger("konfuzio_watch").warning("second signal: exiting now; the journal keeps the state")
            os._exit(EXIT_FAILURE)
        daemon.request_stop()

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("konfuzio_watch").warning(
            "SIGHUP: the API token is tried again now; the rest of the configuration is not reloaded while "
            "running: restart the service to apply changes"
        )
        daemon.hangup()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        daemon.start()
    except LockHeld as exc:
        print(f"konfuzio-watch: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, TunnelError, JournalWriteError) as exc:
        print(f"konfuzio-watch: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    clean = daemon.run()
    # Another daemon took the inbox's marker (or the processing folder's lock) while this one ran: it
    # stopped, and says so to systemd, which restarts it (Restart=on-failure) to refuse until that one stops.
    code = EXIT_FAILURE if daemon.lost_lock else EXIT_OK
    if not clean:
        # Steps were cut off after service.stop_timeout_seconds; their worker threads are stuck in
        # a call that would hold the interpreter's exit. The journal has every committed state.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_check(args: argparse.Namespace) -> int:
    from .checks import run_checks

    config = load_config(args.config)
    problems = run_checks(config, out=sys.stdout, as_user=args.as_user)
    return EXIT_FAILURE if problems else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from .status import StatusError, print_status, watch_status

    config: Config = load_config(args.config, need_secrets=False)
    try:
        if args.watch is None:
            print_status(config, show_all=args.all, now=time.time(), out=sys.stdout)
        else:
            watch_status(config, show_all=args.all, interval_s=max(0.2, args.watch), out=sys.stdout)
        sys.stdout.flush()  # a closed pipe shows here, where main() handles it
    except StatusError as exc:
        sys.stdout.flush()
        print(f"konfuzio-watch: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from .retry import retry_files

    return _again(args, "retry", "name files to retry", retry_files)


def cmd_redeliver(args: argparse.Namespace) -> int:
    from .redeliver import redeliver

    return _again(args, "redeliver", "name placed files", redeliver)


def _again(args: argparse.Namespace, command: str, what: str, act: Callable[..., tuple[list[str], int]]) -> int:
    """``retry`` and ``redeliver``: the named files (or every failed one) through ``act``, one line each;
    exit 1 if a named file matched nothing."""
    from .journal import JournalWriteError

    if not args.paths and not args.all_failed:
        print(f"konfuzio-watch: {command}: {what}, or --all-failed", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args.config, need_secrets=False)
    try:
        messages, unmatched = act(config, args.paths, args.all_failed, now=time.time())
    except JournalWriteError as exc:  # a database that cannot be reached
        print(f"konfuzio-watch: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for message in messages:
        print(message)
    return EXIT_FAILURE if unmatched else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(files=args.files, workdir=args.workdir)


def cmd_install_files(args: argparse.Namespace) -> int:
    from .install import install_files, next_steps

    try:
        problems = install_files(args.prefix, out=sys.stdout, force=args.force)
    except OSError as exc:
        print(f"konfuzio-watch: install-files: {exc.strerror or exc}: {exc.filename or args.prefix}", file=sys.stderr)
        return EXIT_FAILURE
    for problem in problems:
        print(f"konfuzio-watch: {problem}", file=sys.stderr)
    if not problems:
        print(next_steps())
    return EXIT_FAILURE if problems else EXIT_OK
