"""Start-up and take-over: finish what a crash (or an unwritable journal, or a dead node) left half
done. Journal rows are the truth.

What differs between one daemon and a node of a cluster (a journal several daemons share) is a
``NodeStrategy`` chosen once (``node_strategy``): which rows a node recovers as its own, and what
proves that a file in the processing folder is the one a row claimed. Nothing else asks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from . import processing
from .files import free_target, fsync_dir, move_no_clobber
from .journal import ACTIVE, Row, State, display_name
from .placing import same_file
from .shares import Folders, is_share_error
from .steps.claim import finish_claims
from .steps.context import Context, error_text, export_display

log = logging.getLogger("konfuzio_watch")


class NodeStrategy:
    """One daemon: every row is its own; a file's identity is its device and inode."""

    clock_hint = "the clock was set back?"

    def __init__(self, folders: Folders, processing_dir: Path):
        self.folders = folders
        self.processing_dir = processing_dir

    def recover_rows(self, ctx: Context, in_hand: set[int], alone: bool) -> None:
        """The rows a crash left half done, all of them this daemon's: claims finished, uploads in
        flight looked for (their reconcile window starts now), and, callbacks that came while it was
        down being lost, every waiting file looked at once now."""
        claiming = ctx.journal.rows([State.CLAIMING], limit=10_000_000)
        if claiming:
            finish_claims(ctx, claiming)
        now = ctx.clock.now()
        in_flight = [r for r in ctx.journal.rows([State.UPLOADING], limit=10_000_000) if r.ambiguous_since is None]
        ctx.journal.update_many(in_flight, now, ambiguous_since=now)
        waiting = ctx.journal.rows([State.UPLOADED], limit=10_000_000)
        ctx.journal.update_many(waiting, now, next_at=now)

    def is_claimed_file(self, found: os.stat_result, row: Row) -> bool | None:
        """Is the file found under a row's claim name the one it claimed? Its inode and device (a share
        mounted anew has a device number of its own, and keeps the server's inode numbers). None: the
        inode cannot tell, on FUSE (``Folders.inodes_are_stable``); then its name, an unpredictable one
        in a folder only the daemon writes, and its size, mtime and ctime (the content when that moved)
        tell."""
        if row.file_ino is None:
            return True
        if not self.folders.inodes_are_stable(self.processing_dir):
            return None
        return self._same_file(found, row)

    def _same_file(self, found: os.stat_result, row: Row) -> bool:
        if found.st_dev != row.file_dev and found.st_dev == self.folders.device_of(self.processing_dir):
            return found.st_ino == row.file_ino  # the processing folder's share, mounted anew
        return (found.st_dev, found.st_ino) == (row.file_dev, row.file_ino)

    def renamed_by_another(self, row: Row, target: Path) -> bool:
        """The claim's rename found no file in the inbox: did another node rename it? Not with one."""
        return False


class ClusterStrategy(NodeStrategy):
    """A node of a cluster: its own rows are those leased to it; a file's identity is its inode alone
    (each machine's mount of the share has a device number of its own)."""

    clock_hint = "a node's clock is ahead, or was set back?"

    def recover_rows(self, ctx: Context, in_hand: set[int], alone: bool) -> None:
        """The rows its previous run (or writes lost with the database) left leased to it, except those
        ``in_hand`` (steps still running), and rows whose node died (``take_over``). ``alone``: no other
        node is alive, so callbacks that came while the cluster was down are lost: every waiting file is
        looked at once now."""
        take_over(ctx, own=True, exclude=in_hand)
        if alone:
            ctx.journal.make_due([State.UPLOADED], ctx.clock.now())

    def _same_file(self, found: os.stat_result, row: Row) -> bool:
        return found.st_ino == row.file_ino

    def renamed_by_another(self, row: Row, target: Path) -> bool:
        """The claim's rename found no file in the inbox: did another node (a row taken over from it)
        rename this very claim a moment ago? Then the file is where the row says, and it is claimed."""
        try:
            found = os.lstat(target)
        except FileNotFoundError:
            return False
        return self.is_claimed_file(found, row) is not False


def node_strategy(shared: bool, folders: Folders, processing_dir: Path) -> NodeStrategy:
    """The strategy for a journal several daemons share (``journal.shared``), or for one daemon."""
    return (ClusterStrategy if shared else NodeStrategy)(folders, processing_dir)


def recover(ctx: Context, in_hand: Iterable[int] = (), alone: bool = True) -> int:
    """Recover the rows that are this node's (``NodeStrategy.recover_rows``), adopt files no row
    claims, and make nothing due further ahead than any wait can be. Returns the number of
    unfinished files."""
    ctx.kept.sweep(r.id for r in ctx.journal.rows([State.EXPORTING], limit=10_000_000))
    ctx.node.recover_rows(ctx, set(in_hand), alone)
    adopt_orphans(ctx)
    now = ctx.clock.now()
    r = ctx.config.results
    longest = max(ctx.limits.cap_s, r.poll_interval, r.callback_timeout) + 1.0
    clamped = ctx.journal.clamp_due(now, longest)
    if clamped:
        log.warning("%d file(s) were due more than %.0f s ahead (%s); due now", clamped, longest, ctx.node.clock_hint)
    return sum(n for state, n in ctx.journal.counts().items() if state in ACTIVE)


def take_over(ctx: Context, *, own: bool = False, exclude: Iterable[int] = ()) -> list[Row]:
    """Lease to this node the rows whose node stopped renewing its leases (it died, hung, or lost the
    database) - with ``own``, also this node's own except ``exclude`` - and recover them as after a
    crash (``resume``). Returns them as they are now."""
    done: set[int] = set(exclude)
    out: list[Row] = []
    while batch := ctx.journal.take_over_expired(ctx.lease_s, 500, own=own, exclude=done):
        done.update(r.id for r in batch)
        out += resume(ctx, batch)
    return out


def resume(ctx: Context, rows: list[Row]) -> list[Row]:
    """What start-up recovery does, on these rows only (they are leased to this node): finish their
    claims, look for uploads that were in flight before uploading again (the reconcile window starts
    now), look at waiting documents at once. Then any node may go on with them."""
    names = ", ".join(r.display_path for r in rows[:10]) + (f", and {len(rows) - 10} more" if rows[10:] else "")
    log.warning(
        "took over %d file(s) whose node stopped renewing its lease (it stopped, died or lost the journal): %s",
        len(rows),
        names,
    )
    claiming = [r for r in rows if r.state == State.CLAIMING]
    if claiming:
        finish_claims(ctx, claiming)
    now = ctx.clock.now()
    ctx.journal.update_many(
        [r for r in rows if r.state == State.UPLOADING and r.ambiguous_since is None], now, ambiguous_since=now
    )
    ctx.journal.update_many([r for r in rows if r.state == State.UPLOADED], now, next_at=now)
    ctx.journal.release_leases(r.id for r in rows)
    return ctx.journal.get_many([r.id for r in rows])


def adopt_orphans(ctx: Context) -> list[Path]:
    """Files in processing/ that no row claims (the journal was lost, or restored from a backup)
    go back into the inbox under their base names, visibly; never matched to another row.

    The folder is listed before the journal is read: a claim writes its row before it moves the
    file, so a file another node is claiming right now has its row by the time it is read.

    Only while this daemon holds the folder's lock: a folder that is no longer the one it locked
    (removed or moved away, made again by another daemon) may hold another live daemon's files."""
    if not ctx.holds_processing_dir():
        log.warning(
            "%s is no longer the processing folder this daemon locked: files without a journal row there "
            "are left alone until it holds it again",
            ctx.processing_dir,
        )
        return []
    inbox = ctx.config.folders.inbox
    try:
        listed = processing.names(ctx.processing_dir)
        names = processing.orphans(listed, ctx.journal.claim_names(ACTIVE))
        names = _drop_leftover_names(ctx, names)
    except OSError as exc:
        if not is_share_error(exc):
            raise
        log.warning(
            "cannot look for files without a journal row in %s (%s); looked for at the next start",
            ctx.processing_dir,
            error_text(exc),
        )
        return []
    adopted = []
    for name in names:
        source = ctx.processing_dir / os.fsdecode(name)
        try:
            target = free_target(inbox, os.fsdecode(processing.original_name(name)), "")
            move_no_clobber(source, target, src_root=ctx.processing_dir, dst_root=inbox)
        except FileNotFoundError:
            continue  # finished (placed into done/ or failed/) since the folder was listed
        except OSError as exc:
            log.error(
                "%s: found in %s with no journal row, and cannot move it back into the inbox: %s",
                display_name(name),
                ctx.processing_dir,
                exc.strerror or exc,
            )
            continue
        adopted.append(target)
    if adopted:
        log.warning(
            "%d file(s) in %s had no journal row (a lost or restored journal?); moved back into the "
            "inbox to go through again: %s",
            len(adopted),
            ctx.processing_dir,
            ", ".join(display_name(os.fsencode(t.relative_to(inbox))) for t in adopted[:20])
            + (" ..." if len(adopted) > 20 else ""),
        )
    return adopted


def _drop_leftover_names(ctx: Context, names: list[bytes]) -> list[bytes]:
    """Remove processing/ names of done or failed rows that are a second name of the very file in
    done/ or failed/ (same device and inode): the move's unlink is not fsynced (``placing``), so a
    power failure can bring it back. Nothing is lost by removing it; anything else under such a name
    (another file, a copy) is adopted like any orphan. Returns the names left to adopt."""
    finished = ctx.journal.finished_claims(names) if names else {}
    removed = []
    for name, row in finished.items():
        source = ctx.processing_dir / os.fsdecode(name)
        if row.final_path is None or not same_file(source, Path(os.fsdecode(row.final_path))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(source)
        removed.append(name)
        log.info(
            "%s: removed its leftover name %s in %s (the file is in %s)",
            row.display_path,
            display_name(name),
            ctx.processing_dir,
            export_display(row.final_path, ctx.config.folders.done),
        )
    if removed:
        fsync_dir(ctx.processing_dir)
    gone = set(removed)
    return [n for n in names if n not in gone]
