"""``konfuzio-watch status``: where every file is, since when, and why."""

from __future__ import annotations

import io
import time
from typing import TextIO

from .config import Config
from .journal import ACTIVE, Journal, Row, State
from .summary import format_age


def print_status(config: Config, *, show_all: bool, now: float, out: TextIO) -> None:
    if not config.journal_path.exists():
        out.write(f"no journal yet at {config.journal_path}: nothing has been processed\n")
        return
    journal = Journal(config.journal_path)
    try:
        counts = journal.counts()
        oldest = journal.oldest_active_detected_at()
        out.write("state       files\n")
        for state in State:
            out.write(f"{state.value:<11} {counts[state]:>5}\n")
        pending = sum(counts[s] for s in ACTIVE)
        out.write(f"pending     {pending:>5}" + (f"   oldest {format_age(now - oldest)}" if oldest else "") + "\n")
        rows = journal.rows(ACTIVE if not show_all else (), limit=500)
        if rows:
            out.write("\n" + _table(rows, now))
        failed = [r for r in journal.rows([State.FAILED], limit=100_000)][-10:]
        if failed and not show_all:
            out.write("\nlast failures\n" + _table(failed, now))
    finally:
        journal.close()


def watch_status(config: Config, *, show_all: bool, interval_s: float, out: TextIO,
                 iterations: int | None = None) -> None:
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


def _table(rows: list[Row], now: float) -> str:
    lines = [f"{'id':>6}  {'state':<10} {'since':>6}  {'doc':>7}  path / last error"]
    for row in rows:
        doc = str(row.document_id) if row.document_id is not None else "-"
        line = f"{row.id:>6}  {row.state.value:<10} {format_age(now - row.updated_at):>6}  {doc:>7}  {row.display_path}"
        if row.error:
            line += f"  [{row.stage}: {row.error}]"
        lines.append(line)
    return "\n".join(lines) + "\n"
