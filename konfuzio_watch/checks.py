"""``konfuzio-watch check``: is this config good to run with? One line per check; every failing
line says what to do. It catches what ``run`` would reject, and what ``run`` would only suffer
from later (callbacks that can never arrive). The folders, and the files the daemon keeps in them,
are judged for the user the service runs as, which the first line names (``accounts.py``); the
ports of a konfuzio-watch running on this state folder are its own, and whether its callbacks
arrive is its answer (``reachability.CallbackVerdict``).

With a PostgreSQL journal (a node of a cluster) it also checks the server (reachable, the schema
current), that this machine's clock is within ``CLOCK_OFF_WARN_S`` of the server's, that no other
live node uses this node.id, that every live node sees the same inbox
(each node's marker file there holds what the journal says it wrote), and that the inbox is not a
single daemon's (a SQLite journal's: one inbox is one daemon's or one cluster's)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import TextIO

from . import accounts, processing
from .accounts import Account
from .checks_journal import (
    check_cluster,
    check_inbox_lock,
    check_journal,
    journal_meta,
    open_shared_journal,
    shared_meta,
)
from .checks_network import check_api, check_callbacks, check_monitor_port
from .config import Config, ConfigError
from .journal import BaseJournal
from .locks import DAEMON_LOCK_NAME, INBOX_LOCK_NAME
from .mounts import mount_of
from .watcher import plan_watching

Report = Callable[..., None]


def run_checks(config: Config, out: TextIO, as_user: str | None = None) -> list[str]:
    """Print one line per check; return the problems found. The folders are judged for the user the
    service runs as (``accounts.service_account``; ``as_user``: ``check --as``)."""
    problems: list[str] = []

    def report(ok: bool, what: str, detail: str = "", fix: str = "") -> None:
        line = f"{'ok  ' if ok else 'FAIL'}  {what}{': ' + detail if detail else ''}"
        if not ok and fix:
            line += f" -> {fix}"
        out.write(line + "\n")
        if not ok:
            problems.append(f"{what}: {detail}")

    def note(text: str) -> None:
        out.write(f"note  {text}\n")

    def warn(text: str) -> None:  # works, but not as well as it could: `run` says it too
        out.write(f"warn  {text}\n")

    account, why = accounts.service_account(config.folders.state, as_user)
    note(why)
    journal = open_shared_journal(config, report) if config.journal.url else None
    try:
        _check_folders(config, report, note, account, journal)
        _check_watcher(config, report, warn)
        if config.journal.url is None:
            check_journal(config, report)
        elif journal is not None:
            check_cluster(config, journal, report, note)
        check_inbox_lock(config, journal, report)
    finally:
        if journal is not None:
            journal.close()
    check_api(config, report)
    check_callbacks(config, report, note)
    check_monitor_port(config, report)
    if config.ngrok.enabled:
        path = config.ngrok.path
        usable = path.is_file() and os.access(path, os.X_OK)
        report(
            usable,
            "ngrok.path",
            str(path) if usable else f"{path} is missing or not executable",
            "install the ngrok agent there (it is never downloaded), or set ngrok.path",
        )
    _check_deliver(config, report)
    if config.alerts.urls or config.alerts.urls_file:
        from .alert_sending import check_urls

        try:
            report(True, "alerts", ", ".join(check_urls(config.alerts)))
        except ConfigError as exc:
            report(False, "alerts", str(exc), "fix alerts.urls (apprise URL syntax)")
    return problems


def _check_deliver(config: Config, report: Report) -> None:
    """The webhook's secret can be read (the daemon reads it at start); the command can be run."""
    d = config.deliver
    if d.webhook is not None:
        try:
            report(True, "deliver.webhook.secret_file", f"{len(d.secret())} bytes read (never shown)")
        except ConfigError as exc:
            report(False, "deliver.webhook.secret_file", str(exc).split(": ", 1)[-1], "make it readable by the service")
    if d.command:
        program = shutil.which(d.command[0])
        report(
            program is not None,
            "deliver.command",
            program or f"{d.command[0]} is not an executable program (no shell is used)",
            "give its full path, executable by the service",
        )


def _check_folders(
    config: Config, report: Report, note: Callable[[str], None], account: Account, journal: BaseJournal | None = None
) -> None:
    f = config.folders
    user = account.describe()
    keyed = [("folders.done", f.done), ("folders.failed", f.failed), ("folders.state", f.state)]
    if f.inbox.is_dir():
        keyed.insert(0, ("folders.inbox", f.inbox))
    else:
        report(False, "folders.inbox", f"{f.inbox} does not exist", f"create it: mkdir -p {f.inbox}")
    tried = accounts.try_writes(account, [(accounts.FOLDER, folder) for _, folder in keyed])
    as_other = "" if account.uid == os.geteuid() else f" (as {user})"
    for (key, folder), (ok, detail) in zip(keyed, tried, strict=True):
        fix = (
            f"the inbox must be readable and writable for {user}"
            if key == "folders.inbox"
            else f"let {user} write there: chown or chmod {folder}"
        )
        report(ok, key, detail if ok else detail + as_other, fix)
    _check_own_files(config, report, account)
    if not f.inbox.is_dir():
        return
    if config.journal.url is None:
        bound = journal_meta(config.journal_path, "processing_dir")
    else:
        bound = shared_meta(journal, "processing_dir")
    # Where the processing folder goes depends on whether that user may create entries in the inbox's
    # parent: the kernel answers as it will answer the daemon (``processing.choose``).
    may_create = (
        processing.may_create_entries
        if account.same_ids(accounts.me())
        else processing.may_create_as(account.uid, account.gid, account.groups)
    )
    chosen = processing.find(config, bound, may_create, user=account.name or f"uid {account.uid}")
    folder = chosen.path
    if folder.exists():
        try:
            processing.prepare(folder, f.inbox, checked_as=account)
            report(True, "processing folder", str(chosen))
        except (ConfigError, OSError) as exc:
            report(False, "processing folder", str(exc))
    else:
        parent = accounts.existing_parent(folder)
        same_fs = os.stat(parent).st_dev == os.stat(f.inbox).st_dev
        report(
            same_fs,
            "processing folder",
            f"{chosen}, will be created"
            if same_fs
            else f"{folder} would be on another file system than the inbox {f.inbox}",
            "set folders.processing to a folder next to the inbox (claims are renames)",
        )
    if unverifiable := processing.unverifiable_privacy(folder):
        note(unverifiable)


def _check_own_files(config: Config, report: Report, account: Account) -> None:
    """The journal and the lock files the daemon opens for writing, where they exist: made by another user
    (root running ``konfuzio-watch run`` by hand once), they stop the service at its start."""
    state = config.folders.state
    names = [DAEMON_LOCK_NAME]
    if config.journal.url is None:
        names += [config.journal_path.name + suffix for suffix in ("", "-wal", "-shm")]
    files = [state / name for name in names] + [config.folders.inbox / INBOX_LOCK_NAME]
    files = [path for path in files if path.is_file()]
    if not files:
        return
    tried = accounts.try_writes(account, [(accounts.FILE, path) for path in files])
    failed = [detail for ok, detail in tried if not ok]
    report(
        not failed,
        "files it keeps",
        "; ".join(failed) + f" (as {account.describe()})"
        if failed
        else f"{len(files)} (journal, locks) writable for {account.describe()}",
        f"give them to {account.describe()}: chown {account.name or account.uid} each (another user made them, "
        "e.g. root running konfuzio-watch run by hand)",
    )


def _check_watcher(config: Config, report: Report, warn: Callable[[str], None]) -> None:
    """Which watcher ``run`` starts on the inbox, and why (``watcher.plan_watching``); a warning where files
    other hosts write would wait for the rescan (``watch.polling: false`` on a network or FUSE mount)."""
    w = config.watch
    plan = plan_watching(w.polling, mount_of(config.folders.inbox), w.rescan_interval)
    text = plan.describe(w.poll_interval)
    if plan.warning:
        warn(f"watcher: {text}")
    else:
        report(
            True,
            "watcher",
            text
            + ("; `run` first checks with a probe file that its events arrive, else it polls" if plan.probe else ""),
        )
