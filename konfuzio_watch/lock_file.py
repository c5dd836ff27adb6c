"""A lock file: one ``flock(2)``'ed file holding a small JSON document that names its holder
(``Holder``), rewritten in place while held and read by anyone without taking it (``locks.py``
says which lock files there are and why)."""

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


class LockHeld(Exception):
    """Another daemon holds a lock; the message is one line for the user (without the program name).
    ``holder``: what the lock's marker says, when it was read."""

    def __init__(self, message: str, holder: Holder | None = None):
        super().__init__(message)
        self.holder = holder


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
    journal: str | None = None  # a cluster's journal, for messages (a URL without a password)
    listening: dict[str, str] | None = None  # the daemon's: "callback.port"/"monitor.port" -> "host:port"
    uid: int | None = None  # the daemon's user and groups (effective ids)
    gid: int | None = None
    groups: tuple[int, ...] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Holder:
        def pick(key: str, kind: type | tuple[type, ...]) -> Any:
            value = data.get(key)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        return cls(
            pid=pick("pid", int),
            host=pick("host", str),
            started_at=pick("started_at", (int, float)),
            state=pick("state", str),
            inbox=pick("inbox", str),
            monitor_url=pick("monitor_url", str),
            journal_id=pick("journal_id", str),
            mode=pick("mode", str),
            cluster_id=pick("cluster_id", str),
            stopped_at=pick("stopped_at", (int, float)),
            journal=pick("journal", str),
            listening=_addresses(data.get("listening")),
            uid=pick("uid", int),
            gid=pick("gid", int),
            groups=_ids(data.get("groups")),
        )

    def describe(self) -> str:
        """``pid 1234 on host scan01, since 14:02``."""
        parts = [f"pid {self.pid}" if self.pid is not None else "pid unknown"]
        if self.host:
            parts[0] += f" on host {self.host}"
        if self.started_at is not None:
            parts.append(f"since {format_since(self.started_at)}")
        return ", ".join(parts)

    def is_another_process(self) -> bool:
        """Names a process that runs and is not this one (a marker copied from this process's is not)."""
        return self.is_running() and (self.pid, self.host) != (os.getpid(), hostname())

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


def _addresses(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _ids(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return tuple(value)


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
        for _ in range(10):
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
            if self.in_place():
                return True
            # Removed or replaced between the open and the flock (a holder restoring its marker): a lock
            # on a file no longer under this name guards nothing. Open the one there now.
            self.close()
        raise OSError(errno.EAGAIN, "it keeps being removed or replaced", str(self.path))

    def in_place(self) -> bool:
        """The file held is still the one under this path: not removed, not replaced (e.g. its folder
        renamed and another one made under the old name)."""
        if self._fd is None:
            return False
        try:
            held = os.fstat(self._fd)
        except OSError:  # the file held cannot be reached any more (its share was unmounted): not in place
            return False
        try:
            found = os.stat(self.path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)

    def where(self) -> str:
        """Where the file held is now, as the kernel says (``… (deleted)`` once removed), for messages."""
        if self._fd is None:
            return "nowhere"
        try:
            return os.readlink(f"/proc/self/fd/{self._fd}")
        except OSError:
            return "unknown"

    def share(self) -> bool:
        """Turn the exclusive lock held into a shared one; False if it was lost meanwhile (the kernel
        drops the old lock first, so another LOCK_EX|LOCK_NB may get in between)."""
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        """Let go without a word (the marker stays as it is)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

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
