"""Candidate files on their way in: seen -> settled -> claimed.

The watcher and the scans report paths; the tracker stats them, restarts a file's settle
clock whenever its size or mtime changes, and hands out the ones that have been stable for
``settle_s`` (and look complete: a PDF ends with ``%%EOF``) when ``step(now)`` is called. A
handed-out path stays tracked until the claim is confirmed (``claimed``): if the claim could
not be recorded (the journal's disk is full), ``keep`` makes it due again, so nothing waits
for the next full rescan. Time comes in as ``now``; tests drive it with a fake clock.
"""

from __future__ import annotations

import heapq
import logging
import os
import stat
from collections.abc import Callable, Iterable

from . import readiness

log = logging.getLogger("konfuzio_watch")

CLAIM_BATCH = 500


class CandidateTracker:
    def __init__(self, settle_s: float, grace_s: float, scan: Callable[[str], Iterable[str]], *,
                 batch: int = CLAIM_BATCH):
        self.settle_s = settle_s
        self.grace_s = grace_s
        self._scan = scan
        self.batch = batch
        self.candidates: dict[str, readiness.Observation] = {}
        self._due: list[tuple[float, str]] = []  # heap of (check at, path); stale entries are skipped

    def __len__(self) -> int:
        return len(self.candidates)

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    # -- facts ---------------------------------------------------------------------------------

    def seen(self, path: str, now: float) -> None:
        """A fresh look at a candidate: (re)start its settle clock if it changed."""
        try:
            st = os.lstat(path)
        except OSError:
            self.candidates.pop(path, None)  # gone (claimed, renamed away, deleted)
            return
        if stat.S_ISDIR(st.st_mode):
            self.folder_seen(path, now)
            return
        previous = self.candidates.get(path)
        if not stat.S_ISREG(st.st_mode):  # never read: claimed at once, validation reports it
            obs = previous or readiness.Observation(st.st_size, st.st_mtime_ns, now - 1e9)
        else:
            obs = readiness.observe(previous, st.st_size, st.st_mtime_ns, now)
        if previous is not obs:
            self._track(path, obs)

    def folder_seen(self, path: str, now: float) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            for found in self._scan(path):
                self.seen(found, now)

    def claimed(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.candidates.pop(path, None)

    def keep(self, paths: Iterable[str], now: float) -> None:
        """Their claim could not be recorded: hand them out again as soon as possible."""
        for path in paths:
            obs = self.candidates.get(path)
            if obs is not None:
                heapq.heappush(self._due, (now, path))

    # -- decisions -------------------------------------------------------------------------------

    def step(self, now: float) -> list[str]:
        """The candidates that are ready to be claimed now (at most one batch)."""
        ready: list[str] = []
        while self._due and self._due[0][0] <= now and len(ready) < self.batch:
            _, path = heapq.heappop(self._due)
            obs = self.candidates.get(path)
            if obs is None or path in ready or not readiness.is_ready(obs, now, self.settle_s, self.grace_s):
                continue  # stale heap entry; a newer one is queued
            if self._recheck(path, obs, now):
                ready.append(path)
        return ready

    def _track(self, path: str, obs: readiness.Observation) -> None:
        self.candidates[path] = obs
        heapq.heappush(self._due, (readiness.ready_at(obs, self.settle_s, self.grace_s), path))

    def _recheck(self, path: str, obs: readiness.Observation, now: float) -> bool:
        """Stat once more at claim time; a PDF must also end with %%EOF (or wait out the grace)."""
        try:
            st = os.lstat(path)
        except OSError:
            self.candidates.pop(path, None)
            return False
        parent = os.path.dirname(path)
        if os.path.realpath(parent) != parent:  # a folder on the way was swapped for a symlink
            log.warning("%s: a folder in its path is a symbolic link; not followed", path)
            self.candidates.pop(path, None)
            return False
        if stat.S_ISDIR(st.st_mode):  # a folder took the file's place
            self.candidates.pop(path, None)
            self.folder_seen(path, now)
            return False
        if not stat.S_ISREG(st.st_mode):
            return True
        if (st.st_size, st.st_mtime_ns) != (obs.size, obs.mtime_ns):
            self.seen(path, now)
            return False
        if obs.looks_complete and obs.size > 0 and not looks_complete(path, st.st_size):
            self._track(path, readiness.Observation(obs.size, obs.mtime_ns, obs.since, looks_complete=False))
            return False
        return True


def looks_complete(path: str, size: int) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True  # let validation report it
    try:
        head = os.pread(fd, 8, 0)
        tail = os.pread(fd, readiness.TAIL_BYTES, max(0, size - readiness.TAIL_BYTES))
    except OSError:
        return True
    finally:
        os.close(fd)
    return readiness.content_looks_complete(head, tail)
