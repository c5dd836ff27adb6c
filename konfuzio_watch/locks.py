"""Who runs where: the daemon lock on the state folder, the marker lock on the inbox, and the lock
of the processing folder.

Two daemons on one journal, or on one inbox, upload files twice and give files each other's
results. Three ``flock(2)`` locks (LOCK_EX|LOCK_NB, held for the daemon's lifetime, released by
the kernel when the process dies however it dies) keep them apart:

- ``<folders.state>/daemon.lock``: the journal belongs to one process. Taken before anything
  else at start-up (only the state folder is created first). It holds JSON naming the holder
  (pid, host, its user and groups, started_at, state folder, inbox, the monitor URL and the
  addresses it listens on once bound), which is how a second daemon names the first in its refusal, how ``konfuzio-watch
  status`` finds the running daemon without taking the lock (``read_daemon_lock``), and how
  ``check`` tells its ports taken by it from ports taken by something else, and whom to judge the
  folders for (``accounts.py``). ``status`` and ``retry`` never
  take it: they only read the journal and move files, which the journal serialises.
- ``<inbox>/.konfuzio-watch.lock`` (a hidden name: the watcher ignores it): the inbox belongs to
  one journal. It holds JSON {journal_id, host, pid, state, mode, cluster_id, journal, started_at}.
  A daemon that cannot take it refuses, naming the holder. A free lock whose marker names another
  journal_id (an earlier daemon with another state folder, or a journal that was lost) is taken
  over with one WARNING.
- ``<processing folder>/.konfuzio-watch.processing.lock``, the same JSON: the files waiting there
  are in the hands of a live daemon. Only its holder adopts files of that folder that no journal
  row claims (``processing.py``). The inbox's marker is not enough for that: anyone who may write
  the inbox may remove it, and it is gone when the inbox is renamed and recreated; then a second
  daemon with a state folder of its own took the marker, found the first one's files in flight in
  the processing folder (the same folder: its name follows the inbox's path) without a row in its
  own journal, put them back into the inbox and uploaded them again. The processing folder is
  0700: only the daemon's user can remove this one. Taken after the journal is opened (the
  journal names the folder), before the inbox's marker is written.

A running daemon looks at both markers every few seconds (``FolderLock.verify``: does the path
still name the file whose descriptor it holds?). One that was removed or replaced is taken again
and rewritten, with one WARNING. If another process holds the new one and its JSON names a
running daemon, the daemon stops with an ERROR and a non-zero exit, and refuses to start while the
other runs. If the JSON names nobody running, the holder is a daemon starting: it writes its name
only once it holds its processing folder's lock, so it refuses in a moment when that folder is
this daemon's, and stopping now would hand the files in flight there to it; the running daemon
waits and takes the marker once it is free.

Clustered mode: the nodes that share one PostgreSQL journal on purpose take these markers with LOCK_SH
instead of LOCK_EX; they say ``mode: "cluster"`` and ``cluster_id`` = the shared journal's
``journal_id``. The first node (the one that gets LOCK_EX: nobody else holds the marker) writes it
and then holds it shared like the others; a node that finds it held shared joins only if the
marker names its own journal. Nodes of one cluster coexist, a node whose journal is another
refuses, and a single daemon (``mode: "single"``, LOCK_EX) and a cluster exclude each other,
because a shared and an exclusive flock do. On NFS, Linux gives flock the server's locks, so this
holds across machines. The last node out marks the marker stopped.

Each node also writes ``<inbox>/.konfuzio-watch.node-<node id>``: a random marker it also records
in the journal (``BaseJournal.join``). Another node that reads the same marker in its inbox sees
the same folder; one that does not (another mount, another path) watches another inbox, which
``konfuzio-watch check`` says and the daemon logs.

File systems without flock (some SMB mounts answer ENOLCK/EOPNOTSUPP) leave the inbox
unguarded: the daemon says so in a WARNING and still writes the markers.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("konfuzio_watch")

DAEMON_LOCK_NAME = "daemon.lock"
INBOX_LOCK_NAME = ".konfuzio-watch.lock"
PROCESSING_LOCK_NAME = ".konfuzio-watch.processing.lock"
NODE_MARKER_PREFIX = ".konfuzio-watch.node-"
MODE_SINGLE = "single"
MODE_CLUSTER = "cluster"
JOIN_WAIT_S = 3.0  # how long a node waits for another node of its cluster that is writing the marker
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


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


class DaemonLock:
    """``<state>/daemon.lock``: this process is the journal's only user."""

    def __init__(self, state_dir: Path, inbox: Path):
        self.file = LockFile(state_dir / DAEMON_LOCK_NAME)
        self.state_dir = state_dir
        self._info: dict[str, Any] = {
            "pid": os.getpid(),
            "host": hostname(),
            "started_at": time.time(),
            "state": str(state_dir),
            "inbox": str(inbox),
            "monitor_url": None,
            "uid": os.geteuid(),
            "gid": os.getegid(),
            "groups": os.getgroups(),
        }

    def acquire(self) -> DaemonLock:
        if not self.file.try_lock():
            holder = Holder.from_json(self.file.read())
            raise LockHeld(
                f"another konfuzio-watch ({holder.describe()}) is running on {self.state_dir}; stop it first"
            )
        self.file.write(self._info)
        return self

    def set_monitor_url(self, url: str | None) -> None:
        self._info["monitor_url"] = url
        if self.file.held:
            self.file.write(self._info)

    def set_listening(self, key: str, host: str, port: int) -> None:
        """The daemon listens on ``host:port`` for ``key`` (``callback.port``, ``monitor.port``)."""
        self._info.setdefault("listening", {})[key] = f"{host}:{port}"
        if self.file.held:
            self.file.write(self._info)

    def release(self) -> None:
        self.file.release({**self._info, "stopped_at": time.time()})


def read_daemon_lock(state_dir: Path) -> Holder | None:
    """What the state folder's lock file says, without taking the lock; None if there is none."""
    data = LockFile(state_dir / DAEMON_LOCK_NAME).read()
    return Holder.from_json(data) if data else None


class FolderLock:
    """A flock'ed marker in a folder that one journal uses (see the module doc): LOCK_EX for one daemon;
    ``cluster_id`` (this node's shared journal's id): LOCK_SH with the other nodes of that journal."""

    NAME = ""
    TAKEN_OVER = ""  # the take-over WARNING (``claim``); empty: none

    def __init__(self, folder: Path, state_dir: Path, cluster_id: str | None = None, journal: str | None = None):
        self.file = LockFile(folder / self.NAME)
        self.folder = folder
        self.state_dir = state_dir
        self.cluster_id = cluster_id
        self.journal = journal
        self.previous: Holder | None = None
        self.first = True  # this process wrote the marker (clustered mode: the first node of the cluster here)
        self._unguarded = False
        self._info: dict[str, Any] = {}

    def uses(self) -> str:
        """What the holder of this marker does, for the refusals: ``is watching the inbox /srv/scans``."""
        raise NotImplementedError

    def acquire(self) -> FolderLock:
        """Take the lock (refusing if held) and remember what the marker said before."""
        self._take()
        data = self.file.read()
        self.previous = Holder.from_json(data) if data else None
        return self

    def _take(self) -> None:
        try:
            locked = self.file.try_lock()
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            if not self._unguarded:
                log.warning(
                    "cannot lock %s (%s): this file system has no flock, so another daemon on this folder "
                    "would not be noticed",
                    self.file.path,
                    exc.strerror or exc,
                )
            self.file.open_unlocked()
            self._unguarded = locked = True
        if not locked and self.cluster_id is not None:
            locked = self._join()
        if not locked:
            raise self._refusal(Holder.from_json(self.file.read()))

    def _join(self) -> bool:
        """Clustered mode, the marker is held: join the nodes that hold it shared if they are this
        journal's; True if joined, False if a single daemon holds it. LockHeld if another cluster does.
        A node of ours between its LOCK_EX and its LOCK_SH (writing the marker) is waited for."""
        deadline = time.monotonic() + JOIN_WAIT_S
        while True:
            if self.file.try_lock(shared=True):
                holder = Holder.from_json(self.file.read())
                if holder.mode == MODE_CLUSTER and holder.cluster_id == self.cluster_id:
                    self.first = False
                    return True
                self.file.close()
                raise self._refusal(holder)
            if self.file.try_lock():  # the other one left meanwhile: the marker is ours to write
                return True
            holder = Holder.from_json(self.file.read())
            if holder.mode != MODE_CLUSTER or holder.cluster_id != self.cluster_id or time.monotonic() > deadline:
                return False
            time.sleep(0.02)  # a node of this cluster is writing the marker: it holds it shared in a moment

    def _refusal(self, holder: Holder) -> LockHeld:
        return LockHeld(self._refusal_text(holder), holder)

    def _refusal_text(self, holder: Holder) -> str:
        uses = self.uses()
        if holder.mode == MODE_CLUSTER:
            if self.cluster_id is not None:
                return (
                    f"another konfuzio-watch cluster (journal {holder.journal or 'unknown'}, id "
                    f"{holder.cluster_id}, started by {holder.describe()}) {uses}; this node's journal is another "
                    "one: use the same journal.url as its nodes, or give this cluster its own inbox"
                )
            return (
                f"a cluster of konfuzio-watch nodes (journal {holder.journal or 'unknown'}, started by "
                f"{holder.describe()}) {uses}; a daemon with a journal of its own (SQLite) cannot join it: set "
                "journal.url to the cluster's, or give this daemon its own inbox"
            )
        state = f", state folder {holder.state}" if holder.state else ""
        if self.cluster_id is not None:
            return (
                f"another konfuzio-watch ({holder.describe()}{state}) {uses} with a journal of its own (SQLite); "
                "stop it before nodes with a shared journal take over this inbox"
            )
        return (
            f"another konfuzio-watch ({holder.describe()}{state}) {uses}; stop it first, or give each daemon its "
            "own inbox"
        )

    def claim(self, journal_id: str) -> None:
        """Write the marker for ``journal_id``; one WARNING (``TAKEN_OVER``) if it named another journal
        before. A node that joined a cluster here leaves the marker as the cluster's first node wrote it."""
        cluster = self.cluster_id is not None
        self._info = {
            "journal_id": journal_id,
            "host": hostname(),
            "pid": os.getpid(),
            "state": str(self.state_dir),
            "mode": MODE_CLUSTER if cluster else MODE_SINGLE,
            "cluster_id": journal_id if cluster else None,
            "started_at": time.time(),
        }
        if cluster:
            self._info["journal"] = self.journal
        if not self.first:
            return
        p = self.previous
        if self.TAKEN_OVER and p is not None and p.journal_id is not None and p.journal_id != journal_id:
            log.warning(self.TAKEN_OVER, self.folder, p.journal_id, p.state or "unknown", p.describe())
        self._write_info()

    def _write_info(self) -> None:
        self.file.write(self._info)
        if self.cluster_id is not None and not self._unguarded:
            self._hold_shared()

    def _hold_shared(self) -> None:
        """The first node: from LOCK_EX (while it wrote the marker) to LOCK_SH, like the other nodes."""
        for _ in range(10):
            if self.file.share():
                return
            self.file.close()  # another process got in between: join it, or write the marker again
            if not self._join():
                break
            if not self.first:
                return
            self.file.write(self._info)
        raise self._refusal(Holder.from_json(self.file.read()))

    def verify(self) -> bool:
        """True if the marker is still the file this process holds. If it was removed or replaced (its
        folder renamed and recreated), take the one at its path now as at start-up and write this
        process's JSON into it (a joining node: the cluster's is there), and return False. LockHeld:
        another daemon holds the new one; OSError: it cannot be made (e.g. the folder is gone). Either
        way the old one stays held."""
        if self.file.in_place():
            return True
        held, first, self.file, self.first = self.file, self.first, LockFile(self.file.path), True
        try:
            self._take()
            if self.first:
                self._write_info()
        except BaseException:
            self.file.close()
            self.file, self.first = held, first
            raise
        held.close()
        return False

    def release(self) -> None:
        if self.cluster_id is None:
            # The marker keeps naming its journal (the next daemon compares journal_ids); only the pid goes.
            self.file.release({**self._info, "stopped_at": time.time()} if self._info else None)
            return
        if not self.file.held:
            return
        self.file.close()
        if self._unguarded:
            return
        last = LockFile(self.file.path)  # the last node out says so
        try:
            if last.try_lock():
                data = last.read()
                if data.get("cluster_id") == self.cluster_id:
                    last.release({**data, "stopped_at": time.time()})
                else:
                    last.close()
        except OSError as exc:
            log.warning("cannot update %s: %s", last.path, exc.strerror or exc)


class InboxLock(FolderLock):
    """``<inbox>/.konfuzio-watch.lock``: this journal is the inbox's only user (see the module doc)."""

    NAME = INBOX_LOCK_NAME
    TAKEN_OVER = (
        "the inbox %s was last watched with another journal (id %s, state folder %s, %s); taking it over: "
        "the files that journal left unfinished are not in this one's"
    )

    @property
    def inbox(self) -> Path:
        return self.folder

    def uses(self) -> str:
        return f"is watching the inbox {self.folder}"


class ProcessingLock(FolderLock):
    """``<processing folder>/.konfuzio-watch.processing.lock``: the files waiting there are this journal's,
    in the hands of a live daemon (see the module doc)."""

    NAME = PROCESSING_LOCK_NAME

    def uses(self) -> str:
        return f"has files in flight in the processing folder {self.folder}"


def node_marker_path(inbox: Path, node_id: str) -> Path:
    return inbox / f"{NODE_MARKER_PREFIX}{node_id}"


def write_node_marker(inbox: Path, node_id: str, journal_id: str) -> str:
    """Write this node's marker into the inbox (atomically: a temp name, then rename); returns the
    random value it holds, which the node also records in the journal."""
    value = secrets.token_hex(16)
    path = node_marker_path(inbox, node_id)
    temp = path.with_name(path.name + ".tmp")
    data = {
        "node": node_id,
        "host": hostname(),
        "pid": os.getpid(),
        "journal_id": journal_id,
        "marker": value,
        "written_at": time.time(),
    }
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o664)
    try:
        os.write(fd, (json.dumps(data, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    return value


def read_node_marker(inbox: Path, node_id: str) -> str | None:
    """The value in a node's marker as this machine sees the inbox; None if there is none."""
    try:
        with open(node_marker_path(inbox, node_id), "rb") as f:
            data = json.loads(f.read(64 * 1024))
    except (OSError, ValueError):
        return None
    value = data.get("marker") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def remove_node_marker(inbox: Path, node_id: str) -> None:
    try:
        os.unlink(node_marker_path(inbox, node_id))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", node_marker_path(inbox, node_id), exc.strerror or exc)


def foreign_inbox_nodes(inbox: Path, me: str, nodes: list[Any], alive_s: float) -> list[Any]:
    """The other live nodes (heard from within ``alive_s``) whose marker this machine does not read
    in ``inbox``: they watch another folder."""
    return [
        n
        for n in nodes
        if n.id != me
        and n.silent_s <= alive_s
        and n.inbox_marker is not None
        and read_node_marker(inbox, n.id) != n.inbox_marker
    ]
