"""Noticing files: a watchdog observer on the inbox plus full scans (at start-up and periodically).

The watcher only *reports* paths that may be new or changed; whether a file is finished
being written is decided by the scheduler (readiness.py), and the journal deduplicates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from .files import is_ignored

log = logging.getLogger(__name__)

Report = Callable[[str, str], None]  # (kind, absolute path); kind is "file" or "dir"


class InboxFilter:
    """Which paths under the inbox are candidates: not ignored, not in our own folders."""

    def __init__(self, inbox: Path, own_folders: list[Path], patterns: tuple[str, ...]):
        self.inbox = os.path.abspath(inbox)
        self.own = [os.path.abspath(p) for p in own_folders]
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


class _Handler(FileSystemEventHandler):
    def __init__(self, report: Report, keep: InboxFilter):
        self.report = report
        self.keep = keep

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("created", "modified", "closed", "moved"):
            return
        path = os.fsdecode(event.dest_path if event.event_type == "moved" else event.src_path)
        if self.keep.rel_parts(path) is None:
            return
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self.report("dir", path)  # a folder moved in brings files without events
            return
        self.report("file", path)


class InboxWatcher:
    def __init__(self, keep: InboxFilter, report: Report, *, polling: bool = False, poll_interval_s: float = 5.0):
        self.keep = keep
        self.report = report
        self.polling = polling
        self.poll_interval_s = poll_interval_s
        self._observer: Observer | PollingObserver | None = None

    def start(self) -> None:
        observer = PollingObserver(timeout=self.poll_interval_s) if self.polling else Observer()
        observer.name = "inbox-observer"
        observer.schedule(_Handler(self.report, self.keep), self.keep.inbox, recursive=True)
        observer.start()
        self._observer = observer

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._observer is None:
            return
        self._observer.stop()
        self._observer.join(timeout_s)
        if self._observer.is_alive():
            log.warning("the inbox observer did not stop within %.0f s", timeout_s)
        self._observer = None

    def scan(self, top: str | None = None) -> Iterator[str]:
        """Every candidate file below ``top`` (default: the inbox), without following symlinked dirs."""
        stack = [top or self.keep.inbox]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("cannot scan %s: %s", folder, exc.strerror or exc)
                continue
            for entry in entries:
                if self.keep.rel_parts(entry.path) is None:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    yield entry.path
