"""claiming -> claimed: take files out of the inbox into the processing folder (the scheduler's
thread, in batches): the journal first, then the move, then the confirmation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .. import processing
from ..files import fsync_dir
from ..journal import IllegalTransition, NewClaim, Row, State, display_name
from ..long_paths import lstat_any, rename_any
from ..shares import is_share_error
from .context import Context

log = logging.getLogger("konfuzio_watch")


class ClaimsPaused(Exception):
    """A share did not answer while a batch was claimed: ``left`` (paths relative to the inbox) were not
    taken; the shares' gate is blocked, and they are claimed once it opens."""

    def __init__(self, left: list[bytes]):
        super().__init__(f"{len(left)} file(s) not claimed: a share does not answer")
        self.left = left


def claim(ctx: Context, rel_paths: list[bytes], detected_at: dict[bytes, float] | None = None) -> list[Row]:
    """Take files out of the inbox: journal first, then move, then confirm - one batch. A share
    that does not answer stops the batch: ``ClaimsPaused`` names the files not taken, for later."""
    if not rel_paths:
        return []
    claims: list[NewClaim] = []
    left: list[bytes] = []
    inbox = os.fsencode(ctx.config.folders.inbox)
    for index, rel in enumerate(rel_paths):
        path = os.path.join(inbox, rel)
        try:
            st = lstat_any(path)
        except OSError as exc:
            share_error = ctx.share_error_of(exc, ctx.config.folders.inbox)
            if share_error is None:
                continue  # gone since the tracker looked
            ctx.shares_blocked(share_error, f"cannot look at {display_name(rel)} in the inbox")
            left = rel_paths[index:]
            break
        claims.append(NewClaim(rel, processing.new_claim_name(rel), st.st_dev, st.st_ino, (detected_at or {}).get(rel)))
    rows = ctx.journal.add_claims(claims, ctx.clock.now()) if claims else []
    claimed = finish_claims(ctx, rows)
    if left:
        raise ClaimsPaused(left)
    return claimed


def finish_claims(ctx: Context, rows: list[Row]) -> list[Row]:
    """Move each claimed file into the processing folder under its claim name (or find it there).
    A share's error leaves a row ``claiming`` (its rename may or may not have happened): it is
    finished once the shares answer again (``probes.probe_shares``), as start-up recovery would."""
    taken, folders, waiting = [], {ctx.processing_dir}, []
    for row in rows:
        try:
            if _finish_claim(ctx, row, folders):
                taken.append(row)
        except OSError as exc:
            if not is_share_error(exc):
                raise
            waiting.append((row, exc))
    if waiting:
        with ctx.waiting_lock:
            ctx.waiting_claims.update(row.id for row, _ in waiting)
        row, exc = waiting[0]
        ctx.shares_blocked(exc, f"cannot take {row.display_path} out of the inbox")
    for folder in folders:  # the renames must be durable before the journal says "claimed"
        fsync_dir(folder)
    now = ctx.clock.now()
    # Not durable (the upload's own durable write makes it so): lost in a power failure, the row is
    # ``claiming`` again and recovery finds the file under its claim name (its inode checked).
    try:
        claimed = ctx.journal.transition_many(taken, State.CLAIMED, now, durable=False, next_at=now)
    except IllegalTransition:  # a cluster: a row was taken over meanwhile; move the others one by one
        claimed, kept = [], []
        for row in taken:
            try:
                claimed.append(ctx.journal.transition(row, State.CLAIMED, now, durable=False, next_at=now))
                kept.append(row)
            except IllegalTransition as exc:
                log.warning("%s", exc)
        taken = kept
    for old, new in zip(taken, claimed, strict=True):
        ctx.log_transition(old, new)
    ctx.journal.release_leases(r.id for r in claimed)  # any node may upload them
    return claimed


def _finish_claim(ctx: Context, row: Row, folders: set[Path]) -> bool:
    """One row's part of ``finish_claims``: True if its file is in the processing folder now;
    False if the row was discarded. A share's error is raised."""
    target = ctx.processing_path(row)
    try:
        found: os.stat_result | None = os.lstat(target)  # processing/ names are short
    except FileNotFoundError:
        found = None
    if found is not None and ctx.node.is_claimed_file(found, row) is False:
        log.error(
            "%s: %s holds another file than the one claimed; it is left to be adopted at start-up, "
            "and this file is claimed anew",
            row.display_path,
            target,
        )
        _discard(ctx, row)
        return False
    if found is not None:
        return True
    source = ctx.inbox_path(row)
    try:
        rename_any(source, target)
    except FileNotFoundError as exc:
        if ctx.node.renamed_by_another(row, target):
            return True
        for folder in (ctx.config.folders.inbox, ctx.processing_dir):
            share_error = ctx.share_error_of(exc, folder)
            if share_error is not None:  # the inbox (or the processing folder) is away: no proof of anything
                raise share_error from None
        log.info("%s: vanished from the inbox before it was claimed", row.display_path)
        _discard(ctx, row)
        return False
    except OSError as exc:  # e.g. a folder the daemon may not write to: leave it be
        if is_share_error(exc):
            raise
        log.error(
            "%s: cannot take it out of the inbox (%s); it stays there and is tried again at the next rescan",
            row.display_path,
            exc.strerror or exc,
        )
        _discard(ctx, row)
        return False
    folders.add(source.parent)
    return True


def finish_waiting_claims(ctx: Context) -> bool:
    """Finish the claims a share's error left half done; False if a share failed again."""
    with ctx.waiting_lock:
        ids, ctx.waiting_claims = ctx.waiting_claims, set()
    if not ids:
        return True
    rows = [r for r in ctx.journal.get_many(sorted(ids)) if r.state == State.CLAIMING]
    finish_claims(ctx, rows)
    with ctx.waiting_lock:
        return not ctx.waiting_claims


def _discard(ctx: Context, row: Row) -> None:
    try:
        ctx.journal.discard(row)
    except IllegalTransition as exc:  # a cluster: another node took this claim over meanwhile
        log.warning("%s", exc)
