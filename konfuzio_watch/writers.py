"""Who holds a file open for writing? A look through /proc, the way ``fuser`` does it (Linux).

A writer that pauses longer than ``watch.settle_seconds`` with its file open (a scanner between
pages, a program that appends a trailer later) leaves a file that looks finished. The kernel knows
better: ``/proc/<pid>/fdinfo/<fd>`` says how each open file of a process was opened (``flags:``,
octal, with O_WRONLY or O_RDWR for a writer) and its inode (``ino:``); the link
``/proc/<pid>/fd/<fd>`` gives its device by ``stat``, asked only for a writer of a wanted inode,
since that stat reaches the file's own file system (lsof's lesson: it hangs on a stalled network
mount). The tracker asks about the files it is about to hand out, all of a batch at once, and
holds back those someone still has open for writing.

What it cannot see: processes the daemon may not look into (another user's, unless the daemon runs
as root; /proc mounted with ``hidepid``), and writers on other machines (a network share). For
their files the settle time is all there is, as before. The look is bounded by ``budget_s``; what
it did not reach is taken to have no writer, and the answer says it was cut short.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

PROC = "/proc"
BUDGET_S = 0.25  # one look, for a whole batch of files; a host with ~50,000 open files takes about this
CHECK_CLOCK_EVERY = 256  # open files between two looks at the clock
WRITE_MODES = (os.O_WRONLY, os.O_RDWR)

FileId = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class Writer:
    pid: int
    command: str  # /proc/<pid>/comm, or "" if it could not be read

    def __str__(self) -> str:
        return f"{self.command}, pid {self.pid}" if self.command else f"pid {self.pid}"


@dataclass(frozen=True)
class Look:
    """What one look through /proc found. ``complete`` False: cut short (the budget ran out, or
    there is no /proc); ``hidden``: processes whose open files the daemon may not see."""

    writers: dict[FileId, Writer] = field(default_factory=dict)
    complete: bool = True
    hidden: int = 0


FindWriters = Callable[[Collection[FileId]], Look]


def find_writers(
    files: Collection[FileId],
    *,
    proc: str = PROC,
    budget_s: float = BUDGET_S,
    monotonic: Callable[[], float] = time.monotonic,
) -> Look:
    """Which of these files (device, inode) a process holds open for writing, and who."""
    wanted = set(files)
    if not wanted:
        return Look()
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return Look(complete=False)
    deadline = monotonic() + budget_s
    inodes = {ino for _, ino in wanted}
    found: dict[FileId, Writer] = {}
    hidden = looked = 0
    for pid in pids:
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except PermissionError:
            hidden += 1
            continue
        except OSError:
            continue  # gone meanwhile
        for fd in fds:
            looked += 1
            if looked % CHECK_CLOCK_EVERY == 0 and monotonic() > deadline:
                return Look(found, False, hidden)
            writing, ino = _fdinfo(f"{proc}/{pid}/fdinfo/{fd}")
            if not writing or (ino is not None and ino not in inodes):
                continue
            key = _file_of(f"{proc}/{pid}/fd/{fd}")
            if key in wanted and key not in found:
                found[key] = Writer(int(pid), _command(f"{proc}/{pid}/comm"))
                if len(found) == len(wanted):
                    return Look(found, True, hidden)
        if monotonic() > deadline:
            return Look(found, False, hidden)
    return Look(found, True, hidden)


def _file_of(fd_link: str) -> FileId | None:
    try:
        st = os.stat(fd_link)  # follows the link to the open file itself, whatever its name now
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _fdinfo(fdinfo: str) -> tuple[bool, int | None]:
    """Is the descriptor open for writing, and its inode where the kernel says (``ino:``, Linux 5.x
    on). fdinfo is procfs alone: unlike a stat of the fd's link, reading it never waits on the open
    file's own file system (a stalled network share), so the link is only stat'ed for a writer of
    one of the inodes asked about."""
    try:
        with open(fdinfo, "rb") as f:
            text = f.read(4096)
    except OSError:
        return False, None  # closed meanwhile
    writing, ino = False, None
    for line in text.splitlines():
        if line.startswith(b"flags:"):
            writing = int(line.split()[1], 8) & os.O_ACCMODE in WRITE_MODES
        elif line.startswith(b"ino:"):
            ino = int(line.split()[1])
    return writing, ino


def _command(comm: str) -> str:
    try:
        with open(comm, "rb") as f:
            name = f.read(64).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return "".join(ch if ch.isprintable() else "?" for ch in name)  # a process names itself: no log lines forged
