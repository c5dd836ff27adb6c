"""Moving files without ever losing or overwriting one.

Files are only ever moved, never deleted: a move is a hard link followed by an unlink of the
source (so an existing target is never replaced), or a copy + fsync + link across file systems.

Writes and moves into a folder others may write to (done/, failed/, the inbox) take the folder as
their ``root``: everything below it is reached by descriptor and never through a symbolic link,
and temporary files get random names (``dirfd``). A planted link or a file where a folder should
be is left as it is: ``free_target`` picks a path around it, a write or move raises
``FolderInTheWay`` (a ``FileExistsError``, so the placement picks another name).

Paths longer than PATH_MAX: ``long_paths``; which names are candidates and the names files are
uploaded under: ``file_names``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .dirfd import SEARCH, StaleTemps, create_temp, fsync_fd, lexists_at, open_folder, temp_name, unlink_at
from .long_paths import fits_path_max, open_any

NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, SMB)
MAX_VARIANTS = 10_000  # "name (2).pdf" ... before giving up on a folder
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK)


def open_regular_file(path: Path, *, root: Path | None = None) -> tuple[int, os.stat_result]:
    """Open for reading without following a symlink or blocking on a FIFO; insist on a regular file.
    With ``root``, no folder between it and the file is followed either."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        if root is None:
            fd = os.open(path, flags)
        else:
            folder = open_folder(root, path.parent)
            try:
                fd = os.open(path.name, flags, dir_fd=folder)
            finally:
                os.close(folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile("a symbolic link; not followed") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(f"not a regular file ({describe_mode(st.st_mode)})")
    return fd, st


class NotRegularFile(Exception):
    """The path is a symlink, FIFO, device, socket or directory: never read or uploaded."""


def describe_mode(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def free_target(folder: Path, rel_path: str, sidecar_suffix: str | Sequence[str]) -> Path:
    """``folder/rel_path``, or ``name (2).ext``, ... such that neither it nor any of its sidecars
    (one suffix, or several: ``(".json", ".ocr.pdf")``) exists. A folder on the way that is a
    symbolic link or a file is not followed: the path goes around it (``sub (2)/name.ext``)."""
    suffixes = (sidecar_suffix,) if isinstance(sidecar_suffix, str) else tuple(sidecar_suffix)
    *folders, name = Path(rel_path).parts
    try:
        fd: int | None = open_folder(folder, folder)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        fd = None  # the write says why (any other error, a share's EIO, is raised: no name is known free)
    chosen = []
    try:
        for part in folders:
            parent, fd = fd, None
            part, fd = _enter_free_folder(parent, part)
            chosen.append(part)
        stem, suffix = _split_suffix(name)
        for n in range(1, MAX_VARIANTS):
            candidate = name if n == 1 else _fit(stem, f" ({n}){suffix}")
            names = (candidate, *(sidecar_for(Path(candidate), s).name for s in suffixes))
            if fd is None or not any(lexists_at(fd, taken) for taken in names):
                return folder.joinpath(*chosen, candidate)
    finally:
        if fd is not None:
            os.close(fd)
    raise FileExistsError(errno.EEXIST, f"no free name after {MAX_VARIANTS} tries", str(folder / rel_path))


def _enter_free_folder(fd: int | None, part: str) -> tuple[str, int | None]:
    """``part`` or ``part (2)``, ...: the first that is missing or a real folder, and a descriptor of
    it (None when missing). Consumes ``fd``."""
    if fd is None:
        return part, None
    try:
        for n in range(1, MAX_VARIANTS):
            candidate = part if n == 1 else _fit(part, f" ({n})")
            try:
                return candidate, os.open(candidate, SEARCH, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    return candidate, None  # missing (or not to be entered: the write says why)
        raise FileExistsError(errno.EEXIST, f"no free folder name after {MAX_VARIANTS} tries", part)
    finally:
        os.close(fd)


def sidecar_for(path: Path, suffix: str) -> Path:
    """``name.pdf`` -> ``name.pdf.json``; a name too long for that keeps its start plus a hash."""
    name = os.fsencode(path.name)
    if len(name) + len(suffix) <= NAME_MAX:
        return path.with_name(path.name + suffix)
    digest = hashlib.sha256(name).hexdigest()[:10]
    head = os.fsdecode(name[: NAME_MAX - len(suffix) - len(digest) - 1])
    return path.with_name(f"{head}~{digest}{suffix}")


def _fit(stem: str, tail: str) -> str:
    """Shorten ``stem`` so that ``stem + tail`` fits in one file name (the tail is kept whole)."""
    raw = os.fsencode(stem)
    room = NAME_MAX - len(os.fsencode(tail))
    return (os.fsdecode(raw[:room]) if len(raw) > room else stem) + tail


def _split_suffix(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) > 16:
        return name, ""
    return stem, "." + ext


def move_no_clobber(
    src: Path, dst: Path, *, src_root: Path | None = None, dst_root: Path | None = None, sync_unlink: bool = True
) -> None:
    """Move ``src`` to ``dst``; raise ``FileExistsError`` rather than replace anything. ``dst`` is
    durable before ``src`` is unlinked. ``sync_unlink=False``: when the move was a hard link, the
    unlink of ``src`` is not fsynced (a caller that recognises a leftover second name of the same
    file); after a copy across file systems it always is. ``src_root`` and ``dst_root``: the
    folders below which no symbolic link is followed (default: the file's own folder)."""
    _check_fits(dst)
    src_fd = open_folder(src_root or src.parent, src.parent)
    try:
        dst_fd = open_folder(dst_root or dst.parent, dst.parent, create=True)
        try:
            _move_at(src_fd, src.name, dst_fd, dst, sync_unlink)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def _move_at(src_fd: int, name: str, dst_fd: int, dst: Path, sync_unlink: bool) -> None:
    linked = True
    try:
        os.link(name, dst.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            _copy_across(src_fd, name, dst_fd, dst)
            linked = False
        elif exc.errno in NO_HARD_LINKS:
            if lexists_at(dst_fd, dst.name):  # no hard links here (some SMB/FAT): check, then rename
                raise FileExistsError(errno.EEXIST, "target exists", str(dst)) from None
            os.rename(name, dst.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            fsync_fd(dst_fd)
            return
        else:
            raise
    fsync_fd(dst_fd)
    os.unlink(name, dir_fd=src_fd)
    if sync_unlink or not linked:
        fsync_fd(src_fd)


def _copy_across(src_fd: int, name: str, dst_fd: int, dst: Path) -> None:
    """Copy into a new temporary file next to ``dst``, fsync it, then give it its name."""
    if stat.S_ISLNK(os.stat(name, dir_fd=src_fd, follow_symlinks=False).st_mode):
        tmp = _symlink_temp(os.readlink(name, dir_fd=src_fd), dst_fd)
    else:
        fd, _ = _open_regular_at(src_fd, name)
        with os.fdopen(fd, "rb") as fin:
            tmp = _new_temp(dst_fd, dst.parent, lambda fout: shutil.copyfileobj(fin, fout, 1024 * 1024))
    try:
        _link_no_clobber(dst_fd, tmp, dst_fd, dst)
    finally:
        unlink_at(dst_fd, tmp)


def _symlink_temp(target: str, dir_fd: int) -> str:
    for _ in range(100):
        name = temp_name()
        try:
            os.symlink(target, name, dir_fd=dir_fd)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name after 100 tries")


def _open_regular_at(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(f"not a regular file ({describe_mode(st.st_mode)})")
    return fd, st


def _link_no_clobber(src_fd: int, name: str, dst_fd: int, dst: Path) -> None:
    """Give the file ``name`` the name ``dst`` unless ``dst`` exists (FileExistsError); ``name`` stays.
    Where the file system has no hard links (vfat, exFAT, some SMB), check, then rename."""
    try:
        os.link(name, dst.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        if lexists_at(dst_fd, dst.name):
            raise FileExistsError(errno.EEXIST, "target exists", str(dst)) from None
        os.rename(name, dst.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


_stale_temps = StaleTemps()


def _new_temp(dir_fd: int, folder: Path, fill: Callable[[BinaryIO], Any]) -> str:
    """A new temporary file in the folder with what ``fill`` writes, fsynced; its name. Removed
    again if ``fill`` fails. The folder's leftovers of a crash are swept first (now and then)."""
    _stale_temps.sweep(dir_fd, folder)
    fd, name = create_temp(dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        unlink_at(dir_fd, name)
        raise
    return name


def write_temp(folder: Path, fill: Callable[[BinaryIO], Any], *, root: Path | None = None) -> Path:
    """A new temporary file in ``folder`` (below ``root``, made if missing) with what ``fill``
    writes, fsynced: its path, for a later move. Nothing is left if ``fill`` fails."""
    fd = open_folder(root or folder, folder, create=True)
    try:
        return folder / _new_temp(fd, folder, fill)
    finally:
        os.close(fd)


def write_file_no_clobber(
    path: Path,
    fill: Callable[[BinaryIO], Any],
    *,
    root: Path | None = None,
    may_replace: Callable[[int], bool] | None = None,
    sync_dir: bool = True,
) -> None:
    """Write a file at ``path`` through a temporary one: its content fsynced before it gets its
    name, never replacing an existing file unless ``may_replace(folder descriptor)`` says so
    (else ``FileExistsError``). The name is durable when this returns, unless ``sync_dir=False``."""
    _check_fits(path)
    fd = open_folder(root or path.parent, path.parent, create=True)
    try:
        tmp = _new_temp(fd, path.parent, fill)
        try:
            try:
                _link_no_clobber(fd, tmp, fd, path)
            except FileExistsError:
                if may_replace is None or not may_replace(fd):
                    raise
                os.rename(tmp, path.name, src_dir_fd=fd, dst_dir_fd=fd)  # replaces the name, never follows it
            if sync_dir:
                fsync_fd(fd)
        finally:
            unlink_at(fd, tmp)
    finally:
        os.close(fd)


def replace_file(src: Path, dst: Path, *, root: Path, sync_dir: bool = False) -> None:
    """Rename ``src`` to ``dst`` (both below ``root``), replacing what has that name (a file of ours):
    the name is replaced, a link there is never followed. ``sync_dir``: ``dst``'s folder is fsynced."""
    src_fd = open_folder(root, src.parent)
    try:
        dst_fd = open_folder(root, dst.parent, create=True)
        try:
            os.rename(src.name, dst.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            if sync_dir:
                fsync_fd(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def lstat_below(root: Path, path: Path) -> os.stat_result:
    """``os.lstat`` of a path below ``root``, no folder on the way followed (``FolderInTheWay``)."""
    fd = open_folder(root, path.parent)
    try:
        return os.stat(path.name, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def unlink_below(root: Path, folder: Path, names: Sequence[str]) -> None:
    """Remove these names from ``folder`` (below ``root``, reached without following a link) where
    they are; the folder is fsynced if anything went. A folder that is gone or is a link: nothing."""
    try:
        fd = open_folder(root, folder)
    except OSError:
        return
    try:
        removed = False
        for name in names:
            try:
                os.unlink(name, dir_fd=fd)
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            fsync_fd(fd)
    finally:
        os.close(fd)


def _check_fits(path: Path) -> None:
    """Files are placed only where the kernel can reach them by path (users and tools do): a
    descriptor walk would place them deeper, and nobody could open them."""
    if not fits_path_max(path):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))


def encode_json(data: Any) -> bytes:
    """One top-level key per line, each value compact (UTF-8). orjson, because json's encoder was a
    large share of the daemon's CPU per file on the character boxes (docs/performance.md); a value
    orjson refuses (an integer beyond 64 bits, a lone surrogate) is encoded by json instead."""

    def dump(value: Any) -> bytes:
        try:
            return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str)
        except TypeError:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
            return text.encode("utf-8", "backslashreplace")

    if not isinstance(data, dict):
        return dump(data) + b"\n"
    lines = b",\n".join(b"  " + dump(str(k)) + b": " + dump(v) for k, v in data.items())
    return b"{\n" + lines + b"\n}\n"


def write_json_no_clobber(
    path: Path, data: Any, is_ours: Callable[[dict], bool], *, root: Path | None = None, sync_dir: bool = True
) -> bytes:
    """Write JSON atomically at ``path`` (below ``root``: no link followed); returns the bytes written.
    An existing file is replaced only if ``is_ours`` says it is an earlier write of the same result (a
    crash between write and move); otherwise ``FileExistsError``. Its content is fsynced before it gets
    its name; the name is durable when this returns, unless ``sync_dir=False``: then the caller fsyncs
    the folder before relying on it (e.g. once for the JSON and the file moved next to it)."""
    body = encode_json(data)
    write_file_no_clobber(
        path,
        lambda out: out.write(body),
        root=root,
        sync_dir=sync_dir,
        may_replace=lambda folder: _existing_is_ours(folder, path.name, is_ours),
    )
    return body


def _existing_is_ours(folder: int, name: str, is_ours: Callable[[dict], bool]) -> bool:
    try:
        fd, _ = _open_regular_at(folder, name)
    except (OSError, NotRegularFile):
        return False  # a link or a folder is never ours
    try:
        with os.fdopen(fd, "rb") as f:
            existing = json.loads(f.read(64 * 1024 * 1024))
    except (OSError, ValueError):
        return False
    return isinstance(existing, dict) and is_ours(existing)


def fsync_dir(path: Path, *, root: Path | None = None) -> None:
    try:
        fd = open_any(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if root is None else open_folder(root, path)
    except OSError:
        return
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)
