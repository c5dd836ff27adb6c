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

Before the markers, each look asks whether the inbox is still where it was at start-up: on the same
mount (``mounts.py``: its point, type and source), and answering. A share unmounted (a lazy unmount
leaves the bare mountpoint on the local disk), mounted over, or not answering (EIO, ENOTCONN ...; a
folder merely missing on its own mount was renamed or removed: the markers' look says that) is
*away*: one ERROR,
watching pauses (``on_inbox_away``), the markers' descriptors on the share are let go (a file held
open keeps a lazily unmounted FUSE mount alive), and nothing is written there: not the markers, not
the processing folder, so nothing lands under a bare mountpoint. When the inbox is on that share
again (mounted again: a new mount, another device id), the markers are taken again, one WARNING
says so, and watching starts anew (``on_inbox_back``). A share mounted again between two looks is
found by its new mount or device id.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import processing
from .files import move_no_clobber
from .journal import display_name
from .lock_file import LockHeld
from .locks import FolderLock
from .mounts import Mount, mount_of
from .shares import Folders, is_share_error

log = logging.getLogger("konfuzio_watch")

MARKERS_EVERY_S = 2.0  # how often the loop looks at the markers
MARKER_TAKEN_GRACE_S = 10.0  # a daemon starting holds a marker it has not written yet about this long at most


@dataclass(frozen=True)
class InboxPlace:
    """Where the inbox folder is: the mount it is on (None where /proc does not say), and its device id, or
    why it cannot be looked at (missing under a bare mountpoint, EIO, ENOTCONN ...)."""

    mount: Mount | None
    device: int | None = None
    error: str | None = None
    code: int | None = None  # the errno of ``error``

    def is_on(self, other: InboxPlace) -> bool:
        """On the same share, mounted again or not: the same mount point, type and source. Without
        /proc, only a folder that cannot be looked at says that the share is away."""
        if self.mount is None or other.mount is None:
            return True
        a, b = self.mount, other.mount
        return (a.point, a.fs_type, a.source) == (b.point, b.fs_type, b.source)

    def describe(self) -> str:
        return self.mount.describe() if self.mount is not None else f"device {self.device}"


def inbox_place(inbox: Path) -> InboxPlace:
    try:
        return InboxPlace(mount_of(inbox), os.stat(inbox).st_dev)
    except OSError as exc:
        return InboxPlace(mount_of(inbox), error=exc.strerror or str(exc), code=exc.errno)


@dataclass(frozen=True)
class Away:
    """The inbox's share went away ``since`` (``reason``); watching is paused until it is back."""

    since: float
    reason: str


class MarkerKeeper:
    """The inbox's marker (None: a node of a cluster before it joined) and the processing folder's lock
    of one running daemon. ``on_lost(reason)``: another daemon took one, stop; ``on_new_inbox(now)``:
    the inbox's path names another folder now; ``on_inbox_away(reason)``: the inbox's share went away,
    pause watching; ``on_inbox_back(now)``: it is back, watch it anew and look at what it holds."""

    def __init__(
        self,
        inbox_lock: FolderLock | None,
        processing_lock: FolderLock,
        *,
        inbox: Path,
        on_lost: Callable[[str], None],
        on_new_inbox: Callable[[float], None],
        on_inbox_away: Callable[[str], None] = lambda _reason: None,
        on_inbox_back: Callable[[float], None] = lambda _now: None,
        where: Callable[[Path], InboxPlace] = inbox_place,
        folders: Folders | None = None,
    ):
        self.inbox_lock = inbox_lock
        self.folders = folders  # a marker is taken again only where the inbox answers as itself (``shares``)
        self.processing_lock = processing_lock
        self.inbox = inbox
        self.on_lost = on_lost
        self.on_new_inbox = on_new_inbox
        self.on_inbox_away = on_inbox_away
        self.on_inbox_back = on_inbox_back
        self.where = where
        self.lost: str | None = None  # why this daemon stopped: another one took a marker it held
        self.away: Away | None = None  # the inbox's share is away (and watching paused)
        self._place = self._look()
        self._inbox_id = _identity(inbox)
        self._taken_at: dict[str, float] = {}  # a marker's path -> when another process was first seen on it
        self._trouble: dict[str, str] = {}  # a marker's path -> why it could not be taken again ("said: …")

    def holds_processing_dir(self) -> bool:
        """The processing folder's path still names the folder whose lock this daemon holds."""
        return self.processing_lock.file.in_place()

    def tend(self, now: float) -> None:
        if self.lost is not None or not self._inbox_in_place(now):
            return
        for lock in (self.inbox_lock, self.processing_lock):
            if lock is not None and self.lost is None:
                try:
                    self._tend(lock, now)
                except OSError as exc:  # the inbox's share does not answer: the work on it pauses (``shares``)
                    if not is_share_error(exc):
                        raise
                    log.debug("cannot look at %s now: %s", lock.file.path, exc)

    # -- the inbox's share: away and back ---------------------------------------------------------

    def _look(self) -> InboxPlace | None:
        place = self.where(self.inbox)
        return place if place.error is None else None

    def _inbox_in_place(self, now: float) -> bool:
        """Is the inbox on the share it was on, and answering? Says when it goes away and when it is back."""
        place = self.where(self.inbox)
        if self._place is None and place.error is None:
            self._place = place
        was = self._place
        if place.error is not None:
            if was is not None and was.mount is not None and not place.is_on(was):
                self._went_away(now, f"{was.describe()} is not mounted any more ({place.error})")
            elif place.code not in (errno.ENOENT, errno.ENOTDIR):
                self._went_away(now, f"it cannot be looked at ({place.error})")
            else:  # missing on the file system it was on: renamed or removed, which the markers' look says
                return self.away is None
            return False
        assert was is not None
        if not place.is_on(was):
            self._went_away(
                now,
                f"it is on {place.describe()} now, not on {was.describe()} as at start-up (if it "
                "moved there for good, restart konfuzio-watch)",
            )
            return False
        if self.away is None and place == was:
            return True
        self._came_back(now, place)
        return self.lost is None

    def _went_away(self, now: float, reason: str) -> None:
        if self.away is not None:
            return
        self.away = Away(now, reason)
        log.error(
            "the inbox %s is away: %s; watching it is paused, and nothing is written there until it is back",
            self.inbox,
            reason,
        )
        for lock in (self.inbox_lock, self.processing_lock):
            if lock is not None:
                lock.file.close()  # a descriptor held on a lazily unmounted share keeps its mount alive
        self.on_inbox_away(reason)

    def _came_back(self, now: float, place: InboxPlace) -> None:
        """The share is mounted again (or answers again): take the markers again, then watch anew."""
        away, self.away, self._place = self.away, None, place
        self._inbox_id = _identity(self.inbox)
        for lock in (self.inbox_lock, self.processing_lock):
            if lock is None or self._in_place(lock):
                continue
            try:
                lock.verify()
            except LockHeld as exc:
                self._held(lock, exc, now)
                if self.lost is not None:
                    return
            except OSError as exc:  # looked after again at the next look (``_tend``)
                log.debug("cannot take %s again yet: %s", lock.file.path, exc.strerror or exc)
        if away is not None:
            log.warning(
                "the inbox %s is back on %s after %.0f s away: watching it again",
                self.inbox,
                place.describe(),
                max(0.0, now - away.since),
            )
        else:
            log.warning(
                "the inbox %s is back on %s, mounted again since the last look: watching it again",
                self.inbox,
                place.describe(),
            )
        self.on_inbox_back(now)

    # -- the markers ------------------------------------------------------------------------------

    @staticmethod
    def _in_place(lock: FolderLock) -> bool:
        try:
            return lock.file.in_place()
        except OSError:  # its descriptor is on a mount that is gone (ENOTCONN, ESTALE): let go, take it again
            lock.file.close()
            return False

    def _tend(self, lock: FolderLock, now: float) -> None:
        key = str(lock.file.path)
        if self._in_place(lock):
            self._taken_at.pop(key, None)
            self._trouble.pop(key, None)
            return
        if self.folders is not None:
            self.folders.look(self.inbox)  # not into a bare mountpoint, nor while the share is away
        was = lock.file.where()
        try:
            if lock is self.processing_lock:  # removed or moved away: made again, never above the inbox
                _make_again(lock.folder, self.inbox)
                processing.prepare(lock.folder, self.inbox, parents=False)
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
            moved = self._bring_back(Path(was).parent) if os.path.isabs(was) else 0  # not "nowhere" (let go)
            log.warning(
                "the lock %s of the processing folder was removed or replaced while this daemon ran (the one "
                "it held is now %s); it holds it again%s",
                key,
                was,
                f", and moved the {moved} file(s) in flight back from {Path(was).parent}" if moved else "",
            )
            return
        log.warning(
            "the inbox's marker %s was removed or replaced (by an inbox writer, or the inbox was renamed and "
            "recreated) while this daemon ran; it holds it again",
            key,
        )
        found = _identity(self.inbox)
        if found is not None and found != self._inbox_id:
            self._inbox_id = found
            self.on_new_inbox(now)

    def _cannot(self, key: str, reason: str) -> None:
        """Said on the second look: an inbox renamed and made again is missing for a moment."""
        if self._trouble.get(key) == reason:
            self._trouble[key] = f"said: {reason}"
            log.warning(
                "%s was removed or replaced while this daemon ran, and cannot be made again: %s; trying again "
                "every %g s",
                key,
                reason,
                MARKERS_EVERY_S,
            )
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
            log.warning(
                "%s was removed or replaced while this daemon ran, and another process holds the new one "
                "without saying who it is (for %.0f s now); this daemon goes on and takes it as soon as it "
                "is free",
                key,
                now - since,
            )

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
                log.error(
                    "%s: cannot move it back from %s into the processing folder %s: %s",
                    display_name(name),
                    moved_to,
                    here,
                    exc.strerror or exc,
                )
                continue
            moved += 1
        return moved


def _make_again(folder: Path, inbox: Path) -> None:
    """The processing folder, with its parents inside the inbox (``<inbox>/.konfuzio-watch/processing``), but
    never a folder above: if the inbox's share went away since the last look, those are a bare mountpoint's
    folders on the local disk, and this fails (ENOENT) instead."""
    for part in reversed([folder, *(p for p in folder.parents if inbox in p.parents)]):
        part.mkdir(mode=0o700, exist_ok=True)


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino
