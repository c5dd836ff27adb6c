"""Folders on shares that stop answering, and the proof that a file is gone.

On a network or FUSE file system (an SMB share mounted through smbnetfs or cifs, NFS ...) a server
that is away makes calls fail with EIO, ENOTCONN, EHOSTDOWN, ESTALE and their kind, and
``os.path.exists``/``lexists`` answer False for them. None of that says that a file is gone: the
work on the shares pauses as one blocked episode (``policy.Cause.SHARE_UNAVAILABLE``, the
``Scope.SHARES`` gate) until a look at the folders (``Folders.look_all``) finds them answering.

A share lazily unmounted leaves its bare mountpoint on the local disk: a configured folder below it
is missing then (every file in it answers ENOENT), and a configured folder that is itself the
mountpoint is an empty folder of another file system. So a configured folder answers only as
itself: it can be stat'ed and listed, and it is on the file system it was on at start-up (its
device number; a remount of the same share - the same mount point, type and source - has a new
one, which is taken). Only then is an ENOENT for a file in it a proof that the file is gone
(``Folders.is_absent``).

The daemon makes the configured folders at start-up only; nothing at run time makes them, or their
parents, again (``dirfd.open_folder`` never creates its root): nothing is written into a bare
mountpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import mounts
from .dirfd import FolderInTheWay
from .files import lstat_below
from .long_paths import lstat_any

log = logging.getLogger("konfuzio_watch")

# The server (or the way to it) is away, or the mount is: not a verdict on any file.
SHARE_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ENOTCONN,
        errno.ESTALE,
        errno.EBUSY,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENETRESET,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ENODEV,
        errno.ENXIO,
        errno.ENOLINK,
        errno.ECOMM,
        errno.EREMOTEIO,
        errno.ENOMEDIUM,
        errno.ESHUTDOWN,
    }
)
ABSENT_ERRNOS = (errno.ENOENT, errno.ENOTDIR)


class ShareUnavailable(OSError):
    """A configured folder is missing, or is not on the file system it was on (a bare mountpoint)."""


def is_share_error(exc: BaseException) -> bool:
    """Does this error say that a share (or the mount of it) does not answer, rather than anything
    about a file?"""
    return isinstance(exc, ShareUnavailable) or (isinstance(exc, OSError) and exc.errno in SHARE_ERRNOS)


def caused_by_share_error(exc: BaseException) -> bool:
    """Is a share's error behind this one (requests wraps an error reading the upload's body into a
    ``ConnectionError``, and the client into an ``ApiError``)?"""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        found = todo.pop()
        if found is None or id(found) in seen or len(seen) > 20:
            continue
        seen.add(id(found))
        if is_share_error(found):
            return True
        todo += [found.__cause__, found.__context__, *(a for a in found.args if isinstance(a, BaseException))]
    return False


@dataclass(frozen=True)
class _Identity:
    device: int
    mount: mounts.Mount | None  # None where /proc does not say


class Folders:
    """The configured folders the files live in (the inbox, the processing folder, done/, failed/) and
    the file system each was on at start-up. Thread-safe: steps on worker threads ask it."""

    def __init__(self, folders: Iterable[Path]):
        self._lock = threading.Lock()
        self._known: dict[Path, _Identity] = {}
        for folder in folders:
            try:
                self._known[folder] = _Identity(os.stat(folder).st_dev, mounts.mount_of(folder))
            except OSError:
                continue  # (a test's pipeline without its folders) the first look that finds it records it

    @property
    def folders(self) -> list[Path]:
        return list(self._known)

    def device_of(self, folder: Path) -> int | None:
        """The device ``folder`` was last seen answering on (its share's current mount)."""
        known = self._known.get(folder)
        return known.device if known is not None else None

    def inodes_are_stable(self, folder: Path) -> bool:
        """Do inode numbers in ``folder`` name files? Not on FUSE (smbnetfs, sshfs ...): it numbers the
        files it is asked about itself, afresh after the server reconnected or a remount."""
        known = self._known.get(folder)
        return known is None or known.mount is None or known.mount.fs_type.split(".", 1)[0] != "fuse"

    def root_of(self, path: Path) -> Path:
        """The configured folder ``path`` is in (the deepest that holds it), else its own folder."""
        found = [f for f in self._known if path == f or path.is_relative_to(f)]
        return max(found, key=lambda f: len(f.parts)) if found else path.parent

    def check(self, folder: Path) -> None:
        """One stat: is ``folder`` there and on the file system it was on? Before a write into it (a
        bare mountpoint is a folder too). ``ShareUnavailable`` if not; a share's error as it comes."""
        self._verify(folder, self._stat(folder))

    def look(self, folder: Path) -> None:
        """Does ``folder`` answer as itself: stat'ed, listed (its first entries read) and on the file
        system it was on? Raises ``ShareUnavailable`` or the share's error if not. A folder this
        daemon may enter but not list answered all the same."""
        st = self._stat(folder)
        try:
            with os.scandir(folder) as entries:
                next(entries, None)
        except OSError as exc:
            if is_share_error(exc) or exc.errno in ABSENT_ERRNOS:
                raise
        self._verify(folder, st)

    def look_all(self) -> None:
        """The shares' probe: every configured folder answers as itself."""
        for folder in self.folders:
            self.look(folder)

    def is_absent(self, path: Path, folder: Path | None = None) -> bool:
        """Is nothing at ``path`` (not followed), proven: its lstat answers ENOENT or ENOTDIR, and the
        configured folder it is in (``folder``, default: the one that holds it) answers as itself.
        Any other error, and an ENOENT from a folder that does not answer, is raised."""
        try:
            lstat_any(path)
        except OSError as exc:
            if exc.errno not in ABSENT_ERRNOS:
                raise
            self.look(folder or self.root_of(path))
            return True
        return False

    def is_absent_below(self, root: Path, path: Path) -> bool:
        """``is_absent`` for a path below ``root`` reached without following a link: a link or a file
        where a folder should be means nothing is there (a placement goes around it)."""
        try:
            lstat_below(root, path)
        except FolderInTheWay:
            return True
        except OSError as exc:
            if exc.errno not in ABSENT_ERRNOS:
                raise
            self.look(root)
            return True
        return False

    @staticmethod
    def _stat(folder: Path) -> os.stat_result:
        try:
            return os.stat(folder)
        except OSError as exc:
            if exc.errno in ABSENT_ERRNOS:
                raise ShareUnavailable(
                    exc.errno, "the folder is not there (an unmounted share?)", str(folder)
                ) from None
            raise

    def _verify(self, folder: Path, st: os.stat_result) -> None:
        with self._lock:
            known = self._known.get(folder)
            if known is None:
                self._known[folder] = _Identity(st.st_dev, mounts.mount_of(folder))
                return
            if st.st_dev == known.device:
                return
        mount = mounts.mount_of(folder)
        if known.mount is None or mount is None or not _same_mount(mount, known.mount):
            was = known.mount.describe() if known.mount is not None else f"device {known.device}"
            raise ShareUnavailable(
                errno.ENODEV,
                f"the folder is not on the file system it was on ({was}); an unmounted share?",
                str(folder),
            )
        with self._lock:
            self._known[folder] = _Identity(st.st_dev, known.mount)
        log.info("%s is on %s again, mounted anew", folder, known.mount.describe())


def _same_mount(a: mounts.Mount, b: mounts.Mount) -> bool:
    return (a.point, a.fs_type, a.source) == (b.point, b.fs_type, b.source)
