"""``konfuzio-watch status``: where every file is, since when, and why; and what the running daemon says.

The journal is read directly (no API token, no daemon needed). The running daemon, if any, is
found through the state folder's lock file (``locks.py``), which names its monitor URL; its
``/status`` adds what only it knows: what is blocked since when, and the ``extra`` facts (which watcher
runs on the inbox and why, the files it saw settling). The files waiting in the inbox are counted by
status itself, with the watcher's scan, so that files no event announced are counted too. With a
shared journal (a cluster) it also lists the nodes: each one's host, when it was last heard from
and how many files it works on, and whose clock is off from the database's; and which node works on
each pending file. Ages are then by the database's clock, as the times in the journal are.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

from .clock import describe_offset, is_off
from .config import Config
from .journal import ACTIVE, BaseJournal, JournalError, JournalWriteError, Row, State, display_name, open_journal
from .journal.outbox import DeliveryState
from .locks import read_daemon_lock
from .results import web_url
from .states import WAITING_FOR_A_PERSON, Stage
from .summary import format_age
from .watcher import Waiting, count_waiting, ignored_files

MONITOR_TIMEOUT_S = 3.0
LIST_SHOWN = 10


class StatusError(Exception):
    """Status cannot be shown (e.g. the journal is unreadable); the message is one line for the user."""


def print_status(config: Config, *, show_all: bool, now: float, out: TextIO) -> None:
    out.write(daemon_report(config, waiting_in_inbox(config)))
    try:
        if config.journal.url is None and not config.journal_path.exists():
            out.write(f"no journal yet at {config.journal_path}: nothing has been processed\n")
            return
        _print_journal(config, show_all=show_all, now=now, out=out)
    except BrokenPipeError:  # the reader went away (`status | head -1`): the CLI handles that
        raise
    except (JournalError, JournalWriteError) as exc:
        raise StatusError(str(exc)) from None
    except (sqlite3.Error, OSError) as exc:
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        raise StatusError(f"cannot read the journal {config.journal_path}: {reason}") from None


def _print_journal(config: Config, *, show_all: bool, now: float, out: TextIO) -> None:
    journal = open_journal(config) if config.journal.url is None else open_journal(config, migrate=False, wait_s=5.0)
    try:
        if journal.shared:
            if journal.schema_found() is None:
                out.write(f"no journal yet at {journal.location}: nothing has been processed\n")
                return
            out.write(_nodes(journal, config.node.lease_seconds))
        now += journal.clock_offset().offset_s  # a cluster's times are the database's
        counts = journal.counts()
        oldest = journal.oldest_active_detected_at()
        out.write("state       files\n")
        for state in State:
            out.write(f"{state.value:<11} {counts[state]:>5}\n")
        pending = sum(counts[s] for s in ACTIVE)
        out.write(f"pending     {pending:>5}" + (f"   oldest {format_age(now - oldest)}" if oldest else "") + "\n")
        rows = journal.rows(ACTIVE if not show_all else (), limit=500)
        if rows:
            holders = journal.lease_holders(r.id for r in rows) if journal.shared else None
            out.write("\n" + _table(rows, now, config.konfuzio.host, holders))
        out.write(_deliveries(journal, now, config.deliver.enabled))
        failed = [r for r in journal.rows([State.FAILED], limit=100_000)][-10:]
        if failed and not show_all:
            out.write("\nlast failures\n" + _table(failed, now))
        if show_all:
            out.write(_ignored(config, journal.meta("processing_dir")))
    finally:
        journal.close()


def _ignored(config: Config, processing_dir: str | None) -> str:
    """What the inbox holds that is never taken in (hidden, temporary, ``watch.ignore``), and why."""
    f = config.folders
    own = [f.done, f.failed, f.state, *([processing_dir] if processing_dir else [])]
    found = [
        (path, why)
        for path, why in ignored_files(f.inbox, own, config.watch.ignore)
        if not path.startswith(".konfuzio-watch")
    ]  # the daemon's own marker
    if not found:
        return "\nignored in the inbox: nothing\n"
    return "\nignored in the inbox (never taken in)\n" + "".join(f"  {path}  [{why}]\n" for path, why in found)


def watch_status(
    config: Config, *, show_all: bool, interval_s: float, out: TextIO, iterations: int | None = None
) -> None:
    """Redraw the status every ``interval_s`` (a terminal's clear-screen between frames)."""
    frame = 0
    while iterations is None or frame < iterations:
        buffer = io.StringIO()
        print_status(config, show_all=show_all, now=time.time(), out=buffer)
        out.write("\x1b[H\x1b[2J" + f"konfuzio-watch status, every {interval_s:g} s (Ctrl-C to quit)\n\n")
        out.write(buffer.getvalue())
        out.flush()
        frame += 1
        if iterations is None or frame < iterations:
            time.sleep(interval_s)  # the refresh period of a live display


def waiting_in_inbox(config: Config) -> Waiting:
    """The files in the inbox not taken in yet, by the watcher's own scan (bounded): whether or not the
    daemon heard of them (no file event comes for another host's file on a client mount)."""
    f = config.folders
    own = [f.done, f.failed, f.state, *([f.processing] if f.processing else [])]
    return count_waiting(f.inbox, own, config.watch.ignore)


def daemon_report(config: Config, waiting: Waiting | None = None) -> str:
    """``daemon: running (pid 1234 on host scan01, since 14:02)`` and, from its monitor, what is
    blocked, whether callbacks arrive, and the extra facts; or ``daemon: no daemon running``. With
    ``waiting``, how many files wait in the inbox. Ends with a blank line."""
    lines = _daemon_lines(config, waiting)
    said = any("in the inbox, not taken in yet" in line for line in lines)
    running = not lines[0].startswith("daemon: no daemon running")
    if waiting is not None and not said and (running or waiting.files):  # no daemon: only files left waiting
        lines.append(f"  {_waiting_line(waiting, None)}")
    return "\n".join(lines) + "\n\n"


def _daemon_lines(config: Config, waiting: Waiting | None) -> list[str]:
    try:
        holder = read_daemon_lock(config.folders.state)
    except OSError as exc:
        return [f"daemon: unknown (cannot read its lock file: {exc.strerror or exc})"]
    if holder is None or not holder.is_running():
        return ["daemon: no daemon running"]
    lines = [f"daemon: running ({holder.describe()})"]
    if not holder.monitor_url:
        return [*lines, "  its monitor is off (monitor.enabled: false) or not yet up: no live state to show"]
    try:
        live = fetch_live_status(holder.monitor_url)
    except (OSError, ValueError) as exc:
        return [*lines, f"  its monitor at {holder.monitor_url} does not answer: {_reason(exc)}"]
    if live.get("pid") != holder.pid:
        return [*lines, f"  {holder.monitor_url} answers for another process (pid {live.get('pid')})"]
    if live.get("status") != "ok":
        lines[0] += f", {live.get('status')}"
    blocked = live.get("blocked") or []
    if not blocked:
        lines.append("  blocked: nothing")
    for gate in blocked:
        since = f" for {format_age(gate['for_seconds'])}" if gate.get("for_seconds") is not None else ""
        lines.append(f"  BLOCKED {gate.get('scope')}{since}: {gate.get('reason')}")
    callbacks = live.get("callbacks")
    if isinstance(callbacks, dict) and callbacks.get("text"):  # the daemon's one answer, as /healthz and /metrics
        lines.append(f"  callbacks arriving: {callbacks['text']}")
    for name, value in (live.get("extra") or {}).items():
        lines += _fact(name, value, waiting)
    return lines


def fetch_live_status(monitor_url: str, timeout_s: float = MONITOR_TIMEOUT_S) -> dict[str, Any]:
    """GET <monitor>/status (never through a proxy: the monitor is on this host)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(monitor_url.rstrip("/") + "/status", timeout=timeout_s) as response:
        data = json.loads(response.read(1024 * 1024))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _waiting_line(waiting: Waiting | None, seen: int | None) -> str:
    """``in the inbox, not taken in yet: 29 (the daemon has seen 3 of them)``: the inbox's own count
    (``waiting``) and the files the daemon tracks (``seen``); either may be unknown."""
    head = "in the inbox, not taken in yet:"
    if waiting is None or waiting.error is not None:
        cannot = f" (cannot look into the inbox: {waiting.error})" if waiting is not None else ""
        return f"{head} {seen if seen is not None else 'unknown'}{cannot}"
    count = f"at least {waiting.files}" if not waiting.complete else str(max(waiting.files, seen or 0))
    if seen is None or (waiting.complete and seen >= waiting.files):
        return f"{head} {count}"
    return f"{head} {count} (the daemon has seen {seen} of them)"


def _fact(name: str, value: Any, waiting: Waiting | None = None) -> list[str]:
    """An ``extra`` entry: a mapping becomes one line per key, a list ``n: a, b, c``; files not
    taken in yet (``candidates``) get a line each: ``scan.pdf: incomplete (...; fails in 40 s)``,
    under the count of the files waiting in the inbox (``waiting``, from its own scan)."""
    if name == "candidates" and isinstance(value, list):
        lines = [f"  {_waiting_line(waiting, len(value))}"]
        lines += [f"    {c.get('path')}: {c.get('text')}" for c in value[:LIST_SHOWN] if isinstance(c, dict)]
        return lines + ([f"    and {len(value) - LIST_SHOWN} more"] if len(value) > LIST_SHOWN else [])
    if isinstance(value, dict):
        return [line for key, sub in value.items() for line in _fact(f"{name} {key}", sub)]
    if isinstance(value, list | tuple):
        shown = ", ".join(str(v) for v in value[:LIST_SHOWN])
        more = f", and {len(value) - LIST_SHOWN} more" if len(value) > LIST_SHOWN else ""
        return [f"  {name}: {len(value)}" + (f": {shown}{more}" if value else "")]
    return [f"  {name}: {value}"]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc)


def _deliveries(journal: BaseJournal, now: float, enabled: bool) -> str:
    """The outbox (``delivery.py``): deliveries by state, the oldest pending, the last that failed."""
    counts = journal.delivery_counts()
    if not enabled and not any(counts.values()):
        return ""
    oldest = journal.oldest_pending_delivery_at()
    line = "  ".join(f"{state.value} {n}" for state, n in counts.items())
    text = "\ndeliveries  " + line + (f"   oldest pending {format_age(now - oldest)}" if oldest else "") + "\n"
    failed = journal.deliveries([DeliveryState.FAILED])[-LIST_SHOWN:]
    if failed:
        text += "failed deliveries (konfuzio-watch redeliver PATH|--all-failed)\n"
        text += "".join(f"  {display_name(d.file_path)}  {d.event} {d.key}: {d.error}\n" for d in failed)
    return text


def _nodes(journal: BaseJournal, lease_s: float) -> str:
    """The cluster's nodes: id, host, pid, when last heard from, files in hand."""
    nodes = journal.nodes()
    leased = journal.leases_by_node()
    width = max([4, *(len(n.id) for n in nodes), *(len(k) for k in leased)])
    host_width = max([4, *(len(n.host) for n in nodes)])
    lines = [
        f"nodes sharing the journal {journal.location}",
        f"  {'node':<{width}}  {'host':<{host_width}}  {'pid':>7}  {'heard':>6}  {'files':>5}",
    ]
    for node in nodes:
        line = (
            f"  {node.id:<{width}}  {node.host:<{host_width}}  {node.pid or '-':>7}  "
            f"{format_age(node.silent_s) + ' ago':>6}  {leased.get(node.id, 0):>5}"
        )
        if node.silent_s > lease_s:
            line += "  SILENT: its files pass to the other nodes"
        if node.clock_offset_s is not None and is_off(node.clock_offset_s):
            line += f"  CLOCK {describe_offset(node.clock_offset_s)} (the times it writes are the database's)"
        lines.append(line)
    for gone in sorted(set(leased) - {n.id for n in nodes}):  # stopped, with steps cut off: their leases expire
        lines.append(f"  {gone:<{width}}  {'-':<{host_width}}  {'-':>7}  {'-':>6}  {leased[gone]:>5}  stopped")
    if not nodes and not leased:
        lines.append("  (none running)")
    return "\n".join(lines) + "\n\n"


def _table(rows: list[Row], now: float, host: str | None = None, holders: dict[int, str] | None = None) -> str:
    node = f"  {'node':<8}" if holders is not None else ""
    lines = [f"{'id':>6}  {'state':<10} {'since':>6}  {'doc':>7}{node}  path / last error"]
    for row in rows:
        doc = str(row.document_id) if row.document_id is not None else "-"
        # An uploaded file is as old as its upload (its row changes at every poll).
        since = row.uploaded_at if row.state == State.UPLOADED and row.uploaded_at else row.updated_at
        held = f"  {holders.get(row.id, '-'):<8}" if holders is not None else ""
        line = f"{row.id:>6}  {row.state.value:<10} {format_age(now - since):>6}  {doc:>7}{held}  {row.display_path}"
        if row.error:
            line += f"  [{row.stage}: {row.error}]"
        elif row.state == State.UPLOADED and Stage.of(row.stage) in WAITING_FOR_A_PERSON:
            link = f": {web_url(host, row.document_id)}" if host and row.document_id else ""
            line += f"  [{row.stage}{link}]"
        lines.append(line)
    return "\n".join(lines) + "\n"
