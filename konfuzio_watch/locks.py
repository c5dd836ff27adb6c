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

import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

from .lock_file import Holder, LockFile, LockHeld, hostname

log = logging.getLogger("konfuzio_watch")

DAEMON_LOCK_NAME = "daemon.lock"
INBOX_LOCK_NAME = ".konfuzio-watch.lock"
PROCESSING_LOCK_NAME = ".konfuzio-watch.processing.lock"
MODE_SINGLE = "single"
MODE_CLUSTER = "cluster"
JOIN_WAIT_S = 3.0  # how long a node waits for another node of its cluster that is writing the marker
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


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
