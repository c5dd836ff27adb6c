"""Folders below a root, reached by descriptor and never through a symbolic link.

done/ and failed/ may be writable by others (a scanner group, an admin's script): any name in them
may be a planted symbolic link, to a victim file or to the journal, and any subfolder may be one.
So every write or move into them starts from a descriptor of the folder's root (its configured
path, followed as the admin gave it) and opens each folder below it with ``O_NOFOLLOW |
O_DIRECTORY``, creating what is missing below the root with ``mkdirat`` (never the root itself:
a share unmounted leaves a bare mountpoint, which nothing may be written into); the last step
is an ``*at`` call on that descriptor. A symbolic link or a file where a folder should be raises ``FolderInTheWay`` (a
``FileExistsError``: a placement then picks another name); nothing is written through it.

``descend`` is the one walk down through folders by descriptor: ``open_folder`` starts it at an
output root, ``long_paths`` at ``/`` (or ``.``) for a path longer than PATH_MAX.

Temporary files get a new random name each (``O_CREAT | O_EXCL | O_NOFOLLOW``): nothing can be
planted at a name nobody knows beforehand, and an existing entry is never opened. A crash may
leave one behind; ``StaleTemps`` removes those of the daemon's own user, an hour after they were
last written, from the folders it writes into.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path

O_PATH = getattr(os, "O_PATH", os.O_RDONLY)  # search permission suffices to walk through a folder
SEARCH = O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a folder to list or fsync
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
TEMP_PREFIX, TEMP_SUFFIX = ".konfuzio-watch-", ".tmp"
STALE_TEMP_S = 3600.0  # a temporary file not written for this long is a crash's leftover
_SWEPT_MAX = 10_000  # folders remembered as swept; beyond, they are swept again (harmless)


class FolderInTheWay(FileExistsError):
    """A symbolic link or a file (not a folder) where the path needs a folder: never followed."""


def relative_parts(root: Path, path: Path) -> tuple[str, ...]:
    """The components of ``path`` below ``root``; ValueError for a path outside it or one with ``..``."""
    parts = path.relative_to(root).parts
    if ".." in parts:
        raise ValueError(f"{path} leaves {root}")
    return parts


def open_folder(root: Path, folder: Path, *, create: bool = False) -> int:
    """A descriptor of ``folder`` (``root`` or below it), opened one component at a time from
    ``root`` without following a symbolic link; with ``create``, missing folders below ``root`` are
    made. ``root`` itself is never made: the daemon makes its folders at start-up, and one missing
    now is a share that went away (its bare mountpoint must stay empty). Readable where permitted,
    so that it can be fsynced and listed."""
    parts = relative_parts(root, folder)
    fd = _open_readable(root)  # the configured folder, followed as the admin gave it (a link to a share is theirs)
    try:
        return descend(fd, parts, last_flags=READ, or_else=SEARCH, create=create)
    except NotAFolder as exc:
        where = root.joinpath(*parts[: exc.depth + 1])
        raise FolderInTheWay(
            errno.EEXIST, "not a folder (a symbolic link, or a file); not followed", str(where)
        ) from None


class NotAFolder(OSError):
    """``descend`` met a symbolic link or a file where a folder should be, and did not follow it.
    ``depth``: its index in the parts; ``is_link``: a symbolic link; ``original``: the kernel's
    error (ELOOP or ENOTDIR). Callers turn it into their own error."""

    def __init__(self, original: OSError, depth: int, is_link: bool):
        super().__init__(original.errno, original.strerror, original.filename)
        self.original, self.depth, self.is_link = original, depth, is_link


def descend(
    fd: int, parts: Sequence[str], *, last_flags: int = SEARCH, or_else: int | None = None, create: bool = False
) -> int:
    """The one walk down through folders by descriptor: open ``parts`` one below the other from the
    folder ``fd``, each relative to the one before with ``O_NOFOLLOW | O_DIRECTORY``. ``fd`` is
    handed over: closed on the way (or on an error), returned itself for no parts.

    ``last_flags`` open the last component (``or_else``: the flags to fall back to where those are
    refused, e.g. a folder that may be entered but not listed); with ``create``, a missing folder
    is made (``mkdirat``). A symbolic link or a file on the way raises ``NotAFolder``."""
    try:
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            step = _enter(fd, part, depth, last_flags if last else SEARCH, or_else if last else None, create)
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_readable(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:  # may be entered, not listed: it cannot be fsynced
        return os.open(path, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _enter(fd: int, part: str, depth: int, flags: int, or_else: int | None, create: bool) -> int:
    try:
        return _open_dir(fd, part, depth, flags, or_else)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # made meanwhile, or a dangling link: opened below, never followed
        os.mkdir(part, 0o777, dir_fd=fd)
    return _open_dir(fd, part, depth, flags, or_else)


def _open_dir(fd: int, part: str, depth: int, flags: int, or_else: int | None) -> int:
    try:
        return os.open(part, flags, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotAFolder(exc, depth, _is_symlink(part, fd)) from None
        if exc.errno == errno.EACCES and or_else is not None:
            return _open_dir(fd, part, depth, or_else, None)
        raise


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def lexists_at(dir_fd: int, name: str) -> bool:
    """Is there an entry (of any kind, a dangling link included) by that name in the folder? Only
    ENOENT and ENOTDIR say no: any other error (EIO from a share that is away) is raised, never
    taken for a free name (on a share without hard links a name is taken by a rename, which replaces)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def create_temp(dir_fd: int) -> tuple[int, str]:
    """A new, empty file under a random hidden name in the folder: (descriptor for writing, name)."""
    for _ in range(100):
        name = temp_name()
        try:
            return os.open(name, _NEW_FILE, 0o666, dir_fd=dir_fd), name
        except FileExistsError:
            continue  # someone's entry by that name (a 64-bit chance): left as it is, another name
    raise FileExistsError(errno.EEXIST, "no free temporary name after 100 tries")


def temp_name() -> str:
    return f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"


def unlink_at(dir_fd: int, name: str) -> None:
    """Remove a name from the folder if it is there (``unlink`` never follows a link)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def fsync_fd(fd: int) -> None:
    """fsync a folder's descriptor; one opened for search only (no read permission) cannot be."""
    with contextlib.suppress(OSError):
        os.fsync(fd)


def remove_stale_temps(dir_fd: int, now: float, older_than_s: float = STALE_TEMP_S) -> list[str]:
    """Remove temporary files a crash left in the folder: regular files of this user, named like
    ours, not written for ``older_than_s``. Links, folders and other users' files stay. Returns the
    names removed."""
    removed = []
    with os.scandir(dir_fd) as entries:  # scans a duplicate of the descriptor
        names = [e.name for e in entries if e.name.startswith(TEMP_PREFIX) and e.name.endswith(TEMP_SUFFIX)]
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mtime < now - older_than_s:
            unlink_at(dir_fd, name)
            removed.append(name)
    return removed


class StaleTemps:
    """Sweeps each folder a temporary file is made in at most once every ``STALE_TEMP_S``, so a
    leftover goes within two hours when the daemon writes there again; never a folder's listing
    per file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._swept: dict[str, float] = {}  # folder -> when (monotonic)

    def sweep(self, dir_fd: int, folder: Path) -> None:
        key, at = str(folder), time.monotonic()
        with self._lock:
            last = self._swept.get(key)
            if last is not None and at - last < STALE_TEMP_S:
                return
            if len(self._swept) >= _SWEPT_MAX:
                self._swept.clear()
            self._swept[key] = at
        with contextlib.suppress(OSError):  # a folder that cannot be listed keeps its leftovers
            remove_stale_temps(dir_fd, time.time())
