"""No-clobber placement into done/ and failed/: the sidecar JSON (and the searchable PDF) first,
then the file from processing/ next to them, never overwriting anything that is not ours.

Choosing a free name in done/ or failed/ and taking it is one step for files with the same relative
path (two workers may place two "scan.pdf" at once). Files with other paths are placed in parallel:
their fsyncs overlap. Should two of them still pick one name (a.pdf's "a (2).pdf" and a file named
so), the no-clobber link lets one of them have it and the other picks the next free name.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import changes, export
from .dirfd import FolderInTheWay
from .files import (
    NotRegularFile,
    free_target,
    fsync_dir,
    lstat_below,
    move_no_clobber,
    open_regular_file,
    replace_file,
    sidecar_for,
    unlink_below,
    write_json_no_clobber,
)
from .journal import Row, State
from .long_paths import fits_path_max, shortened_name
from .policy import Scope, Step
from .shares import is_share_error
from .states import Stage
from .steps.context import Context, Outcome

log = logging.getLogger("konfuzio_watch")

OCR_PDF_SUFFIX = ".ocr.pdf"  # done/<name>.ocr.pdf next to done/<name> and done/<name>.json
# The file changed while it was placed in done/ (what changed): the caller takes it back (``export``).
TakeBack = Callable[[Row, Path, str], Outcome]


def place(
    ctx: Context,
    row: Row,
    folder: Path,
    suffix: str,
    sidecar: dict[str, Any],
    is_ours: Callable[[dict], bool],
    final_state: State,
    step: Step,
    **done: Any,
) -> Outcome:
    """Write the sidecar JSON, then move the file next to it; both never overwrite."""
    # One lock per target folder and path (case-folded, for a share that ignores case).
    with ctx.placing_locks.hold((str(folder), str(done.get("rel_path") or row.rel_fspath).casefold())):
        return _place_locked(ctx, row, folder, suffix, sidecar, is_ours, final_state, step, **done)


def _place_locked(
    ctx: Context,
    row: Row,
    folder: Path,
    suffix: str,
    sidecar: dict[str, Any],
    is_ours: Callable[[dict], bool],
    final_state: State,
    step: Step,
    *,
    rel_path: str | None = None,
    pdf: Path | None = None,
    done_fields: dict[str, Any] | None = None,
    checked_at: float | None = None,
    take_back: TakeBack | None = None,
) -> Outcome:
    """``rel_path``: where in ``folder`` (default: the inbox's path); ``pdf``: a downloaded searchable
    PDF to place next to it first; ``done_fields``: recorded with the final move; ``take_back``: what
    to do when the file changed while it was placed in done/."""
    source = ctx.processing_path(row)
    suffixes = (suffix, OCR_PDF_SUFFIX) if pdf is not None else (suffix,)
    if final_state == State.DONE:
        sidecar = with_pdf_name(sidecar, None)
    for _ in range(5):
        try:
            ctx.folders.check(folder)  # there, on the file system it was on: never a bare mountpoint
            if row.final_path is None or not Path(os.fsdecode(row.final_path)).is_relative_to(folder):
                target = _free_target(ctx, folder, row, suffixes, rel_path)
                row = ctx.journal.update(row, ctx.clock.now(), final_path=os.fsencode(target))
            target = Path(os.fsdecode(row.final_path))
            # Gone only if proven: ENOENT from folders that answer as themselves (``shares``).
            gone = ctx.folders.is_absent(source, ctx.processing_dir) and ctx.folders.is_absent_below(folder, target)
        except OSError as exc:
            return _placing_failed(ctx, row, step, folder, exc, final_state, sidecar, checked_at)
        if gone and final_state == State.DONE:  # never report done what is not there
            return ctx.fail(
                row,
                f"the file vanished from {ctx.processing_dir} before it was placed in "
                f"{folder}; its result was not kept (document {row.document_id})",
                stage=Stage.VANISHED,
            )
        placed_pdf = None
        try:
            if pdf is not None:  # first: the JSON says where it is, and the original comes last
                pdf_path = sidecar_for(target, OCR_PDF_SUFFIX)
                if _place_pdf(pdf, pdf_path, sidecar_for(target, suffix), is_ours, folder):
                    placed_pdf = pdf_path
                sidecar = with_pdf_name(sidecar, pdf_path.name)
            # The JSON's name is made durable by the one fsync of the folder that the move of the
            # file next to it makes before the source goes (``move_into_place``).
            body = write_json_no_clobber(sidecar_for(target, suffix), sidecar, is_ours, root=folder, sync_dir=gone)
            changed = None if gone else _move_checked(ctx, row, target, final_state)
        except FileExistsError as exc:
            if placed_pdf is not None:  # ours, placed a moment ago: it goes with us to the next name
                replace_file(placed_pdf, pdf, root=folder)  # type: ignore[arg-type]
            if isinstance(exc, FolderInTheWay):
                log.warning(
                    "%s: %s is %s; the file goes elsewhere in %s", row.display_path, exc.filename, exc.strerror, folder
                )
            row = ctx.journal.update(row, ctx.clock.now(), final_path=None)
            continue  # someone else's file took the name: pick another
        except OSError as exc:
            return _placing_failed(ctx, row, step, folder, exc, final_state, sidecar, checked_at)
        if changed:
            assert take_back is not None
            return take_back(row, target, changed)
        ctx.gates[Scope.OUTPUT].open(ctx.clock.now())
        # ``done`` is not durable when it returns: the result and the file are durable in done/
        # before it is committed, and nothing outside acts on it; lost in a power failure, the row
        # is ``exporting`` with its durable final_path, and the export runs again: the JSON (ours)
        # is rewritten, the file is found in place (a name of it left in processing/ is unlinked).
        # ``failed`` stays durable (its notification goes out at once). A callback that came in
        # after the details were fetched (``checked_at``: a review may have beaten the export)
        # makes the done row due for a second look, in the same transaction (then durable).
        armed = {"refresh_if_called_back_since": checked_at} if final_state == State.DONE else {}
        # The deliveries the move causes (``delivery.py``), in its transaction; none configured: none.
        caused = (
            ctx.deliveries.placed(row, final_state, sidecar_for(target, suffix), target, body)
            if ctx.deliveries is not None
            else ()
        )
        moved = ctx.move(
            row,
            final_state,
            durable=final_state != State.DONE,
            next_at=None,
            **armed,
            **(done_fields or {}),
            **({"deliveries": caused} if caused else {}),
        )
        if caused:
            ctx.deliveries.wake()  # type: ignore[union-attr]
        return moved
    raise RuntimeError(f"{row.display_path}: no free name in {folder}")


def _placing_failed(
    ctx: Context,
    row: Row,
    step: Step,
    folder: Path,
    exc: OSError,
    final_state: State,
    sidecar: dict[str, Any],
    checked_at: float | None,
) -> Outcome:
    """A placement that failed: as any write into the output folders (``Context.output_failed``); a
    result that a share kept from being placed is kept until it can be."""
    if is_share_error(exc) and final_state == State.DONE:
        ctx.kept.keep_if_possible(row, sidecar, checked_at)
    return ctx.output_failed(row, step, folder, exc)


def _place_pdf(staged: Path, target: Path, json_path: Path, is_ours: Callable[[dict], bool], root: Path) -> bool:
    """Give the downloaded PDF its name next to the file, never replacing another file; True if
    it was moved there. A PDF already there is ours if it has the same bytes, or if the JSON next
    to it is ours (an earlier try of this export got that far); else ``FileExistsError``."""
    try:
        move_no_clobber(staged, target, src_root=root, dst_root=root)
        return True
    except FolderInTheWay:
        raise
    except FileExistsError:
        if has_content(target, sha256_of_file(staged), root):
            return False
        existing = read_json(json_path, root)
        if existing is None or not is_ours(existing):
            raise
    replace_file(staged, target, root=root, sync_dir=True)
    return True


def _free_target(ctx: Context, folder: Path, row: Row, suffixes: tuple[str, ...], rel_path: str | None = None) -> Path:
    """``folder/<its path>`` (or ``name (2).pdf``), free for the file and each of its sidecars; in
    failed/, a path too long for the file system becomes a short unique name (the error report
    keeps the whole path). A folder on the path that is a symbolic link (or a file) is gone
    around (``sub (2)/``), never followed, and the log says so."""
    wanted = rel_path or row.rel_fspath
    target = free_target(folder, wanted, suffixes)
    _say_if_gone_around(row, folder, Path(wanted), target)
    suffix = suffixes[0]
    if folder == ctx.config.folders.failed and (
        Stage.of(row.stage) is Stage.TOO_LONG or not fits_path_max(sidecar_for(target, suffix))
    ):
        target = free_target(folder, shortened_name(row.rel_path, suffix), suffixes)
    return target


def _say_if_gone_around(row: Row, folder: Path, wanted: Path, target: Path) -> None:
    chosen = target.relative_to(folder).parts
    for index, part in enumerate(wanted.parts[:-1]):
        if chosen[index] != part:
            log.warning(
                "%s: %s is not a folder (a symbolic link, or a file); not followed: the file goes into %s",
                row.display_path,
                folder.joinpath(*wanted.parts[: index + 1]),
                target.parent,
            )
            return


def _move_checked(ctx: Context, row: Row, target: Path, final_state: State) -> str | None:
    """Move the file into place. Into done/: only if it is still the file that was uploaded (the
    export took its time, and its writer may have gone on), and checked again once there; returns
    what changed (then the caller takes it back), else None."""
    if final_state != State.DONE:
        move_into_place(ctx, row, target)
        return None
    changed = changed_since_upload(ctx, row)
    if changed is None:
        move_into_place(ctx, row, target)
        changed = _placed_file_changed(ctx, row, target)
    return changed


def move_into_place(ctx: Context, row: Row, target: Path) -> None:
    """Move the file from processing/ to ``target`` (no link below done/ or failed/ followed); the
    target's folder (which holds its JSON, written just before) is fsynced before the source is
    unlinked."""
    root = ctx.root_of(target)
    source = ctx.processing_path(row)
    if ctx.folders.is_absent(source, ctx.processing_dir):
        fsync_dir(target.parent, root=root)  # moved before a crash (the caller checked that one of the two exists)
        return
    try:
        found: os.stat_result | None = lstat_below(root, target)
    except (FileNotFoundError, NotADirectoryError, FolderInTheWay):
        found = None  # (any other error, a share's, is the placement's)
    linked = found is not None and _same_stat(found, source)
    if found is not None and (linked or has_content(target, row.sha256, root)):
        fsync_dir(target.parent, root=root)  # moved before a crash that came before the source was unlinked
        os.unlink(source)
        if not linked:
            fsync_dir(source.parent)
        return
    # The unlink from processing/ is not fsynced when the move was a hard link: a power failure may
    # bring that name back, a second name of the file now in done/ (or failed/), which start-up
    # recognises by its inode and removes (``recovery``), never adopts.
    move_no_clobber(source, target, src_root=ctx.processing_dir, dst_root=root, sync_unlink=False)


def changed_since_upload(ctx: Context, row: Row) -> str | None:
    """Is the file in processing/ still the one that was uploaded? Its size, mtime and inode; and if
    its ctime moved (a rewrite that kept the size and put the mtime back, or only a link or chmod),
    or on a mount whose stat cannot tell (``stat_is_blind``), its content against the uploaded
    sha256 (``changes``)."""
    path = ctx.processing_path(row)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None  # gone, or a share away: placing it proves which (any other error is raised)
    same_inode = ctx.node.is_claimed_file(st, row) is not False
    changed = changes.change_since_upload(row, st, same_inode=same_inode)
    compare = ctx.stat_is_blind or changes.ctime_moved(row, st)
    if changed is None and compare and changes.content_differs(path, row.sha256):
        changed = "it was rewritten (same size and modification time)"
    return changed


def _placed_file_changed(ctx: Context, row: Row, target: Path) -> str | None:
    """Is the file just placed in done/ the one its result describes? Its ctime is the daemon's own
    now (the link and the unlink): size, mtime and inode tell; a copy (done/ on another file system)
    is compared by content."""
    root = ctx.root_of(target)
    try:
        st = lstat_below(root, target)
    except OSError as exc:
        if is_share_error(exc):  # looked at again when the placement is tried again
            raise
        return None  # taken out of done/ at once (or its folder replaced): nothing placed to be wrong
    if row.file_ino is not None and not ctx.folders.inodes_are_stable(ctx.processing_dir):
        same_inode = st.st_dev == ctx.folders.device_of(ctx.processing_dir)  # renamed on FUSE, or a copy
    else:  # unknown: a copy
        same_inode = row.file_ino is not None and ctx.node.is_claimed_file(st, row)
    changed = changes.placed_change(row, st, same_inode=same_inode)
    if changed is None and not same_inode and changes.content_differs(target, row.sha256, root=root):
        changed = "it was rewritten"
    return changed


def remove_own_result(ctx: Context, row: Row) -> None:
    """Take this row's result (and the searchable PDF it names) out of done/, if it is there and ours
    (reached without following a link; a link by those names is removed, never followed)."""
    if row.final_path is None:
        return
    target = Path(os.fsdecode(row.final_path))
    root = ctx.root_of(target)
    json_path, pdf_path = sidecar_for(target, export.RESULT_SUFFIX), sidecar_for(target, OCR_PDF_SUFFIX)
    found = read_json(json_path, root)
    if found is None or not export.result_is_for(row, found):
        return
    names = [pdf_path.name] if found.get("searchable_pdf") == pdf_path.name else []
    unlink_below(root, target.parent, [*names, json_path.name])


class KeyedLocks:
    """A re-entrant lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Any, list[Any]] = {}  # key -> [RLock, holders and waiters]

    @contextmanager
    def hold(self, key: Any) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.RLock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]


# -- files below the output folders ----------------------------------------------------------------


def with_pdf_name(result: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The result with ``searchable_pdf`` (the PDF's file name next to it, or None) after ``web_url``."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if key != "searchable_pdf":
            out[key] = value
        if key == "web_url":
            out["searchable_pdf"] = name
    out.setdefault("searchable_pdf", name)
    return out


def read_json(path: Path, root: Path) -> dict[str, Any] | None:
    """A JSON object from a regular file below ``root`` (no link followed), or None (missing,
    unreadable, not an object)."""
    try:
        fd, _ = open_regular_file(path, root=root)
        with os.fdopen(fd, "rb") as f:
            found = json.loads(f.read())
    except OSError as exc:
        if is_share_error(exc):  # not an answer about the file
            raise
        return None
    except (ValueError, NotRegularFile):
        return None
    return found if isinstance(found, dict) else None


def sha256_of_file(path: Path, root: Path | None = None) -> str | None:
    """The content's sha256 of a regular file (below ``root``, no link followed), or None. A share's
    error is raised: it is not an answer about the file."""
    try:
        fd, _ = open_regular_file(path, root=root)
    except OSError as exc:
        if is_share_error(exc):
            raise
        return None
    except NotRegularFile:
        return None
    with os.fdopen(fd, "rb") as f:
        return changes.sha256_of(f)[0]


def has_content(path: Path, sha256: str | None, root: Path) -> bool:
    """Is ``path`` (below ``root``, no link followed) a regular file with exactly this content (a
    cross-device copy of ours)?"""
    return sha256 is not None and sha256_of_file(path, root) == sha256


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror or exc)


def same_file(a: Path, b: Path) -> bool:
    """Are ``a`` and ``b`` (not followed) one file? A share's error is raised, never taken for "no"."""
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError as exc:
        if is_share_error(exc):
            raise
        return False


def _same_stat(found: os.stat_result, path: Path) -> bool:
    """Is ``path`` (not followed) the file ``found`` describes?"""
    try:
        return os.path.samestat(found, os.lstat(path))
    except OSError:
        return False
