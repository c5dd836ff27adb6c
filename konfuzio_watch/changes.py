"""Is a file still the one that was uploaded? Its stat facts against the ones the journal kept.

The upload records the file's size, mtime, inode and inode change time (ctime) from the descriptor
it reads, before it reads a byte, and the sha256 of what it read. A writer that rewrites the file
in place keeping its size and puts the mtime back with ``utime`` still moves its ctime, which no
user can set. But ctime also moves for what leaves the bytes alone: a ``chmod``, and a hard link
the daemon itself makes (placing a file in done/ is a link, then an unlink of the old name; after
a crash in between, the file in processing/ has a new ctime). So a ctime that moved is a reason to
compare the content (``content_differs``), never a verdict by itself.

After the file was placed in done/ its ctime is the daemon's own (the link and the unlink), so
there ``placed_change`` compares size, mtime and inode; a copy (done/ on another file system) is a
new inode with a new mtime: its content is compared.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .files import NotRegularFile, open_regular_file
from .journal import Row
from .shares import is_share_error

HASH_CHUNK = 1024 * 1024


def change_since_upload(row: Row, st: os.stat_result, *, same_inode: bool) -> str | None:
    """What changed about the file in processing/ since its upload, as far as stat tells (size,
    mtime, inode), or None. ``same_inode``: it is the inode the claim recorded."""
    if row.size is not None and st.st_size != row.size:
        return size_change(row.size, st.st_size)
    if row.mtime_ns is not None and st.st_mtime_ns != row.mtime_ns:
        return "it was modified"
    if not same_inode:
        return "it was replaced by another file"
    return None


def ctime_moved(row: Row, st: os.stat_result) -> bool:
    """Did anything change the inode (its bytes, or only its metadata) since the upload looked?"""
    return row.ctime_ns is not None and st.st_ctime_ns != row.ctime_ns


def placed_change(row: Row, st: os.stat_result, *, same_inode: bool) -> str | None:
    """What differs between the file just placed in done/ and what was uploaded, by stat alone.
    A copy (``same_inode`` False) has a new mtime: only its size is compared here."""
    if not stat.S_ISREG(st.st_mode):
        return "it was replaced by another file"
    if row.size is not None and st.st_size != row.size:
        return size_change(row.size, st.st_size)
    if same_inode and row.mtime_ns is not None and st.st_mtime_ns != row.mtime_ns:
        return "it was modified"
    return None


def size_change(was: int, now: int) -> str:
    return f"it grew from {was} to {now} bytes" if now > was else f"it shrank from {was} to {now} bytes"


def content_differs(path: Path, sha256: str | None, *, root: Path | None = None) -> bool:
    """Are the bytes at ``path`` other than those with this sha256? No longer a regular file: True.
    Unknown (no hash) or unreadable: False, the stat facts decide alone; but a share that does not
    answer (``shares.is_share_error``) is raised: it says nothing about the bytes. ``root``: no folder
    between it and the file is followed (done/)."""
    if sha256 is None:
        return False
    try:
        fd, _ = open_regular_file(path, root=root)
    except NotRegularFile:
        return True
    except OSError as exc:
        if is_share_error(exc):
            raise
        return False
    with os.fdopen(fd, "rb") as f:
        return sha256_of(f)[0] != sha256


def sha256_of(f: BinaryIO) -> tuple[str, int]:
    """The sha256 of what is left to read of ``f``, and how many bytes that was; read in chunks, so
    memory does not grow with the file's size."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(HASH_CHUNK), b""):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size
