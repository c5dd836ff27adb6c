"""``konfuzio-watch retry``: put failed files back through the pipeline.

A failed file moves from failed/ back to its place in the inbox (never overwriting), its
``.error.json`` is removed, and its journal row becomes ``retried``; the daemon then sees it as
a new file. Neither folder is followed through a symbolic link someone put there. A file still
pending (e.g. waiting out a backoff after a disk-full error) is made due now instead; in a
cluster, a file a node works on right now is left to it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .config import Config
from .dirfd import FolderInTheWay
from .export import ERROR_SUFFIX
from .files import free_target, lstat_below, move_no_clobber, sidecar_for, unlink_below
from .journal import ACTIVE, BaseJournal, IllegalTransition, Row, State, open_journal


def retry_files(config: Config, paths: Iterable[str], all_failed: bool, now: float) -> tuple[list[str], int]:
    """Returns (one message per file, number of paths that matched nothing)."""
    journal = open_journal(config) if config.journal.url is None else open_journal(config, migrate=False, wait_s=5.0)
    try:
        now += journal.clock_offset().offset_s  # "due now" for the nodes of a cluster: by the database's clock
        failed = journal.rows([State.FAILED], limit=10_000_000)
        pending = journal.rows(ACTIVE, limit=10_000_000)
        messages, unmatched = [], 0
        chosen: list[Row] = list(failed) if all_failed else []
        for path in paths:
            matches = [r for r in failed + pending if _matches(r, path, config)]
            if not matches:
                messages.append(f"{path}: no failed or pending file by that name")
                unmatched += 1
            chosen += matches
        for row in {r.id: r for r in chosen}.values():
            messages.append(_retry(journal, config, row, now))
        if all_failed and not failed and not messages:  # silence would read as "done" or as a hang
            messages.append(f"nothing to retry: the journal holds no failed file (failed/: {config.folders.failed})")
        return messages, unmatched
    finally:
        journal.close()


def retry_row(journal: BaseJournal, config: Config, row_id: int, now: float) -> str:
    """The status page's retry of one failed file (by its row; ``now`` by the journal's clock, as the
    daemon's is); ``KeyError`` if there is no such row."""
    row = journal.get(row_id)
    if row.state != State.FAILED:
        return f"{row.display_path}: {row.state.value}, not failed: nothing to retry"
    return _retry(journal, config, row, now)


def _matches(row: Row, path: str, config: Config) -> bool:
    wanted = os.fsencode(path)
    if row.rel_path == wanted:
        return True
    if row.final_path is None:
        return False
    absolute = os.fsencode(os.path.abspath(path))
    in_failed = os.fsencode(str(config.folders.failed / path))
    return row.final_path in (absolute, in_failed)


def _retry(journal: BaseJournal, config: Config, row: Row, now: float) -> str:
    if row.state != State.FAILED:
        try:
            journal.update(row, now, next_at=now, failures=0)
        except IllegalTransition:  # a cluster: a node works on it right now (or it moved on meanwhile)
            lease = journal.lease_of(row.id)
            where = f"node {lease.node} works on it right now" if lease else "it moved on meanwhile"
            return f"{row.display_path}: {row.state.value}; {where}: nothing to retry"
        return f"{row.display_path}: {row.state.value}; will be retried at once"
    assert row.final_path is not None
    lease = journal.lease_of(row.id)
    if lease is not None and lease.remaining_s > 0:  # a cluster: the node that failed it is finishing its step
        return f"{row.display_path}: node {lease.node} is finishing it right now; try again in a moment"
    source = Path(os.fsdecode(row.final_path))
    failed = config.folders.failed if source.is_relative_to(config.folders.failed) else source.parent
    try:
        lstat_below(failed, source)
    except FolderInTheWay as exc:
        return f"{row.display_path}: {exc.filename} is not a folder (a symbolic link, or a file); not followed"
    except FileNotFoundError:
        return f"{row.display_path}: not in failed/ any more ({source}); nothing to retry"
    target = free_target(config.folders.inbox, row.rel_fspath, "")
    move_no_clobber(source, target, src_root=failed, dst_root=config.folders.inbox)
    report = sidecar_for(source, ERROR_SUFFIX)
    unlink_below(failed, report.parent, [report.name])  # a link by that name is removed, never followed
    journal.transition(row, State.RETRIED, now, next_at=None)
    return f"{row.display_path}: back in the inbox as {target.relative_to(config.folders.inbox)}"
