"""Noticing files: a watchdog observer on the inbox plus full scans (at start-up and periodically).

The watcher only *reports* paths that may be new or changed; whether a file is finished
being written is decided by the scheduler (readiness.py), and the journal deduplicates.
Which observer runs follows ``watch.polling`` and the inbox's file system (``plan_watching``): on
a network or FUSE mount, files other hosts write make no inotify event here, so ``auto`` polls
there. Which one runs and why is logged, and shown by ``check`` and ``status``; ``count_waiting``
lets ``status`` count the files waiting in the inbox whether or not an event came for them.
Scans reach folders whose path is longer than PATH_MAX (inotify cannot watch those: files in
them are found by the periodic rescan). Hidden and ignored files are passed over without a
word; ``ignored_files`` lists them, with the reason, for ``status --all``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
from watchdog.observers.polling import PollingObserverVFS

from .file_names import ignore_reason, is_ignored
from .journal import display_name
from .long_paths import list_dir
from .mounts import Mount, mount_of

log = logging.getLogger(__name__)

# watchdog 7 warns from its inotify thread when a new folder's watch is registered twice
# (a benign race on folders created in quick succession); keep it out of the service log.
warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning)

# watchdog holds an IN_MOVED_FROM back (0.5 s by default) to pair it with its IN_MOVED_TO, and every
# later event waits behind it. Each claim moves a file out of the inbox (a move_from that is never
# paired), so a file written within 0.5 s after a claim started its settle time up to 0.5 s late. The
# two halves of a rename inside the inbox come from one syscall, in one read of the inotify queue:
# 20 ms still pairs them, and the handler does not need the pairing anyway (a move reports its
# destination; an unpaired one reports a deletion and a new file).
InotifyMoveEventGrouper.delay = 0.02

Report = Callable[[str, str], None]  # (kind, absolute path); kind is "file" or "dir"


class InboxFilter:
    """Which paths under the inbox are candidates: not ignored, not in our own folders."""

    def __init__(self, inbox: Path, own_folders: list[Path], patterns: tuple[str, ...]):
        # Real paths: the inbox is often a symlink to a share; below it, nothing is followed.
        self.inbox = os.path.realpath(inbox)
        self.own = [os.path.realpath(p) for p in own_folders]
        self.patterns = patterns

    def rel_parts(self, path: str) -> tuple[str, ...] | None:
        """The path's components relative to the inbox, or None if it is not a candidate."""
        path = os.path.abspath(path)
        if not path.startswith(self.inbox + os.sep):
            return None
        if any(path == own or path.startswith(own + os.sep) for own in self.own):
            return None
        parts = tuple(path[len(self.inbox) + 1 :].split(os.sep))
        if is_ignored(parts, self.patterns):
            return None
        return parts


PROBE_PREFIX = ".konfuzio-watch-probe-"


# What the handler acts on. Passed to the observer, which asks inotify for these alone: no events for
# the opens and reads of the daemon's own readiness checks, nor for deletions (the claims' moves out
# of the inbox still arrive, as part of IN_MOVE, and are dropped by the observer).
WANTED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileAttribEvent,
    DirAttribEvent,
]


class _Handler(FileSystemEventHandler):
    def __init__(self, report: Report, keep: InboxFilter):
        self.report = report
        self.keep = keep
        self.probe_seen = threading.Event()

    def on_any_event(self, event: FileSystemEvent) -> None:
        # attrib: a chmod/chown, e.g. a file the daemon could not read made readable (inotify only)
        if event.event_type not in ("created", "modified", "closed", "moved", "attrib"):
            return
        path = os.fsdecode(event.dest_path if event.event_type == "moved" else event.src_path)
        if os.path.basename(path).startswith(PROBE_PREFIX):
            self.probe_seen.set()
            return
        if self.keep.rel_parts(path) is None:
            return
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self.report("dir", path)  # a folder moved in brings files without events
            return
        self.report("file", path)


ObserverFactory = Callable[[bool, float, frozenset[str]], BaseObserver]


def make_observer(polling: bool, poll_interval_s: float, skip: frozenset[str] = frozenset()) -> BaseObserver:
    """``skip``: folders a polling observer never walks (done/ or failed/ inside the inbox: with
    thousands of results in them, each poll would stat every one)."""
    if polling:  # lstat: never walk into a symlinked folder (a link to done/ or /etc)

        def scandir(path: str) -> list[os.DirEntry]:
            with os.scandir(path) as entries:
                return [e for e in entries if e.path not in skip]

        return PollingObserverVFS(os.lstat, scandir, polling_interval=poll_interval_s)
    return Observer()


REMOTE_WHY = "where other hosts' writes make no inotify event"

PollingSetting = Literal["auto", True, False]  # watch.polling


@dataclass(frozen=True)
class WatchPlan:
    """Which watcher the inbox gets, and why. ``why`` follows ``by polling every 5 s`` or ``by inotify``
    as it is said in the log, ``check`` and ``status`` (``: it is on ...`` or `` (watch.polling: true)``)."""

    polling: bool
    why: str
    probe: bool = False  # inotify whose events a probe file must prove first (auto, on a local file system)
    warning: bool = False  # watch.polling: false where other hosts write unseen: their files wait for the rescan

    def describe(self, poll_interval_s: float) -> str:
        return f"by {f'polling every {poll_interval_s:g} s' if self.polling else 'inotify'}{self.why}"


def plan_watching(setting: PollingSetting, mount: Mount | None, rescan_interval_s: float) -> WatchPlan:
    """``auto`` polls a folder on a network or FUSE mount (``mounts.py``): there, a file another host
    writes makes no inotify event here, while the daemon's own writes do, so a probe file would prove
    nothing. Elsewhere it takes inotify, once a probe file showed that its events arrive. ``true`` and
    ``false`` are honoured; ``false`` on such a mount is said as a warning."""
    where = f"it is on {mount.describe()}" if mount is not None else ""
    if setting is True:
        return WatchPlan(True, " (watch.polling: true)")
    if setting is False:
        if mount is not None and mount.is_remote:
            return WatchPlan(
                False,
                f" (watch.polling: false), although {where}, {REMOTE_WHY}: files they write are "
                f"found only by the rescan every {rescan_interval_s:g} s; set watch.polling: auto",
                warning=True,
            )
        return WatchPlan(False, " (watch.polling: false)")
    if mount is None:
        return WatchPlan(False, ": its file system is not known (no /proc/self/mountinfo)", probe=True)
    if mount.is_remote:
        return WatchPlan(True, f": {where}, {REMOTE_WHY}")
    return WatchPlan(False, f": {where}, a local file system", probe=True)


class InboxWatcher:
    """The observer on the inbox, as ``plan_watching`` decides from ``watch.polling`` and the inbox's file
    system. inotify that cannot watch (its limits), or whose probe file's event never comes, gives way
    to polling. ``how`` says which watcher runs and why; it is logged when it changes (INFO, or WARNING
    when files may be found late). ``pause`` stops watching while the inbox's share is away;
    ``is_running`` is False once the observer stopped by itself (watchdog's poller stops for good when
    its folder is missing for a moment): ``start`` again."""

    def __init__(
        self,
        keep: InboxFilter,
        report: Report,
        *,
        polling: PollingSetting = "auto",
        poll_interval_s: float = 5.0,
        rescan_interval_s: float = 300.0,
        observer_factory: ObserverFactory = make_observer,
        probe_timeout_s: float = 2.0,
        find_mount: Callable[[str], Mount | None] = mount_of,
    ):
        self.keep = keep
        self.report = report
        self.setting = polling
        self.polling = False  # what runs now
        self.poll_interval_s = poll_interval_s
        self.rescan_interval_s = rescan_interval_s
        self.observer_factory = observer_factory
        self.probe_timeout_s = probe_timeout_s
        self.find_mount = find_mount
        self.how = ""  # "by polling every 5 s: it is on cifs at /mnt/scans (//nas/scans), where ..."
        self.paused: str | None = None  # why watching is paused (the inbox's share is away)
        self._observer: BaseObserver | None = None
        self._said = ""
        self._scan_errors: dict[str, str] = {}  # folder -> why it could not be scanned (logged once)

    def start(self) -> None:
        plan = plan_watching(self.setting, self.find_mount(self.keep.inbox), self.rescan_interval_s)
        self.paused = None
        if plan.polling:
            self._start_observer(polling=True)
            self._settle(plan, loud=False)
            return
        try:
            self._start_observer(polling=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE):  # inotify's watch/instance limits
                raise
            self._start_observer(polling=True)
            self._settle(
                WatchPlan(
                    True,
                    f": inotify cannot watch it ({exc.strerror or exc}; raise "
                    "fs.inotify.max_user_watches / max_user_instances)",
                ),
                loud=True,
            )
            return
        if plan.probe and not self._events_arrive():
            self.stop()
            self._start_observer(polling=True)
            plan = WatchPlan(True, ": no event arrived for a probe file written into it (a network share?)")
            self._settle(plan, loud=True)
            return
        if plan.probe:
            plan = dataclasses.replace(plan, why=f"{plan.why}, and a probe file's event arrived")
        self._settle(plan, loud=plan.warning)

    def _settle(self, plan: WatchPlan, *, loud: bool) -> None:
        """Record what runs now; say it if it is not what was said last (a restart says nothing new)."""
        self.polling = plan.polling
        self.how = plan.describe(self.poll_interval_s)
        if self.how != self._said:
            self._said = self.how
            log.log(logging.WARNING if loud else logging.INFO, "watching %s %s", self.keep.inbox, self.how)

    def _start_observer(self, polling: bool) -> None:
        observer = self.observer_factory(polling, self.poll_interval_s, frozenset(self.keep.own))
        observer.name = "inbox-observer"
        self._handler = _Handler(self.report, self.keep)
        observer.schedule(self._handler, self.keep.inbox, recursive=True, event_filter=WANTED_EVENTS)
        observer.start()
        self._observer = observer

    def _events_arrive(self) -> bool:
        """Write and remove a probe file; did the observer see it?"""
        probe = os.path.join(self.keep.inbox, f"{PROBE_PREFIX}{secrets.token_hex(4)}")
        try:
            with open(probe, "wb") as f:
                f.write(b"probe")
        except OSError as exc:
            log.warning("cannot write a probe file into %s: %s", self.keep.inbox, exc.strerror or exc)
            return True  # nothing proven either way; the periodic rescan still covers us
        try:
            return self._handler.probe_seen.wait(self.probe_timeout_s)
        finally:
            os.unlink(probe)

    def is_running(self) -> bool:
        """The observer and each of its emitters run (a poller stops by itself when its folder is missing)."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        emitters = observer.emitters
        return bool(emitters) and all(emitter.is_alive() for emitter in emitters)

    def describe(self) -> str:
        """What ``status`` shows: which watcher runs and why, or why watching is paused."""
        return f"paused: {self.paused}" if self.paused is not None else self.how

    def pause(self, reason: str) -> None:
        """Stop watching until ``start``: the inbox's share is away (``reason``)."""
        self.stop()
        self.paused = reason

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._observer is None:
            return
        self._observer.stop()
        self._observer.join(timeout_s)
        if self._observer.is_alive():
            log.warning("the inbox observer did not stop within %.0f s", timeout_s)
        self._observer = None

    def scan(self, top: str | None = None) -> Iterator[str]:
        """Every candidate file below ``top`` (default: the inbox), without following symlinked dirs.
        A folder that cannot be read is logged once (and once more when it can be again)."""
        return walk(self.keep, top or self.keep.inbox, self._list)

    def _list(self, folder: str) -> list[tuple[str, bool]]:
        try:
            entries = list_dir(folder)
        except FileNotFoundError:
            return []  # removed while we looked
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if self._scan_errors.get(folder) != reason:
                self._scan_errors[folder] = reason
                log.warning("cannot scan %s: %s", display_name(folder), reason)
            return []
        if self._scan_errors.pop(folder, None) is not None:
            log.info("can scan %s again", display_name(folder))
        return entries


def walk(keep: InboxFilter, top: str, list_folder: Callable[[str], list[tuple[str, bool]]]) -> Iterator[str]:
    """Every candidate file below ``top``, without following symlinked folders; ``list_folder`` gives a
    folder's entries as ``long_paths.list_dir`` does (and says what it cannot read)."""
    stack = [top]
    while stack:
        folder = stack.pop()
        for name, is_dir in list_folder(folder):
            path = os.path.join(folder, name)
            if keep.rel_parts(path) is None:
                continue
            if is_dir:
                stack.append(path)
            else:
                yield path


@dataclass(frozen=True)
class Waiting:
    """How many files wait in the inbox (``count_waiting``); ``complete`` False: at least that many."""

    files: int
    complete: bool = True
    error: str | None = None  # the inbox could not be read


def count_waiting(
    inbox: str | os.PathLike,
    own_folders: Iterable[str | os.PathLike],
    patterns: tuple[str, ...],
    *,
    limit: int = 10_000,
    budget_s: float = 2.0,
) -> Waiting:
    """The files in the inbox that would be taken in, counted by the watcher's own scan, whether or not an
    event came for them (``status``). Bounded for a big inbox on a slow share: it stops at ``limit`` files
    or after ``budget_s``, and then says "at least"."""
    keep = InboxFilter(Path(inbox), [Path(p) for p in own_folders], patterns)
    errors: list[str] = []

    def list_folder(folder: str) -> list[tuple[str, bool]]:
        try:
            return list_dir(folder)
        except OSError as exc:
            if folder == keep.inbox:
                errors.append(exc.strerror or str(exc))
            return []

    deadline = time.monotonic() + budget_s
    files = 0
    for _ in walk(keep, keep.inbox, list_folder):
        files += 1
        if files >= limit or time.monotonic() > deadline:
            return Waiting(files, complete=False)
    return Waiting(files, error=errors[0] if errors else None)


def ignored_files(
    inbox: str | os.PathLike, own_folders: Iterable[str | os.PathLike], patterns: tuple[str, ...]
) -> list[tuple[str, str]]:
    """What the inbox holds that is never taken in, for ``status --all``: (path relative to the
    inbox, why). An ignored folder is listed once, with a trailing ``/``, not its content; the
    daemon's own folders are left out."""
    keep = InboxFilter(Path(inbox), [Path(p) for p in own_folders], patterns)
    found: list[tuple[str, str]] = []
    stack = [keep.inbox]
    while stack:
        folder = stack.pop()
        try:
            entries = list_dir(folder)
        except OSError:
            continue
        for name, is_dir in entries:
            path = os.path.join(folder, name)
            if any(path == own or path.startswith(own + os.sep) for own in keep.own):
                continue
            parts = tuple(path[len(keep.inbox) + 1 :].split(os.sep))
            reason = ignore_reason(parts, keep.patterns)
            if reason is not None:
                found.append((os.sep.join(parts) + (os.sep if is_dir else ""), reason))
            elif is_dir:
                stack.append(path)
    return sorted(found)
