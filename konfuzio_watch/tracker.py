"""Candidate files on their way in: seen -> settled -> claimed.

The watcher and the scans report paths; the tracker stats them, restarts a file's settle
clock whenever its size or mtime changes, and hands out the ones that have been stable for
``settle_s`` (and look complete: a PDF ends with ``%%EOF``) when ``step(now)`` is called. A
file that stays empty or without its ``%%EOF`` is handed out after ``grace_s`` marked
incomplete (``ReadyFile.complete``), for the pipeline to fail it with that reason. A handed-out
path stays tracked until the claim is confirmed (``claimed``): if the claim could not be
recorded (the journal's disk is full), ``keep`` makes it due again, so nothing waits for the
next full rescan. Time comes in as ``now``; tests drive it with a fake clock.

A settled file that a process still holds open for writing (``writers.py`` looks through /proc, for
all the files of a batch at once) is not handed out either: it is said once in the log, shown as
``open for writing`` in ``status``, looked at again at once when a writer closes it (inotify's
close-write event reaches ``seen``) or changes it, else at a growing interval; held past
``grace_s``, it is said again as a warning, and it stays pending until it is closed. Writers the
look cannot see (other users' processes, other machines on a share) leave the settle time alone.

A file the daemon may not read (open fails with EACCES/EPERM) is never handed out: claiming it
would hide it from its owner in the processing folder. It stays in the inbox under its name,
logged once, is looked at again at each event and rescan, and is handed out once readable.
Paths longer than PATH_MAX are handled like any other (``long_paths.lstat_any`` and friends). A share
that does not answer (EIO and its kind, ``shares.is_share_error``) makes no candidate go: it is
looked at again later.
``snapshot(now)`` says where every candidate stands, for ``status``.
"""

from __future__ import annotations

import dataclasses
import errno
import heapq
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import readiness, writers
from .journal import display_name
from .long_paths import PATH_MAX, fits_path_max, lstat_any, open_any
from .shares import is_share_error

log = logging.getLogger("konfuzio_watch")

CLAIM_BATCH = 200
NOT_READABLE = (errno.EACCES, errno.EPERM)

CanRead = Callable[[str], OSError | None]


def probe_readable(path: str) -> OSError | None:
    """The error that opening ``path`` for reading would give if the daemon may not read it
    (EACCES, EPERM), else None. Any other failure is left to the claim and validation."""
    try:
        fd = open_any(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        return exc if exc.errno in NOT_READABLE else None
    os.close(fd)
    return None


@dataclass(frozen=True)
class ReadyFile:
    """A candidate handed out by ``step``: claim it. ``detected_at``: when the tracker first saw
    the file. ``complete`` False: it stayed empty or without ``%%EOF`` for the grace period;
    ``reason`` says so, to fail it with."""

    path: str
    detected_at: float
    complete: bool = True
    reason: str | None = None


@dataclass(frozen=True)
class Candidate:
    """Where a candidate not yet claimed stands (``snapshot``).

    ``state``: ``settling`` (changed ``stable_s`` ago, handed out once that reaches ``settle_s``),
    ``settled`` (handed out, its claim not yet recorded), ``incomplete`` (empty or no ``%%EOF``;
    fails in ``due_in_s``), ``unreadable`` (``reason``; waits until readable), ``too long`` (its
    path is longer than PATH_MAX; settles like any other, but cannot be kept under its name),
    ``open for writing`` (``reason``: by whom, for how long; waits until it is closed).
    """

    path: str
    name: str  # relative to the inbox if the tracker knows it, escaped for display
    state: str
    size: int
    detected_at: float
    changed_at: float
    stable_s: float
    settle_s: float
    due_in_s: float | None  # until it is handed out (incomplete: until it is failed); None: not while unreadable
    reason: str | None = None

    @property
    def text(self) -> str:
        """``settling (stable for 1.2 of 2 s)``, ``incomplete (no %%EOF; fails in 48 s)``, ..."""
        if self.state in ("unreadable", "open for writing"):
            return f"{self.state} ({self.reason})"
        if self.state == "incomplete":
            return f"incomplete ({self.reason}; fails in {self.due_in_s or 0:.0f} s)"
        stable = f"stable for {min(self.stable_s, self.settle_s):.1f} of {self.settle_s:g} s"
        if self.state == "too long":
            return f"too long ({self.reason}; {stable})"
        if self.state == "settled":
            return "settled (waiting to be claimed)"
        return f"settling ({stable})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly; ``path`` is the escaped ``name``."""
        data = dataclasses.asdict(self)
        data["path"] = data.pop("name")
        data["text"] = self.text
        return data


class CandidateTracker:
    def __init__(
        self,
        settle_s: float,
        grace_s: float,
        scan: Callable[[str], Iterable[str]],
        *,
        batch: int = CLAIM_BATCH,
        can_read: CanRead = probe_readable,
        inbox: str | None = None,
        find_writers: writers.FindWriters = writers.find_writers,
    ):
        self.settle_s = settle_s
        self.grace_s = grace_s
        self._scan = scan
        self.batch = batch
        self._can_read = can_read
        self._find_writers = find_writers
        self._blind_said = False  # that a look through /proc could not see everything: said once
        self.inbox = inbox  # only to name files relative to it in the log
        self.candidates: dict[str, readiness.Observation] = {}
        self._due: list[tuple[float, str]] = []  # heap of (check at, path); stale entries are skipped
        self._resolved: dict[str, str] | None = None  # during step(): folder -> its realpath

    def __len__(self) -> int:
        return len(self.candidates)

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    # -- facts ---------------------------------------------------------------------------------

    def seen(self, path: str, now: float) -> None:
        """A fresh look at a candidate: (re)start its settle clock if it changed; one the daemon
        could not read is checked again."""
        try:
            st = lstat_any(path)
        except OSError as exc:
            if not is_share_error(exc):  # (a share that does not answer: it is still what it was)
                self.candidates.pop(path, None)  # gone (claimed, renamed away, deleted)
            return
        if stat.S_ISDIR(st.st_mode):
            self.folder_seen(path, now)
            return
        previous = self.candidates.get(path)
        if not stat.S_ISREG(st.st_mode):  # never read: claimed at once, validation reports it
            if previous is not None and not previous.regular:
                obs = previous
            else:
                obs = readiness.Observation(
                    st.st_size, st.st_mtime_ns, now, previous.first_seen if previous else now, regular=False
                )
        else:
            obs = readiness.observe(
                previous if previous is None or previous.regular else None, st.st_size, st.st_mtime_ns, now
            )
            if previous is None or not previous.regular or previous.unreadable is not None:
                obs = self._check_readable(path, obs)
            elif obs is previous and obs.held is not None and obs.held.checked is not None:
                obs = dataclasses.replace(obs, held=readiness.look_again(obs.held))  # e.g. a writer closed it
        if previous is not obs:
            self._track(path, obs)

    def folder_seen(self, path: str, now: float) -> None:
        try:
            is_folder = stat.S_ISDIR(lstat_any(path).st_mode)
        except OSError:
            return
        if is_folder:
            for found in self._scan(path):
                self.seen(found, now)

    def claimed(self, ready: Iterable[str | ReadyFile]) -> None:
        for path in _paths(ready):
            self.candidates.pop(path, None)

    def keep(self, ready: Iterable[str | ReadyFile], now: float) -> None:
        """Their claim could not be recorded: hand them out again as soon as possible."""
        for path in _paths(ready):
            obs = self.candidates.get(path)
            if obs is not None:
                heapq.heappush(self._due, (now, path))

    # -- decisions -------------------------------------------------------------------------------

    def step(self, now: float) -> list[ReadyFile]:
        """The candidates that are ready to be claimed now (at most one batch)."""
        ready: dict[str, ReadyFile] = {}
        files: dict[str, writers.FileId] = {}  # the regular files among them: (device, inode)
        self._resolved = {}  # folder -> its realpath, for this batch (one lookup per folder)
        try:
            while self._due and self._due[0][0] <= now and len(ready) < self.batch:
                _, path = heapq.heappop(self._due)
                obs = self.candidates.get(path)
                if (
                    obs is None
                    or path in ready
                    or obs.unreadable is not None
                    or not readiness.is_ready(obs, now, self.settle_s, self.grace_s)
                ):
                    continue  # stale heap entry; a newer one is queued (or none while unreadable)
                handed_out = self._recheck(path, obs, now)
                if handed_out is not None:
                    ready[path], file_id = handed_out
                    if file_id is not None:
                        files[path] = file_id
        finally:
            self._resolved = None
        for path in self._held_open(files, now):
            del ready[path]
        return list(ready.values())

    def snapshot(self, now: float) -> list[Candidate]:
        """Every candidate not yet claimed and where it stands, oldest first. Reads a copy of the
        candidates (observations are immutable), so another thread may call it; no I/O."""
        out = [self._describe(path, obs, now) for path, obs in list(self.candidates.items())]
        out.sort(key=lambda c: (c.detected_at, c.path))
        return out

    def _describe(self, path: str, obs: readiness.Observation, now: float) -> Candidate:
        stable = max(0.0, now - obs.since)
        due = readiness.ready_at(obs, self.settle_s, self.grace_s)
        state, reason, due_in = "settling", None, max(0.0, due - now)
        if obs.unreadable is not None:
            state, reason, due_in = "unreadable", f"cannot read it: {obs.unreadable}", None
        elif obs.held is not None and obs.held.checked is not None:
            state, reason, due_in = "open for writing", _held(obs.held, now), None
        elif stable >= self.settle_s and not readiness.is_complete(obs):
            state, reason = "incomplete", _incomplete(obs)
        elif not fits_path_max(path):
            state, reason = "too long", f"its path is {len(os.fsencode(path))} bytes, over PATH_MAX ({PATH_MAX})"
        elif due <= now:
            state = "settled"
        return Candidate(
            path, self._name(path), state, obs.size, obs.first_seen, obs.since, stable, self.settle_s, due_in, reason
        )

    def _ready_file(self, path: str, obs: readiness.Observation) -> ReadyFile:
        if not readiness.is_complete(obs):
            waited = max(self.settle_s, self.grace_s)
            return ReadyFile(path, obs.first_seen, False, f"{_incomplete(obs)} after {waited:g} s without a change")
        return ReadyFile(path, obs.first_seen)

    def _track(self, path: str, obs: readiness.Observation) -> None:
        self.candidates[path] = obs
        if obs.unreadable is None:
            heapq.heappush(self._due, (readiness.ready_at(obs, self.settle_s, self.grace_s), path))

    def _realpath(self, folder: str) -> str:
        resolved = self._resolved
        if resolved is None:
            return os.path.realpath(folder)
        if folder not in resolved:
            resolved[folder] = os.path.realpath(folder)
        return resolved[folder]

    def _recheck(
        self, path: str, obs: readiness.Observation, now: float
    ) -> tuple[ReadyFile, writers.FileId | None] | None:
        """Stat once more at claim time; the daemon must be able to read it, and a PDF must also
        end with %%EOF (or wait out the grace). With the file's (device, inode) if it is regular."""
        try:
            st = lstat_any(path)
        except OSError as exc:
            if is_share_error(exc):  # the share does not answer: looked at again later, not forgotten
                heapq.heappush(self._due, (now + max(self.settle_s, 1.0), path))
                return None
            if exc.errno == errno.ELOOP:  # a long path is walked without following links
                log.warning("%s: a folder in its path is a symbolic link; not followed", self._name(path))
            self.candidates.pop(path, None)
            return None
        parent = os.path.dirname(path)
        if fits_path_max(parent) and self._realpath(parent) != parent:  # a folder was swapped for a symlink
            log.warning("%s: a folder in its path is a symbolic link; not followed", self._name(path))
            self.candidates.pop(path, None)
            return None
        if stat.S_ISDIR(st.st_mode):  # a folder took the file's place
            self.candidates.pop(path, None)
            self.folder_seen(path, now)
            return None
        if stat.S_ISREG(st.st_mode) != obs.regular:  # a FIFO took a file's place, or the other way round
            self.seen(path, now)
            return None
        if not obs.regular:
            return ReadyFile(path, obs.first_seen), None
        if (st.st_size, st.st_mtime_ns) != (obs.size, obs.mtime_ns):
            self.seen(path, now)
            return None
        checked = self._check_readable(path, obs)
        if checked.unreadable is not None:
            self._track(path, checked)
            return None
        if obs.looks_complete and obs.size > 0 and not looks_complete(path, st.st_size):
            self._track(path, dataclasses.replace(obs, looks_complete=False))
            return None
        return self._ready_file(path, obs), (st.st_dev, st.st_ino)

    def _held_open(self, files: dict[str, writers.FileId], now: float) -> list[str]:
        """Which of the files about to be handed out a process holds open for writing: one look
        through /proc for all of them. Those stay candidates, looked at again later."""
        if not files:
            return []
        look = self._find_writers(set(files.values()))
        self._say_if_blind(look)
        held = []
        for path, file_id in files.items():
            obs = self.candidates[path]
            writer = look.writers.get(file_id)
            new = readiness.held_by(obs, None if writer is None else str(writer), now)
            if writer is None:
                if new is not obs:
                    self.candidates[path] = new  # (handed out now: no new due time)
                continue
            if obs.held is None:
                log.info("%s: open for writing by %s; taken in once it is closed", self._name(path), writer)
            elif readiness.is_held_past(new, now, self.grace_s):
                log.warning(
                    "%s: still open for writing by %s after %.0f s; it stays in the inbox until it is closed",
                    self._name(path),
                    writer,
                    now - obs.held.since,
                )
                new = readiness.said_loudly(new)
            self._track(path, new)
            held.append(path)
        return held

    def _say_if_blind(self, look: writers.Look) -> None:
        """Once: writers the look could not see (another user's processes, a look cut short)."""
        if self._blind_said or (look.complete and not look.hidden):
            return
        self._blind_said = True
        if not look.complete:
            log.warning(
                "the look through /proc for processes writing to files about to be taken in was cut "
                "short (no /proc, or more open files than it may take time for); the files it did not "
                "reach are taken in by watch.settle_seconds alone"
            )
        else:
            log.info(
                "%d process(es) of other users cannot be looked into; a file they hold open for writing is "
                "taken in by watch.settle_seconds alone",
                look.hidden,
            )

    def _check_readable(self, path: str, obs: readiness.Observation) -> readiness.Observation:
        """Probe whether the daemon may read the file; log a change (once), not every look."""
        error = self._can_read(path)
        reason = None if error is None else (error.strerror or str(error))
        if reason == obs.unreadable:
            return obs
        if reason is not None:
            log.warning(
                "%s: cannot read it (%s); it stays in the inbox until konfuzio-watch may read it",
                self._name(path),
                reason,
            )
        else:
            log.info("%s: konfuzio-watch may read it now; it is taken in as usual", self._name(path))
        return dataclasses.replace(obs, unreadable=reason)

    def _name(self, path: str) -> str:
        if self.inbox and path.startswith(self.inbox.rstrip(os.sep) + os.sep):
            path = path[len(self.inbox.rstrip(os.sep)) + 1 :]
        return display_name(path)


def _held(held: readiness.Held, now: float) -> str:
    return f"for {max(0.0, now - held.since):.0f} s, by {held.by}; taken in once it is closed"


def _incomplete(obs: readiness.Observation) -> str:
    return "empty (0 bytes)" if obs.size == 0 else "no %%EOF at its end: an incomplete PDF"


def _paths(ready: Iterable[str | ReadyFile]) -> Iterable[str]:
    return (r.path if isinstance(r, ReadyFile) else r for r in ready)


def looks_complete(path: str, size: int) -> bool:
    try:
        return readiness.pdf_looks_complete(path, size)
    except OSError:
        return True  # let validation report it
