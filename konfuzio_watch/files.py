"""Moving files without ever losing or overwriting one.

Files are only ever moved, never deleted: a move is a hard link followed by an unlink of the
source (so an existing target is never replaced), or a copy + fsync + link across file systems.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUILTIN_IGNORES = (
    "*.part", "*.partial", "*.tmp", "*.temp", "*.crdownload", "*.download", "*.swp", "~$*", ".~lock*",
    "@eaDir", "#recycle", "#snapshot", ".DS_Store", "Thumbs.db", "desktop.ini", "._*", "*~",
)
SAFE_NAME_MAX = 120
NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, SMB)
MAX_VARIANTS = 10_000  # "name (2).pdf" ... before giving up on a folder
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK)
_TRANSLITERATE = str.maketrans({"ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE",
                                "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "þ": "th", "Þ": "Th"})


def is_ignored(rel_parts: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """Hidden files, partial/temporary names, NAS junk and the user's globs (on any component)."""
    for part in rel_parts:
        if part.startswith("."):
            return True
        if any(fnmatch.fnmatchcase(part, p) for p in BUILTIN_IGNORES):
            return True
    rel = "/".join(rel_parts)
    return any(fnmatch.fnmatchcase(rel_parts[-1], p) or fnmatch.fnmatchcase(rel, p) for p in patterns)


def safe_upload_name(raw_name: bytes, fallback: str) -> str:
    """A name any HTTP stack can carry: ASCII, no controls, no leading dash/dot, bounded length.

    ``Straße März.pdf`` -> ``Strasse Marz.pdf``; ``b'scan\\xff\\n.pdf'`` -> ``scan__.pdf``.
    """
    text = raw_name.decode("utf-8", errors="replace")
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    text = re.sub(r"[^A-Za-z0-9._()\[\] +,=@&'-]", "_", text.translate(_TRANSLITERATE))
    text = text.lstrip("-. ").strip()
    stem, dot, ext = text.rpartition(".")
    if not dot or not stem:
        stem, ext = text, ""
    ext = ext[:16]
    stem = stem[: SAFE_NAME_MAX - len(ext) - 1] or fallback
    return f"{stem}.{ext}" if ext else stem


def open_regular_file(path: Path) -> tuple[int, os.stat_result]:
    """Open for reading without following a symlink or blocking on a FIFO; insist on a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
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
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def free_target(folder: Path, rel_path: str, sidecar_suffix: str) -> Path:
    """``folder/rel_path``, or ``name (2).ext``, ... such that neither it nor its sidecar exists."""
    target = folder / rel_path
    stem, suffix = _split_suffix(target.name)
    for n in range(1, MAX_VARIANTS):
        candidate = target if n == 1 else target.with_name(_fit(stem, f" ({n}){suffix}"))
        if not os.path.lexists(candidate) and not os.path.lexists(sidecar_for(candidate, sidecar_suffix)):
            return candidate
    raise FileExistsError(errno.EEXIST, f"no free name after {MAX_VARIANTS} tries", str(target))


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


def move_no_clobber(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; raise ``FileExistsError`` rather than replace anything."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            _copy_across(src, dst)
        elif exc.errno in NO_HARD_LINKS:
            if os.path.lexists(dst):  # no hard links here (some SMB/FAT): check, then rename
                raise FileExistsError(errno.EEXIST, "target exists", str(dst)) from None
            os.rename(src, dst)
            fsync_dir(dst.parent)
            return
        else:
            raise
    fsync_dir(dst.parent)
    os.unlink(src)
    fsync_dir(src.parent)


def _copy_across(src: Path, dst: Path) -> None:
    tmp = temp_path_for(dst)
    if os.path.lexists(tmp):
        os.unlink(tmp)  # left by a copy that was killed half-way
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), tmp)
    else:
        fd, _ = open_regular_file(src)
        with os.fdopen(fd, "rb") as fin, open(tmp, "wb") as fout:  # a stale temp of ours is overwritten
            shutil.copyfileobj(fin, fout, 1024 * 1024)
            fout.flush()
            os.fsync(fout.fileno())
    try:
        _link_no_clobber(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _link_no_clobber(src: Path, dst: Path) -> None:
    """Give ``src`` the name ``dst`` unless ``dst`` exists (FileExistsError); ``src`` stays.
    Where the file system has no hard links (vfat, exFAT, some SMB), check, then rename."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "target exists", str(dst)) from None
        os.rename(src, dst)


def encode_json(data: Any) -> bytes:
    """One top-level key per line, each value compact. ``indent=`` would switch json to its
    pure-Python encoder, which dominated the CPU per file for documents with many boxes."""
    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)

    if not isinstance(data, dict):
        text = dump(data)
    else:
        text = "{\n" + ",\n".join(f"  {dump(str(k))}: {dump(v)}" for k, v in data.items()) + "\n}"
    return (text + "\n").encode("utf-8", "backslashreplace")


def temp_path_for(path: Path) -> Path:
    """A hidden, short, predictable name next to ``path`` to write it under before linking."""
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]
    return path.with_name(f".konfuzio-watch-{digest}.tmp")


def write_json_no_clobber(path: Path, data: Any, is_ours: Callable[[dict], bool]) -> None:
    """Write JSON atomically at ``path``. An existing file is replaced only if ``is_ours`` says
    it is an earlier write of the same result (a crash between write and move); otherwise
    ``FileExistsError``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    body = encode_json(data)
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            _link_no_clobber(tmp, path)
        except FileExistsError:
            if not _existing_is_ours(path, is_ours):
                raise
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _existing_is_ours(path: Path, is_ours: Callable[[dict], bool]) -> bool:
    try:
        with open(path, "rb") as f:
            existing = json.loads(f.read(64 * 1024 * 1024))
    except (OSError, ValueError):
        return False
    return isinstance(existing, dict) and is_ours(existing)


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
