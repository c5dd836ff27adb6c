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

import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from . import accounts, processing, reachability
from .accounts import Account
from .clock import CLOCK_OFF_WARN_S, describe_offset, is_off
from .config import Config, ConfigError
from .journal import NETWORK_FILESYSTEMS, BaseJournal, JournalError, JournalWriteError, filesystem_type, open_journal
from .konfuzio import ApiError, KonfuzioClient
from .locks import (
    DAEMON_LOCK_NAME,
    INBOX_LOCK_NAME,
    MODE_CLUSTER,
    Holder,
    LockFile,
    hostname,
    node_marker_path,
    read_daemon_lock,
    read_node_marker,
)
from .mounts import mount_of
from .policy import Cause
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
    journal = _open_shared_journal(config, report) if config.journal.url else None
    try:
        _check_folders(config, report, note, account, journal)
        _check_watcher(config, report, warn)
        if config.journal.url is None:
            _check_journal(config, report)
        elif journal is not None:
            _check_cluster(config, journal, report, note)
        _check_inbox_lock(config, journal, report)
    finally:
        if journal is not None:
            journal.close()
    _check_api(config, report)
    _check_callbacks(config, report, note)
    _check_monitor_port(config, report)
    if config.ngrok.enabled:
        path = config.ngrok.path
        usable = path.is_file() and os.access(path, os.X_OK)
        report(
            usable,
            "ngrok.path",
            str(path) if usable else f"{path} is missing or not executable",
            "install the ngrok agent there (it is never downloaded), or set ngrok.path",
        )
    if config.alerts.urls or config.alerts.urls_file:
        from .alerts import check_urls

        try:
            report(True, "alerts", ", ".join(check_urls(config.alerts)))
        except ConfigError as exc:
            report(False, "alerts", str(exc), "fix alerts.urls (apprise URL syntax)")
    return problems


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
        bound = _journal_meta(config.journal_path, "processing_dir")
    else:
        bound = _shared_meta(journal, "processing_dir")
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


def _check_journal(config: Config, report: Report) -> None:
    state = config.folders.state
    fstype = filesystem_type(state)
    report(
        fstype not in NETWORK_FILESYSTEMS,
        "journal on a local disk",
        f"{state} ({fstype or 'unknown'})",
        "put folders.state on a local disk (SQLite WAL does not work on network file systems)",
    )
    if not config.journal_path.exists():
        return
    try:
        with sqlite3.connect(f"file:{config.journal_path}?mode=ro", uri=True) as db:
            result = db.execute("PRAGMA quick_check(5)").fetchone()[0]
        report(
            result == "ok",
            "journal",
            str(config.journal_path) if result == "ok" else f"damaged: {result}",
            f"stop the service, move it aside (mv {config.journal_path} {config.journal_path}.damaged), start",
        )
    except sqlite3.Error as exc:
        report(
            False,
            "journal",
            f"cannot read {config.journal_path}: {exc}",
            "check its owner and mode, or move it aside and start again",
        )


def _open_shared_journal(config: Config, report: Report) -> BaseJournal | None:
    """The cluster's journal, as it is (never created or upgraded here); None if it cannot be opened."""
    try:
        return open_journal(config, migrate=False, wait_s=5.0)
    except (JournalError, ConfigError) as exc:
        report(
            False,
            "journal",
            str(exc),
            "check journal.url and its password (journal.password_file, PGPASSWORD), "
            "and that this machine reaches the server",
        )
        return None


def _shared_meta(journal: BaseJournal | None, key: str) -> str | None:
    if journal is None:
        return None
    try:
        return journal.meta(key) if journal.schema_found() is not None else None
    except JournalWriteError:
        return None


def _check_cluster(config: Config, journal: BaseJournal, report: Report, note: Callable[[str], None]) -> None:
    """The shared journal's schema, this node's id, and whether the live nodes see the same inbox."""
    try:
        problem = journal.check()
        if problem is not None and "newer konfuzio-watch" in problem:
            report(False, "journal", problem, "upgrade konfuzio-watch on this node to the version of the others")
            return
        report(True, "journal", f"{journal.location}, schema {journal.schema_version}" if problem is None else problem)
        if problem is not None:
            return
        offset = journal.clock_offset().offset_s
        report(
            not is_off(offset),
            "clock",
            f"this machine's clock is {describe_offset(offset)}",
            f"set the clocks right (NTP) on this machine and the database server: nodes keep to the database's "
            f"clock, but their logs are off from each other (allowed: {CLOCK_OFF_WARN_S:g} s)",
        )
        nodes = journal.nodes()
    except JournalWriteError as exc:
        report(False, "journal", str(exc), "check that this machine reaches the server")
        return
    lease_s = config.node.lease_seconds
    alive = [n for n in nodes if n.silent_s <= lease_s]
    me = config.node_id
    same_id = next((n for n in alive if n.id == me and n.host != hostname()), None)
    report(
        same_id is None,
        "node.id",
        f"{me}" if same_id is None else f"{me} is the id of a running node on host {same_id.host} (pid {same_id.pid})",
        "give each node its own node.id",
    )
    others = [n for n in alive if n.id != me]
    if not others:
        note("no other node is running: whether every node sees the same inbox is checked once one is")
        return
    inbox = config.folders.inbox
    for node in others:
        seen = node.inbox_marker is not None and read_node_marker(inbox, node.id) == node.inbox_marker
        report(
            seen,
            "same inbox",
            f"node {node.id} (host {node.host}) watches {inbox} too"
            if seen
            else f"node {node.id} (host {node.host}) watches another folder: its marker "
            f"{node_marker_path(inbox, node.id).name} is not in {inbox} as this machine sees it",
            "mount the same share under the same path on every node (inbox, done, failed and the processing "
            "folder next to the inbox)",
        )


def _check_inbox_lock(config: Config, journal: BaseJournal | None, report: Report) -> None:
    """Would ``run`` get the inbox? A single daemon and a cluster exclude each other; a cluster with
    another journal, or another single daemon (another state folder), holds it."""
    inbox = config.folders.inbox
    if not inbox.is_dir():
        return
    lock = LockFile(inbox / INBOX_LOCK_NAME)
    if not lock.path.exists():
        report(True, "inbox lock", "free (no daemon has watched the inbox yet)")
        return
    try:
        exclusive_free = lock.try_lock()
        shared_free = exclusive_free or lock.try_lock(shared=True)
    except OSError as exc:
        report(
            True,
            "inbox lock",
            f"cannot be taken here ({exc.strerror or exc}): another daemon on this inbox would not be noticed",
        )
        return
    finally:
        lock.close()
    holder = Holder.from_json(lock.read())
    if exclusive_free:
        report(True, "inbox lock", "free (no daemon watches the inbox)")
        return
    cluster_id = journal.journal_id if journal is not None else None
    if config.journal.url is not None:
        if not shared_free or holder.mode != MODE_CLUSTER:
            state = f", state folder {holder.state}" if holder.state else ""
            report(
                False,
                "inbox lock",
                f"a konfuzio-watch with a journal of its own (SQLite) ({holder.describe()}{state}) is watching {inbox}",
                "stop it before nodes with journal.url start on this inbox: one inbox is one daemon's or one cluster's",
            )
        elif holder.cluster_id != cluster_id:
            report(
                False,
                "inbox lock",
                f"another cluster (journal {holder.journal or 'unknown'}, id {holder.cluster_id}) is watching {inbox}",
                "use the journal.url of its nodes, or another inbox",
            )
        else:
            report(True, "inbox lock", f"held by the nodes of this cluster (journal id {cluster_id})")
        return
    if holder.mode == MODE_CLUSTER and shared_free:
        report(
            False,
            "inbox lock",
            f"a cluster of konfuzio-watch nodes (journal {holder.journal or 'unknown'}) is watching {inbox}",
            "set journal.url to the cluster's to join it, or give this daemon another inbox",
        )
    elif holder.state is not None and holder.state != str(config.folders.state):
        report(
            False,
            "inbox lock",
            f"another konfuzio-watch ({holder.describe()}, state folder {holder.state}) is watching {inbox}",
            "stop it first, or give each daemon its own inbox",
        )
    else:
        report(True, "inbox lock", f"held by this konfuzio-watch ({holder.describe()})")


def _check_api(config: Config, report: Report) -> None:
    k = config.konfuzio
    try:
        token = config.api_token()
    except ConfigError as exc:
        report(False, "API token", str(exc), "set konfuzio.token_file to a readable file (or konfuzio.token)")
        return
    client = KonfuzioClient(k.host, token, timeout_s=min(30.0, k.timeout_seconds))
    try:
        project = client.project(k.project_id)
        report(True, "Konfuzio API", f"project {project.get('id')} ({project.get('name', '?')}) at {k.host}")
    except ApiError as exc:
        cause = exc.failure.cause
        if cause == Cause.NOT_FOUND:
            report(
                False,
                "Konfuzio API",
                f"project {k.project_id} not found or not visible to this token",
                "check konfuzio.project_id, and that the token's user is a member of the project",
            )
        elif cause == Cause.REJECTED:
            report(
                False,
                "Konfuzio API",
                f"Konfuzio rejected the API token (HTTP {exc.status})",
                "put a valid token into konfuzio.token_file (Konfuzio: profile -> API token)",
            )
        else:
            report(
                False,
                "Konfuzio API",
                f"project {k.project_id} at {k.host}: {exc.failure.message}",
                "check konfuzio.host and that this machine reaches it",
            )
    finally:
        client.close()


def _check_callbacks(config: Config, report: Report, note: Callable[[str], None]) -> None:
    c = config.callback
    if not c.enabled:
        note(
            f"poll-only mode (callback.enabled: false): results are polled {config.results.first_poll_seconds:g} s "
            f"after the upload, then less and less often up to every {config.results.poll_interval:g} s"
        )
        return
    from .callback import create_app
    from .server import PUBLIC_ENDPOINT_SETTINGS, ServerThread

    tokens = reachability.ProbeTokens()
    app = create_app(
        lambda token, _claimed: "probe" if tokens.arrived(token) else "unknown",
        path=c.path,
        max_body_bytes=c.max_body_kb * 1024,
    )
    try:
        server = ServerThread(
            app, c.host, c.port, name="check-callback-server", threads=1, **PUBLIC_ENDPOINT_SETTINGS
        ).start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            holder = _running_daemon_on(config, "callback.port", c.host, c.port)
            if holder is not None:
                report(True, "callback.port", f"{c.host}:{c.port} {_served_by(holder)}")
                _report_daemons_callbacks(holder, report, note)
            else:
                report(
                    False,
                    "callback.port",
                    f"{c.host}:{c.port} is in use",
                    f"stop what listens there (`ss -ltnp 'sport = :{c.port}'`), or choose another callback.port",
                )
        else:
            report(
                False,
                "callback.port",
                f"cannot listen on {c.host}:{c.port}: {exc.strerror or exc}",
                "choose another callback.host/port",
            )
        return
    try:
        report(True, "callback.port", f"{c.host}:{c.port} is free")
        public = c.public_url or server.url
        if config.ngrok.enabled:
            note("callbacks arrive through the ngrok tunnel; `run` checks that they do once the tunnel is open")
            return
        if reachability.callback_base_is_private(public) and not reachability.callback_base_is_private(
            config.konfuzio.host
        ):
            report(
                False,
                "callbacks",
                f"Konfuzio cannot reach {public} (a loopback address)",
                "set callback.public_url (your reverse proxy), enable ngrok, or set callback.enabled: false "
                "(poll-only)",
            )
            return
        found = reachability.probe(public, c.path, tokens)
        report(
            found.ok,
            "callbacks",
            f"a probe through {public} arrived" if found.ok else found.detail,
            f"make {public}/{c.path.strip('/')}/ reach {c.host}:{c.port}, or set callback.enabled: false",
        )
    finally:
        server.close(timeout_s=2)


def _check_monitor_port(config: Config, report: Report) -> None:
    """Would ``run`` get its monitor port? (Port 0 takes any free one.)"""
    m = config.monitor
    if not m.enabled or m.port == 0:
        return
    from .server import try_bind

    try:
        try_bind(m.host, m.port)
    except OSError as exc:
        holder = _running_daemon_on(config, "monitor.port", m.host, m.port) if exc.errno == errno.EADDRINUSE else None
        if holder is not None:
            report(True, "monitor.port", f"{m.host}:{m.port} {_served_by(holder)}")
        elif exc.errno == errno.EADDRINUSE:
            report(
                False,
                "monitor.port",
                f"{m.host}:{m.port} is in use",
                f"stop what listens there (`ss -ltnp 'sport = :{m.port}'`), or choose another monitor.port (0: any "
                "free port, which the state folder's daemon.lock names)",
            )
        else:
            report(
                False,
                "monitor.port",
                f"cannot listen on {m.host}:{m.port}: {exc.strerror or exc}",
                "choose another monitor.host/port",
            )
        return
    report(True, "monitor.port", f"{m.host}:{m.port} is free")


def _running_daemon_on(config: Config, key: str, host: str, port: int) -> Holder | None:
    """The konfuzio-watch of this state folder, if it runs and its lock says it listens on ``host:port``
    for ``key``: its own port is in use by it, which is no problem."""
    try:
        holder = read_daemon_lock(config.folders.state)
    except OSError:
        return None
    if holder is None or not holder.is_running() or holder.host != hostname():
        return None
    return holder if (holder.listening or {}).get(key) == f"{host}:{port}" else None


def _served_by(holder: Holder) -> str:
    return f"is served by the running konfuzio-watch (pid {holder.pid})"


def _report_daemons_callbacks(holder: Holder, report: Report, note: Callable[[str], None]) -> None:
    """Whether callbacks reach the running daemon, as it says (its monitor's /status): this check cannot
    probe them itself while the daemon holds the port."""
    from .status import fetch_live_status

    if not holder.monitor_url:
        note(
            "whether callbacks reach the running konfuzio-watch is in its log (`callbacks arriving: ...`): its "
            "monitor is off"
        )
        return
    try:
        said = fetch_live_status(holder.monitor_url).get("callbacks")
    except (OSError, ValueError) as exc:
        note(
            f"whether callbacks reach the running konfuzio-watch is in its log: its monitor at "
            f"{holder.monitor_url} does not answer ({exc})"
        )
        return
    if not isinstance(said, dict) or not said.get("text"):
        note("the running konfuzio-watch does not say whether callbacks reach it (an older version)")
    elif said.get("arriving") is None:
        note(f"callbacks: {said['text']}")
    else:
        report(
            said["arriving"] is True,
            "callbacks",
            str(said["text"]),
            "make the public callback URL reach callback.host/port (callback.public_url, the reverse proxy or "
            "the tunnel), or set callback.enabled: false",
        )


def _journal_meta(path: Path, key: str) -> str | None:
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            found = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    return found[0] if found else None
