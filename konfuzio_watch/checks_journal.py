"""``check``'s look at the journal: SQLite on a local disk and undamaged, or the cluster's
PostgreSQL journal (schema, clock, node ids, one inbox for all nodes); and whether ``run`` would get
the inbox's lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from .clock import CLOCK_OFF_WARN_S, describe_offset, is_off
from .config import Config, ConfigError
from .journal import NETWORK_FILESYSTEMS, BaseJournal, JournalError, JournalWriteError, filesystem_type, open_journal
from .lock_file import Holder, LockFile, hostname
from .locks import INBOX_LOCK_NAME, MODE_CLUSTER
from .node_markers import node_marker_path, read_node_marker

Report = Callable[..., None]


def check_journal(config: Config, report: Report) -> None:
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


def open_shared_journal(config: Config, report: Report) -> BaseJournal | None:
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


def shared_meta(journal: BaseJournal | None, key: str) -> str | None:
    if journal is None:
        return None
    try:
        return journal.meta(key) if journal.schema_found() is not None else None
    except JournalWriteError:
        return None


def check_cluster(config: Config, journal: BaseJournal, report: Report, note: Callable[[str], None]) -> None:
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


def check_inbox_lock(config: Config, journal: BaseJournal | None, report: Report) -> None:
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


def journal_meta(path: Path, key: str) -> str | None:
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            found = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    return found[0] if found else None
