"""Who runs where: the daemon lock on the state folder and the marker lock on the inbox.

Two daemons on one journal, or on one inbox, upload files twice and give files each other's
results. Two ``flock(2)`` locks (LOCK_EX|LOCK_NB, held for the daemon's lifetime, released by
the kernel when the process dies however it dies) keep them apart:

- ``<folders.state>/daemon.lock``: the journal belongs to one process. Taken before anything
  else at start-up (only the state folder is created first). It holds JSON naming the holder
  (pid, host, started_at, state folder, inbox, and the monitor URL once bound), which is how a
  second daemon names the first in its refusal and how ``konfuzio-watch status`` finds the
  running daemon without taking the lock (``read_daemon_lock``). ``status`` and ``retry`` never
  take it: they only read the journal and move files, which the journal serialises.
- ``<inbox>/.konfuzio-watch.lock`` (a hidden name: the watcher ignores it): the inbox belongs to
  one journal. It holds JSON {journal_id, host, pid, state, mode, cluster_id, started_at}. A
  daemon that cannot take it refuses, naming the holder. A free lock whose marker names another
  journal_id (an earlier daemon with another state folder, or a journal that was lost) is taken
  over with one WARNING.

Clustered mode (not implemented; the marker is shaped for it): several nodes that share one
PostgreSQL journal on purpose would each take the marker with LOCK_SH instead of LOCK_EX and
write ``mode: "cluster"`` with ``cluster_id`` = the shared journal's ``journal_id``. Nodes of one
cluster then coexist, a node whose journal is another refuses (the marker's cluster_id is not
its own), and a single daemon (``mode: "single"``, LOCK_EX) and a cluster exclude each other,
because a shared and an exclusive flock do. Today every daemon is ``single``.

File systems without flock (some SMB mounts answer ENOLCK/EOPNOTSUPP) leave the inbox
unguarded: the daemon says so in a WARNING and still writes the marker.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("konfuzio_watch")

DAEMON_LOCK_NAME = "daemon.lock"
INBOX_LOCK_NAME = ".konfuzio-watch.lock"
MODE_SINGLE = "single"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockHeld(Exception):
    """Another daemon holds a lock; the message is one line for the user (without the program name)."""


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the process holding it (any field may be unknown)."""

    pid: int | None = None
    host: str | None = None
    started_at: float | None = None
    state: str | None = None
    inbox: str | None = None
    monitor_url: str | None = None
    journal_id: str | None = None
    mode: str | None = None
    cluster_id: str | None = None
    stopped_at: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Holder:
        def pick(key: str, kind: type | tuple[type, ...]) -> Any:
            value = data.get(key)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        return cls(pid=pick("pid", int), host=pick("host", str), started_at=pick("started_at", (int, float)),
                   state=pick("state", str), inbox=pick("inbox", str), monitor_url=pick("monitor_url", str),
                   journal_id=pick("journal_id", str), mode=pick("mode", str), cluster_id=pick("cluster_id", str),
                   stopped_at=pick("stopped_at", (int, float)))

    def describe(self) -> str:
        """``pid 1234 on host scan01, since 14:02``."""
        parts = [f"pid {self.pid}" if self.pid is not None else "pid unknown"]
        if self.host:
            parts[0] += f" on host {self.host}"
        if self.started_at is not None:
            parts.append(f"since {format_since(self.started_at)}")
        return ", ".join(parts)

    def is_running(self) -> bool:
        """Best guess without taking the lock: not marked stopped, and (on this host) its pid lives."""
        if self.pid is None or self.stopped_at is not None:
            return False
        if self.host != hostname():
            return True  # cannot look; the state folder is on a local disk, so this is rare
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, under another user
        return True


def hostname() -> str:
    return socket.gethostname()


def format_since(timestamp: float) -> str:
    """``14:02`` today, ``2026-11-23 14:02`` before."""
    when = dt.datetime.fromtimestamp(timestamp)
    return when.strftime("%H:%M" if when.date() == dt.date.today() else "%Y-%m-%d %H:%M")


class LockFile:
    """One flock'ed file holding a small JSON document (rewritten in place while held)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_lock(self, *, shared: bool = False) -> bool:
        """True: ours now. False: another open file holds it. OSError: cannot open, or no flock here."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o664)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def open_unlocked(self) -> None:
        """Keep the file open without a lock (a file system without flock): writes still work."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o664)

    def read(self) -> dict[str, Any]:
        """The JSON document; {} when empty, missing or unreadable. A write in progress is waited out."""
        for attempt in range(10):
            try:
                if self._fd is not None:
                    raw = os.pread(self._fd, 64 * 1024, 0)
                else:
                    with open(self.path, "rb") as f:
                        raw = f.read(64 * 1024)
            except FileNotFoundError:
                return {}
            try:
                data = json.loads(raw) if raw.strip() else None
            except ValueError:
                data = None
            if isinstance(data, dict):
                return data
            if attempt < 9:
                time.sleep(0.02)  # a holder between truncate and write: read again shortly
        return {}

    def write(self, data: dict[str, Any]) -> None:
        assert self._fd is not None
        raw = (json.dumps(data, sort_keys=True) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, raw, 0)
        os.fsync(self._fd)

    def release(self, last_words: dict[str, Any] | None = None) -> None:
        """Write ``last_words`` (e.g. stopped_at) and let go; idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if last_words is not None:
                raw = (json.dumps(last_words, sort_keys=True) + "\n").encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, raw, 0)
        except OSError as exc:
            log.warning("cannot update %s: %s", self.path, exc.strerror or exc)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock


class DaemonLock:
    """``<state>/daemon.lock``: this process is the journal's only user."""

    def __init__(self, state_dir: Path, inbox: Path):
        self.file = LockFile(state_dir / DAEMON_LOCK_NAME)
        self.state_dir = state_dir
        self._info: dict[str, Any] = {"pid": os.getpid(), "host": hostname(), "started_at": time.time(),
                                      "state": str(state_dir), "inbox": str(inbox), "monitor_url": None}

    def acquire(self) -> DaemonLock:
        if not self.file.try_lock():
            holder = Holder.from_json(self.file.read())
            raise LockHeld(f"another konfuzio-watch ({holder.describe()}) is running on {self.state_dir}; "
                           "stop it first")
        self.file.write(self._info)
        return self

    def set_monitor_url(self, url: str | None) -> None:
        self._info["monitor_url"] = url
        if self.file.held:
            self.file.write(self._info)

    def release(self) -> None:
        self.file.release({**self._info, "stopped_at": time.time()})


def read_daemon_lock(state_dir: Path) -> Holder | None:
    """What the state folder's lock file says, without taking the lock; None if there is none."""
    data = LockFile(state_dir / DAEMON_LOCK_NAME).read()
    return Holder.from_json(data) if data else None


class InboxLock:
    """``<inbox>/.konfuzio-watch.lock``: this journal is the inbox's only user (see the module doc)."""

    def __init__(self, inbox: Path, state_dir: Path):
        self.file = LockFile(inbox / INBOX_LOCK_NAME)
        self.inbox = inbox
        self.state_dir = state_dir
        self.previous: Holder | None = None
        self._info: dict[str, Any] = {}

    def acquire(self) -> InboxLock:
        """Take the lock (refusing if held) and remember what the marker said before."""
        try:
            locked = self.file.try_lock()
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            log.warning("cannot lock %s (%s): this file system has no flock, so another daemon on this inbox "
                        "would not be noticed", self.file.path, exc.strerror or exc)
            self.file.open_unlocked()
            locked = True
        if not locked:
            holder = Holder.from_json(self.file.read())
            state = f", state folder {holder.state}" if holder.state else ""
            raise LockHeld(f"another konfuzio-watch ({holder.describe()}{state}) is watching the inbox "
                           f"{self.inbox}; stop it first, or give each daemon its own inbox")
        data = self.file.read()
        self.previous = Holder.from_json(data) if data else None
        return self

    def claim(self, journal_id: str) -> None:
        """Write the marker for ``journal_id``; one WARNING if it named another journal before."""
        p = self.previous
        if p is not None and p.journal_id is not None and p.journal_id != journal_id:
            log.warning("the inbox %s was last watched with another journal (id %s, state folder %s, %s); taking "
                        "it over: the files that journal left unfinished are not in this one's", self.inbox,
                        p.journal_id, p.state or "unknown", p.describe())
        self._info = {"journal_id": journal_id, "host": hostname(), "pid": os.getpid(), "state": str(self.state_dir),
                      "mode": MODE_SINGLE, "cluster_id": None, "started_at": time.time()}
        self.file.write(self._info)

    def release(self) -> None:
        # The marker keeps naming its journal (the next daemon compares journal_ids); only the pid goes.
        self.file.release({**self._info, "stopped_at": time.time()} if self._info else None)
