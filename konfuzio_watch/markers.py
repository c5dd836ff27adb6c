"""The running daemon's look at its markers: the inbox's and the processing folder's lock (``locks.py``).

Anyone who may write the inbox may remove its marker, and an inbox renamed and made again has none:
then nothing kept a second daemon out. Every ``MARKERS_EVERY_S`` the loop asks ``MarkerKeeper.tend``
whether each path still names the file whose descriptor the daemon holds. A marker removed or
replaced is taken again and rewritten (one WARNING); one that another running daemon took (its name
in it) stops this daemon (``lost``); one held by a process that wrote no name into it is a daemon
starting, waited out (see the module doc of ``locks.py``).

Two consequences of a folder renamed away are mended on the way: an inbox that is a new folder is
watched anew (``on_new_inbox``), and a processing folder moved away with the inbox it was in
(``<inbox>/.konfuzio-watch/processing``) gives its files back to the one made again under its path,
where their journal rows look for them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import processing
from .files import move_no_clobber
from .journal import display_name
from .locks import FolderLock, LockHeld

log = logging.getLogger("konfuzio_watch")

MARKERS_EVERY_S = 2.0  # how often the loop looks at the markers
MARKER_TAKEN_GRACE_S = 10.0  # a daemon starting holds a marker it has not written yet about this long at most


class MarkerKeeper:
    """The inbox's marker (None: a node of a cluster before it joined) and the processing folder's lock
    of one running daemon. ``on_lost(reason)``: another daemon took one, stop; ``on_new_inbox(now)``:
    the inbox's path names another folder now."""

    def __init__(self, inbox_lock: FolderLock | None, processing_lock: FolderLock, *, inbox: Path,
                 on_lost: Callable[[str], None], on_new_inbox: Callable[[float], None]):
        self.inbox_lock = inbox_lock
        self.processing_lock = processing_lock
        self.inbox = inbox
        self.on_lost = on_lost
        self.on_new_inbox = on_new_inbox
        self.lost: str | None = None  # why this daemon stopped: another one took a marker it held
        self._inbox_id = _identity(inbox)
        self._taken_at: dict[str, float] = {}  # a marker's path -> when another process was first seen on it
        self._trouble: dict[str, str] = {}  # a marker's path -> why it could not be taken again ("said: …")

    def holds_processing_dir(self) -> bool:
        """The processing folder's path still names the folder whose lock this daemon holds."""
        return self.processing_lock.file.in_place()

    def tend(self, now: float) -> None:
        for lock in (self.inbox_lock, self.processing_lock):
            if lock is not None and self.lost is None:
                self._tend(lock, now)

    def _tend(self, lock: FolderLock, now: float) -> None:
        key = str(lock.file.path)
        if lock.file.in_place():
            self._taken_at.pop(key, None)
            self._trouble.pop(key, None)
            return
        was = lock.file.where()
        try:
            if lock is self.processing_lock:
                processing.prepare(lock.folder, self.inbox)  # removed or moved away: made again
            lock.verify()
        except LockHeld as exc:
            self._held(lock, exc, now)
            return
        except (OSError, processing.ProcessingDirError) as exc:
            self._cannot(key, str(exc) if isinstance(exc, processing.ProcessingDirError) else exc.strerror or str(exc))
            return
        self._taken_at.pop(key, None)
        self._trouble.pop(key, None)
        if lock is self.processing_lock:
            moved = self._bring_back(Path(was).parent)
            log.warning("the lock %s of the processing folder was removed or replaced while this daemon ran (the one "
                        "it held is now %s); it holds it again%s", key, was,
                        f", and moved the {moved} file(s) in flight back from {Path(was).parent}" if moved else "")
            return
        log.warning("the inbox's marker %s was removed or replaced (by an inbox writer, or the inbox was renamed and "
                    "recreated) while this daemon ran; it holds it again", key)
        found = _identity(self.inbox)
        if found is not None and found != self._inbox_id:
            self._inbox_id = found
            self.on_new_inbox(now)

    def _cannot(self, key: str, reason: str) -> None:
        """Said on the second look: an inbox renamed and made again is missing for a moment."""
        if self._trouble.get(key) == reason:
            self._trouble[key] = f"said: {reason}"
            log.warning("%s was removed or replaced while this daemon ran, and cannot be made again: %s; trying again "
                        "every %g s", key, reason, MARKERS_EVERY_S)
        elif self._trouble.get(key) != f"said: {reason}":
            self._trouble[key] = reason

    def _held(self, lock: FolderLock, held: LockHeld, now: float) -> None:
        """Another process holds the new marker. One that wrote its name into it runs on this inbox: this
        daemon stops, loudly (a non-zero exit; restarted, it refuses while the other runs). One that did
        not is a daemon starting, which writes it only once it holds its processing folder's lock: it
        refuses in a moment if that folder is this daemon's (stopping now would let it take the files in
        flight there); said once if it takes longer. A node of this daemon's own cluster is waited for."""
        key = str(lock.file.path)
        holder = held.holder
        ours = holder is not None and lock.cluster_id is not None and holder.cluster_id == lock.cluster_id
        if holder is not None and holder.is_another_process() and not ours:
            self.lost = str(held)
            log.error("%s was removed or replaced while this daemon ran, and now %s: stopping", key, held)
            self.on_lost(self.lost)
            return
        since = self._taken_at.setdefault(key, now)
        if now - since >= MARKER_TAKEN_GRACE_S and self._trouble.get(key) != "said: held":
            self._trouble[key] = "said: held"
            log.warning("%s was removed or replaced while this daemon ran, and another process holds the new one "
                        "without saying who it is (for %.0f s now); this daemon goes on and takes it as soon as it "
                        "is free", key, now - since)

    def _bring_back(self, moved_to: Path) -> int:
        """The processing folder was moved away and made again: its files, this daemon's (it held the lock
        there), go back to where their journal rows say they are. The same file system (a rename kept the
        lock's inode): hard links, so the inodes the rows recorded stay. Returns how many."""
        here = self.processing_lock.folder
        if moved_to == here or not moved_to.is_dir():
            return 0  # the lock alone was removed (``… (deleted)``), or the folder with it
        moved = 0
        for name in processing.names(moved_to):
            try:
                move_no_clobber(moved_to / os.fsdecode(name), here / os.fsdecode(name))
            except OSError as exc:
                log.error("%s: cannot move it back from %s into the processing folder %s: %s", display_name(name),
                          moved_to, here, exc.strerror or exc)
                continue
            moved += 1
        return moved


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino
