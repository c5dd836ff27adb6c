"""Is this file finished being written? Pure decisions from observations and ``now``.

A file is ready when its size and mtime have not changed for ``settle_s`` *as observed by us*
(an old mtime on a file copied in proves nothing), it is non-empty, and its content looks
complete (a PDF ends with ``%%EOF``). A file that stays empty or incomplete is claimed anyway
after ``grace_s`` of stability, marked incomplete, so that it reaches failed/ with a reason
instead of waiting forever.

A file someone holds open for writing is not finished either, however long it has been still (a
writer that pauses past ``settle_s`` and then appends): ``Held`` records who, since when, and when
it was last looked at (``writers.py``). It is looked at again when it changes or a writer closes it
(an event), else at a growing interval (``recheck_s``, at most ``MAX_RECHECK_S``); it is never
handed out while held, but shown as pending with its reason, and after ``grace_s`` said so loudly.

A PDF looks complete when its last 64 KiB hold a ``%%EOF`` that no further revision follows:
producers append kilobytes of padding after the marker, an incremental update appends a second
revision with its own ``%%EOF``, and a linearized file has an early ``%%EOF`` near its start.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from .long_paths import open_any

PDF_MAGIC = b"%PDF"
PDF_EOF = b"%%EOF"
HEAD_BYTES = 8
TAIL_BYTES = 64 * 1024
MAX_RECHECK_S = 30.0  # a file held open for writing is looked at again at least this often
# What only a revision (still being written) brings after a %%EOF: an object, a cross-reference table, a trailer.
_REVISION = re.compile(rb"\d+\s+\d+\s+obj\b|\bxref\b|\btrailer\b|startxref")


@dataclass(frozen=True)
class Held:
    """Someone holds the file open for writing: ``by`` whom (for the log and ``status``), found first
    ``since``, last found at ``checked`` (None: to be looked at again once settled); ``warned``: it
    was said loudly that it is held past the grace."""

    by: str
    since: float
    checked: float | None
    warned: bool = False


@dataclass(frozen=True)
class Observation:
    size: int
    mtime_ns: int
    since: float  # when we first saw this (size, mtime) pair
    first_seen: float  # when we first saw the file at all: its ``detected_at``
    looks_complete: bool = True
    unreadable: str | None = None  # why the daemon may not read it (strerror), if it may not
    regular: bool = True  # False: a FIFO, device, socket, symlink; never read, claimed at once
    held: Held | None = None  # someone holds it open for writing (as last looked)


def observe(
    previous: Observation | None, size: int, mtime_ns: int, now: float, looks_complete: bool = True
) -> Observation:
    """Fold a fresh stat into the previous observation; the clock restarts on any change. A file
    held open for writing that changed is looked at again once it is settled."""
    if previous is None:
        return Observation(size, mtime_ns, now, now, looks_complete)
    if (previous.size, previous.mtime_ns) == (size, mtime_ns):
        return previous
    return Observation(
        size,
        mtime_ns,
        now,
        previous.first_seen,
        looks_complete,
        previous.unreadable,
        previous.regular,
        look_again(previous.held),
    )


def held_by(obs: Observation, writer: str | None, now: float) -> Observation:
    """What a look at the open files found: ``writer`` holds it open for writing, or (None) nobody."""
    if writer is None:
        return obs if obs.held is None else dataclasses.replace(obs, held=None)
    since = obs.held.since if obs.held is not None else now
    warned = obs.held is not None and obs.held.warned
    return dataclasses.replace(obs, held=Held(writer, since, now, warned))


def look_again(held: Held | None) -> Held | None:
    """Look at a held file again as soon as it is settled (it changed, or a writer closed it)."""
    return None if held is None else dataclasses.replace(held, checked=None)


def recheck_s(held: Held, settle_s: float) -> float:
    """How long a file found held open waits for its next look: half as long as it has been held,
    at least ``settle_s`` (and a second), at most ``MAX_RECHECK_S``."""
    checked = held.checked if held.checked is not None else held.since
    return min(MAX_RECHECK_S, max(settle_s, 1.0, (checked - held.since) / 2))


def is_held_past(obs: Observation, now: float, grace_s: float) -> bool:
    """Held open for writing for ``grace_s`` and not yet said so loudly?"""
    return obs.held is not None and not obs.held.warned and now - obs.held.since >= grace_s


def said_loudly(obs: Observation) -> Observation:
    """The warning that it is held past the grace was given (once)."""
    return obs if obs.held is None else dataclasses.replace(obs, held=dataclasses.replace(obs.held, warned=True))


def ready_at(obs: Observation, settle_s: float, grace_s: float) -> float:
    """The earliest time the file may be claimed if nothing changes (held open for writing: the
    time of its next look)."""
    if not obs.regular:
        return obs.since
    due = obs.since + (settle_s if obs.size > 0 and obs.looks_complete else max(settle_s, grace_s))
    if obs.held is not None and obs.held.checked is not None:
        return max(due, obs.held.checked + recheck_s(obs.held, settle_s))
    return due


def is_complete(obs: Observation) -> bool:
    """Not known to be empty or an unfinished PDF (a special file is never read: complete)."""
    return not obs.regular or (obs.size > 0 and obs.looks_complete)


def is_ready(obs: Observation, now: float, settle_s: float, grace_s: float) -> bool:
    return now >= ready_at(obs, settle_s, grace_s)


def content_looks_complete(head: bytes, tail: bytes) -> bool:
    """Cheap plausibility check on the first bytes and the last ``TAIL_BYTES`` of a file."""
    if head.startswith(PDF_MAGIC):
        return tail_looks_complete(tail)
    return True


def tail_looks_complete(tail: bytes) -> bool:
    """The end of a PDF: a ``%%EOF`` after which no further revision begins."""
    at = tail.rfind(PDF_EOF)
    return at >= 0 and _REVISION.search(tail, at + len(PDF_EOF)) is None


def pdf_looks_complete(path_or_fd: str | os.PathLike | int, size: int) -> bool:
    """Does the file (a path of any length, or a descriptor open for reading) look completely
    written? Anything that is not a PDF does. Reads at most two blocks: the magic, the tail.
    OSError (cannot open or read) is the caller's to handle."""
    if isinstance(path_or_fd, int):
        return _fd_looks_complete(path_or_fd, size)
    fd = open_any(path_or_fd, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        return _fd_looks_complete(fd, size)
    finally:
        os.close(fd)


def _fd_looks_complete(fd: int, size: int) -> bool:
    if size <= TAIL_BYTES:
        data = os.pread(fd, size, 0)
        return content_looks_complete(data[:HEAD_BYTES], data)
    if not os.pread(fd, HEAD_BYTES, 0).startswith(PDF_MAGIC):
        return True
    return tail_looks_complete(os.pread(fd, TAIL_BYTES, size - TAIL_BYTES))
