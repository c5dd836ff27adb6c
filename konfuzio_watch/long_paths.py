"""Paths longer than PATH_MAX (4096 bytes) cannot be passed to the kernel at all: ``lstat_any``,
``open_any``, ``rename_any`` and ``list_dir`` try the normal call and, only when it fails with
ENAMETOOLONG, walk the path one folder at a time through directory descriptors
(``dirfd.descend``), never following a symbolic link on the way. A file whose path is too long to
be kept gets a ``shortened_name``.
"""

from __future__ import annotations

import errno
import hashlib
import os

from .dirfd import O_PATH, READ, SEARCH, NotAFolder, descend

PATH_MAX = 4096  # bytes in a path the kernel accepts, its terminating NUL included (Linux)
SHORT_NAME_MAX = 200  # shortened_name(): the name and its sidecar suffix stay below this many bytes


def fits_path_max(path: str | bytes | os.PathLike) -> bool:
    """Can ``path`` be handed to the kernel as it is?"""
    return len(os.fsencode(path)) < PATH_MAX


def lstat_any(path: str | os.PathLike) -> os.stat_result:
    """``os.lstat`` for a path of any length."""
    try:
        return os.lstat(path)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    parent, name = _open_parent(path)
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def open_any(path: str | os.PathLike, flags: int, mode: int = 0o777) -> int:
    """``os.open`` for a path of any length (the folders on a long path are never symlinks)."""
    try:
        return os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    parent, name = _open_parent(path)
    try:
        return os.open(name, flags, mode, dir_fd=parent)
    finally:
        os.close(parent)


def rename_any(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.rename`` where either path may be longer than PATH_MAX."""
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    src_parent, src_name = _open_parent(src)
    try:
        dst_parent, dst_name = _open_parent(dst)
        try:
            os.rename(src_name, dst_name, src_dir_fd=src_parent, dst_dir_fd=dst_parent)
        finally:
            os.close(dst_parent)
    finally:
        os.close(src_parent)


def list_dir(path: str) -> list[tuple[str, bool]]:
    """The entries of a folder of any path length: (name, is a folder); symlinks are not followed."""
    try:
        with os.scandir(path) as it:
            return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    fd = _walk(path, last_flags=READ)
    try:
        with os.scandir(fd) as it:  # scans a duplicate of fd, so the entries' stat calls still work here
            return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
    finally:
        os.close(fd)


def _open_parent(path: str | os.PathLike) -> tuple[int, str]:
    """A descriptor of the folder holding ``path``, reached without following a symlink, and the name in it."""
    path = os.fsdecode(path)
    head, name = os.path.split(path.rstrip(os.sep) or os.sep)
    if not name:
        raise OSError(errno.EINVAL, "no file name in the path", path)
    return _walk(head or os.curdir), name


def _walk(path: str, last_flags: int = SEARCH) -> int:
    """Open the folder ``path`` one component at a time, each relative to the one before."""
    parts = [part for part in path.split(os.sep) if part and part != os.curdir]
    fd = os.open(os.sep if path.startswith(os.sep) else os.curdir, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return descend(fd, parts, last_flags=last_flags)
    except NotAFolder as exc:
        if exc.is_link:
            raise OSError(errno.ELOOP, "a folder in the path is a symbolic link; not followed", path) from None
        raise exc.original from None


def shortened_name(rel_path: bytes, suffix: str = "") -> str:
    """A short, unique name for a file whose own path is too long to be kept (failed/ for a file
    whose path does not fit PATH_MAX): the start of its base name, a hash of its whole relative
    path, and its extension. Name and ``suffix`` (its sidecar's, e.g. ``.error.json``) together
    stay below SHORT_NAME_MAX bytes. ``b'a/.../Rechnung Mai.pdf'`` -> ``Rechnung Mai~1f0c2e9d4b7a6c35.pdf``.
    """
    base = rel_path.rstrip(b"/").rpartition(b"/")[2] or b"file"
    stem, dot, ext = base.rpartition(b".")
    if not dot or not stem or len(ext) > 16:
        stem, ext = base, b""
    ext = b"." + ext if ext else b""
    digest = hashlib.sha256(rel_path).hexdigest()[:16].encode()
    room = SHORT_NAME_MAX - 1 - len(os.fsencode(suffix)) - len(ext) - len(digest) - 1
    head = _utf8_prefix(stem, max(room, 0))
    return os.fsdecode(head + b"~" + digest + ext)


def _utf8_prefix(raw: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of ``raw``, not ending inside a UTF-8 character."""
    if len(raw) <= limit:
        return raw
    cut = raw[:limit]
    for back in range(1, min(4, len(cut)) + 1):  # a lead byte whose character does not fit: drop it
        byte = cut[-back]
        if byte < 0x80:
            break
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if back < need:
                cut = cut[:-back]
            break
    return cut
