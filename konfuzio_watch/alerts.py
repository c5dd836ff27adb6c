"""Admin notifications: failed files, a blocked daemon, silent callbacks, a stuck queue.

The daemon reports facts through cheap, non-blocking methods (``file_failed``, ``blocked``, ...);
a worker thread turns them into a few messages and sends them with apprise, so one list of URLs
reaches mail, Teams, Slack or a webhook. Why it is built this way:

- The callers are the scheduling loop and HTTP handlers: a method only updates a small record
  under a lock. It never sends, never reads a file, never waits for the worker.
- A burst (10,000 failed files) must not become 10,000 mails, nor unbounded memory: facts wait in
  one bounded ``Batch`` per destination (``MAX_LISTED`` files by name, the rest counted), and a
  destination gets at most one message per ``min_interval_seconds``.
- Destinations fail on their own (SMTP down, a webhook answering 500, DNS): each keeps its batch
  and is retried with capped backoff, while the others are neither held up nor sent duplicates.
  A failing destination is logged once when it starts failing and once when it works again,
  never per attempt, and never with the secrets its URL carries (apprise's privacy form).
- Time comes from an injected clock and ``pump(now)`` does one step of the work, so batching,
  intervals and backoff are tested with a fake clock on the test's thread; ``build_message`` is
  pure.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from .config import AlertsConfig, ConfigError
from .status import format_age

log = logging.getLogger(__name__)

MAX_LISTED = 20  # failed files named in one message; the rest are counted
MAX_NOTES = 20  # state changes (blocked, unblocked, ...) kept per batch; the rest are counted
MAX_STAGES = 12  # distinct stages counted per batch; further ones count as "other"
MAX_TEXT = 300  # characters kept of a path, an error or a reason
GATHER_S = 5.0  # a first fact waits this long for the rest of its burst
RETRY_BASE_S = 10.0  # a failed send is retried after this, doubling ...
RETRY_CAP_S = 600.0  # ... up to this


class NoteKind(Enum):
    BLOCKED = "blocked"
    UNBLOCKED = "unblocked"
    CALLBACKS = "callbacks"
    OLDEST = "oldest"


@dataclass(frozen=True)
class FailedFile:
    display_path: str
    stage: str
    error: str
    when: float


@dataclass(frozen=True)
class Note:
    """A change of state. ``detail``: the reason (BLOCKED, UNBLOCKED), the callback URL
    (CALLBACKS) or the file (OLDEST); ``seconds``: how long it was blocked (UNBLOCKED) or the
    file's age (OLDEST)."""

    kind: NoteKind
    when: float
    detail: str
    seconds: float = 0.0


@dataclass
class Batch:
    """Facts a destination has not heard yet, bounded whatever arrives."""

    files: list[FailedFile] = field(default_factory=list)
    more_files: int = 0  # failed files past MAX_LISTED: counted, not named
    stages: dict[str, int] = field(default_factory=dict)  # every failed file, by stage
    notes: list[Note] = field(default_factory=list)
    more_notes: int = 0  # notes past MAX_NOTES: counted only
    first_at: float | None = None  # when the oldest fact in it arrived

    def __bool__(self) -> bool:
        return self.first_at is not None

    @property
    def file_count(self) -> int:
        return len(self.files) + self.more_files

    def add_file(self, failed: FailedFile, now: float) -> None:
        if len(self.files) < MAX_LISTED:
            self.files.append(failed)
        else:
            self.more_files += 1
        self._count_stage(failed.stage, 1)
        self._arrived(now)

    def add_note(self, note: Note, now: float) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(note)
        else:
            self.more_notes += 1
        self._arrived(now)

    def merge(self, newer: Batch) -> None:
        """Append what ``newer`` holds, within the same bounds."""
        if not newer:
            return
        room = MAX_LISTED - len(self.files)
        self.files.extend(newer.files[:room])
        self.more_files += newer.more_files + len(newer.files[room:])
        for stage, count in newer.stages.items():
            self._count_stage(stage, count)
        room = MAX_NOTES - len(self.notes)
        self.notes.extend(newer.notes[:room])
        self.more_notes += newer.more_notes + len(newer.notes[room:])
        assert newer.first_at is not None
        self._arrived(newer.first_at)

    def _count_stage(self, stage: str, count: int) -> None:
        if stage not in self.stages and len(self.stages) >= MAX_STAGES:
            stage = "other"
        self.stages[stage] = self.stages.get(stage, 0) + count

    def _arrived(self, now: float) -> None:
        self.first_at = now if self.first_at is None else min(self.first_at, now)


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    level: str  # apprise's notify type: "failure", "warning" or "success"


def build_message(
    batch: Batch, *, host: str, name: str | None, now: float, config_path: str | None = None, tz: tzinfo | None = None
) -> Message:
    """The message for a batch: the title says what happened, the body what and what to do.

    ``tz``: for the times shown (None: the machine's local time zone).
    """

    def at(t: float) -> str:
        return _format_time(t, tz)

    cfg = f" -c {shlex.quote(config_path)}" if config_path else ""
    status_cmd = f"`konfuzio-watch status{cfg}`"
    block_notes = [n for n in batch.notes if n.kind in (NoteKind.BLOCKED, NoteKind.UNBLOCKED)]
    still_blocked = bool(block_notes) and block_notes[-1].kind is NoteKind.BLOCKED
    oldest = [n for n in batch.notes if n.kind is NoteKind.OLDEST]
    callbacks = [n for n in batch.notes if n.kind is NoteKind.CALLBACKS]

    summary: list[str] = []
    sections: list[str] = []
    if block_notes:
        last = block_notes[-1]
        summary.append(f"stopped working: {last.detail}" if still_blocked else "working again")
        lines = []
        for note in block_notes:
            if note.kind is NoteKind.BLOCKED:
                lines.append(f"Stopped working at {at(note.when)}: {note.detail}")
            else:
                lines.append(
                    f"Working again since {at(note.when)} (was stopped for {format_age(note.seconds)}: {note.detail})"
                )
        if still_blocked:
            lines.append(
                "No file is lost: new files wait in the inbox, and the daemon goes on by itself "
                f"once the cause is fixed. What to do: fix the cause; {status_cmd} shows what waits."
            )
        sections.append("\n".join(lines))
    if batch.file_count:
        n = batch.file_count
        summary.append(f"{n:,} file{'s' if n != 1 else ''} failed")
        lines = [f"{n:,} file{'s' if n != 1 else ''} failed; each is in failed/ with a .error.json that says why:"]
        lines += [f"- {f.display_path} ({f.stage}, {at(f.when)}): {f.error}" for f in batch.files]
        if batch.more_files:
            by_stage = ", ".join(
                f"{stage} {count:,}" for stage, count in sorted(batch.stages.items(), key=lambda kv: (-kv[1], kv[0]))
            )
            lines.append(f"- and {batch.more_files:,} more (all {n:,} by stage: {by_stage})")
        lines.append(
            f"What to do: {status_cmd} lists them; once the cause is fixed, "
            f"`konfuzio-watch retry{cfg} --all-failed` puts them through again."
        )
        sections.append("\n".join(lines))
    if oldest:
        note = oldest[-1]
        summary.append(f"a file has waited {format_age(note.seconds)}")
        sections.append(
            f"The oldest pending file has waited {format_age(note.seconds)} "
            f"(more than alerts.oldest_pending_seconds), at {at(note.when)}: {note.detail}\n"
            f"What to do: {status_cmd} shows what it waits for (uploads paused, no result yet, "
            "a stuck state)."
        )
    if callbacks:
        note = callbacks[-1]
        summary.append("callbacks do not arrive")
        sections.append(
            f"Konfuzio's callbacks do not arrive at {note.detail} (noticed at {at(note.when)}). "
            "Results are still fetched by polling, only later.\n"
            "What to do: make sure Konfuzio can reach that URL (firewall, reverse proxy, "
            "callback.public_url, ngrok)."
        )
    if batch.more_notes:
        sections.append(f"({batch.more_notes:,} further changes of state are not shown.)")

    where = f"konfuzio-watch on {host}" + (f" ({name})" if name else "")
    title = _clip("; ".join(summary) or "nothing to report", 150) + f" — {where}"
    sections.append(f"-- {where}, {at(now)}")
    if still_blocked or batch.file_count:
        level = "failure"
    elif oldest or callbacks:
        level = "warning"
    else:
        level = "success"
    return Message(title=title, body="\n\n".join(sections), level=level)


def _format_time(t: float, tz: tzinfo | None) -> str:
    moment = datetime.fromtimestamp(t, tz) if tz is not None else datetime.fromtimestamp(t).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    """One line of at most ``limit`` characters (an error may be a traceback or a page of HTML)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DeliveryError(Exception):
    """A message could not be sent; the message is the reason, without secrets."""


Sender = Callable[[str, Message], None]


def send_with_apprise(url: str, message: Message) -> None:
    """Send one message to one apprise URL; raise ``DeliveryError`` with apprise's reason."""
    apprise = _import_apprise()

    asset = _apprise_asset()
    notifier = apprise.Apprise(asset=asset)
    if not notifier.add(url):
        raise DeliveryError("apprise does not accept this URL")
    result = notifier.notify(
        body=message.body,
        title=message.title,
        notify_type=apprise.NotifyType(message.level),
        body_format=apprise.NotifyFormat.TEXT,
    )
    try:
        if result:
            return
        reasons = list(
            dict.fromkeys(entry.message for entry in result.logs() if entry.level in ("WARNING", "ERROR", "CRITICAL"))
        )
        raise DeliveryError(_clip("; ".join(reasons)) or "apprise reported a failure without a reason")
    finally:
        result.close()


_apprise: Any = None
_apprise_lock = threading.Lock()


def _import_apprise() -> Any:
    """apprise, imported on first use (it loads ~200 plugins: only a daemon with alerts pays).

    Its mail plugin imports the deprecated ``imghdr`` (for PGPy) when the plugins load, which on
    Python < 3.13 warns; we import it first with that warning silenced: not ours to show.
    apprise also logs a warning for every failed attempt, which would repeat on every retry: its
    logger is kept out of the daemon's log, and we log once per change of state instead, with
    the reason apprise captured for the call.
    """
    global _apprise
    with _apprise_lock:
        if _apprise is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="'imghdr' is deprecated", category=DeprecationWarning)
                with contextlib.suppress(ImportError):  # Python >= 3.13: apprise has a stand-in of its own
                    import imghdr  # noqa: F401
                import apprise
            logger = logging.getLogger("apprise")
            logger.propagate = False
            logger.addHandler(logging.NullHandler())
            _apprise = apprise
        return _apprise


def _apprise_asset() -> Any:
    # service_timeout=0: apprise would otherwise run each send on its own process-wide thread
    # pool (threads that outlive us); the sockets' own timeouts still bound a send. Memory
    # only: apprise writes nothing to disk for us.
    return _import_apprise().AppriseAsset(service_timeout=0, storage_mode="memory", result_log_disk_size=0)


def check_urls(config: AlertsConfig) -> list[str]:
    """The destinations, in apprise's privacy form (safe to print); ``ConfigError`` naming the
    entry if the URLs cannot be read or apprise does not accept one."""
    return [label for _, _, label in _read_destinations(config)]


def _read_destinations(config: AlertsConfig) -> list[tuple[str, str, str]]:
    """(url, key, label) per destination. ``key`` is apprise's privacy URL, stable when only a
    password changes; ``label`` is the key without its query, for the log."""
    apprise = _import_apprise()

    if config.urls_file is None:
        entries = [(f"alerts.urls[{i}]", url) for i, url in enumerate(config.urls)]
    else:
        try:
            text = config.urls_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"alerts.urls_file: cannot read {config.urls_file}: {reason}") from None
        entries = [
            (f"alerts.urls_file line {n}", line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")
        ]
        if not entries:
            raise ConfigError(f"alerts.urls_file: no URL in {config.urls_file}")
    asset = _apprise_asset()
    found: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for where, url in entries:
        service = apprise.Apprise.instantiate(url, asset=asset)
        if service is None:
            scheme = url.split("://", 1)[0] if "://" in url else ""
            shown = f" ({scheme}://...)" if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,20}", scheme) else ""
            raise ConfigError(f"{where}: not a URL apprise can send to{shown}")
        key = service.url(privacy=True)
        while key in seen:  # two URLs that differ only in a secret are still two destinations
            key += "#"
        seen.add(key)
        found.append((url, key, key.split("?", 1)[0]))
    return found


@dataclass
class _Destination:
    url: str
    label: str
    pending: Batch = field(default_factory=Batch)
    last_sent: float | None = None
    retry_at: float = 0.0
    failures: int = 0  # consecutive failed sends

    def due_at(self, min_interval_s: float, gather_s: float) -> float | None:
        if self.pending.first_at is None:
            return None
        due = self.pending.first_at + gather_s
        if self.last_sent is not None:
            due = max(due, self.last_sent + min_interval_s)
        return max(due, self.retry_at)


class Alerts:
    """Facts in (from any thread, never blocking), a few messages out (from one worker thread).

    Without URLs in the config every method is a no-op and no thread runs. The constructor does
    no I/O; ``start()`` reads and checks the URLs (``ConfigError``) and starts the worker;
    ``close()`` sends what it can within a bound and stops it. Facts reported before ``start()``
    are kept (bounded) and sent once it runs. ``clock`` must be real time while the worker runs
    (it sleeps until the next due time); tests drive ``pump(now)`` themselves instead.

    In the daemon::

        alerts = Alerts(config.alerts, clock=self.clock, config_path=str(config_file)).start()
        alerts.file_failed(row.display_path, "upload", error, now)   # a file ended in failed/
        alerts.blocked("Konfuzio rejected the API token (HTTP 401)")  # every time it is seen
        alerts.unblocked()                                            # on the next success
        alerts.callbacks_not_arriving(public_url)                    # a result came by polling
        alerts.oldest_pending(age_s, display_path)                    # every scheduling step
        alerts.close(timeout_s=5)                                     # at shutdown
    """

    def __init__(
        self,
        config: AlertsConfig,
        *,
        clock: Callable[[], float] = time.time,
        sender: Sender = send_with_apprise,
        host: str | None = None,
        config_path: str | None = None,
        gather_s: float = GATHER_S,
        retry_base_s: float = RETRY_BASE_S,
        retry_cap_s: float = RETRY_CAP_S,
        tz: tzinfo | None = None,
    ):
        self.config = config
        self.enabled = config.enabled
        self.host = host or socket.gethostname()
        self._clock = clock
        self._send = sender
        self._config_path = config_path
        self._min_interval_s = config.min_interval_seconds
        self._gather_s = min(gather_s, config.min_interval_seconds)
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._tz = tz
        # Shared with the callers, under _cond (held only for a few field updates).
        self._cond = threading.Condition()
        self._incoming = Batch()
        self._blocked: tuple[str, float] | None = None  # (reason, since)
        self._callbacks_reported: str | None = None
        self._oldest_over = False
        self._stopping = False
        self._flush_deadline = 0.0
        # The worker's own (or the test's, when it drives pump() itself).
        self._destinations: dict[str, _Destination] | None = None
        self._unrouted = Batch()  # facts waiting for the URLs to be readable
        self._source_error: str | None = None
        self._thread: threading.Thread | None = None

    # -- facts, from any thread ----------------------------------------------------------------

    def file_failed(self, display_path: str, stage: str, error: str, when: float | None = None) -> None:
        """A file ended in failed/. Batched: listed in the next message of each destination."""
        if not self.enabled:
            return
        now = self._clock()
        failed = FailedFile(_clip(display_path), _clip(stage, 40), _clip(error), now if when is None else when)
        with self._cond:
            self._add(lambda batch: batch.add_file(failed, now))

    def blocked(self, reason: str) -> None:
        """The daemon cannot work (API token rejected, disk full, ...). Told once; calls while it
        lasts are ignored until ``unblocked()``."""
        if not self.enabled:
            return
        now = self._clock()
        with self._cond:
            if self._blocked is not None:
                return
            self._blocked = (_clip(reason), now)
            note = Note(NoteKind.BLOCKED, now, self._blocked[0])
            self._add(lambda batch: batch.add_note(note, now))

    def unblocked(self) -> None:
        """The daemon works again after ``blocked()``; a no-op if it was not blocked."""
        if not self.enabled:
            return
        now = self._clock()
        with self._cond:
            if self._blocked is None:
                return
            (reason, since), self._blocked = self._blocked, None
            note = Note(NoteKind.UNBLOCKED, now, reason, max(0.0, now - since))
            self._add(lambda batch: batch.add_note(note, now))

    def callbacks_not_arriving(self, url: str) -> None:
        """Konfuzio's callbacks do not reach ``url``. Told once per URL until ``callbacks_arriving()``."""
        if not self.enabled:
            return
        now = self._clock()
        with self._cond:
            if self._callbacks_reported == url:
                return
            self._callbacks_reported = url
            note = Note(NoteKind.CALLBACKS, now, _clip(url))
            self._add(lambda batch: batch.add_note(note, now))

    def callbacks_arriving(self) -> None:
        """A callback arrived: a later ``callbacks_not_arriving`` is told again (nothing is sent now)."""
        if self._callbacks_reported is not None:
            with self._cond:
                self._callbacks_reported = None

    def oldest_pending(self, age_s: float | None, display_path: str | None = None) -> None:
        """Call periodically with the oldest pending file's age (None: nothing pending). Told once
        when the age crosses ``oldest_pending_seconds``, again only after it was below."""
        limit = self.config.oldest_pending_seconds
        if not self.enabled or limit <= 0:
            return
        over = age_s is not None and age_s >= limit
        if over == self._oldest_over:  # the common case, without the lock
            return
        now = self._clock()
        with self._cond:
            if over == self._oldest_over:
                return
            self._oldest_over = over
            if over:
                assert age_s is not None
                note = Note(NoteKind.OLDEST, now, _clip(display_path or "?"), age_s)
                self._add(lambda batch: batch.add_note(note, now))

    def _add(self, add: Callable[[Batch], None]) -> None:
        """Under ``_cond``: record a fact; wake the worker if it is the first since it looked."""
        was_empty = not self._incoming
        add(self._incoming)
        if was_empty:
            self._cond.notify()

    # -- the work, on the worker thread (or a test's) -------------------------------------------

    def pump(self, now: float | None = None, *, flush_until: float | None = None) -> float | None:
        """Hand new facts to the destinations and send what is due. Returns when there is work
        next (None: nothing pending). The worker calls this; tests call it with a fake ``now``
        (never both: only one thread may pump).

        ``flush_until`` (a ``time.monotonic()`` deadline): send everything pending now, whatever
        the interval and backoff, as long as the deadline has not passed (for ``close``).
        """
        now = self._clock() if now is None else now
        with self._cond:
            incoming, self._incoming = self._incoming, Batch()
        self._unrouted.merge(incoming)
        if self._destinations is None and not self._load_destinations():
            return now + self._retry_base_s if self._unrouted else None
        assert self._destinations is not None
        if self._unrouted:
            for destination in self._destinations.values():
                destination.pending.merge(self._unrouted)
            self._unrouted = Batch()
        for destination in self._destinations.values():  # the clock went back: do not wait for it
            if destination.last_sent is not None:
                destination.last_sent = min(destination.last_sent, now)
            destination.retry_at = min(destination.retry_at, now + self._retry_cap_s)
        flush = flush_until is not None
        if self._due(now, flush) and self.config.urls_file is not None:
            self._load_destinations()  # read on demand: a changed password or list applies now
        for destination in self._due(now, flush):
            if flush_until is not None and time.monotonic() >= flush_until:
                break
            self._deliver(destination, now)
        return self._next_due()

    def _due(self, now: float, flush: bool = False) -> list[_Destination]:
        assert self._destinations is not None
        return [
            d
            for d in self._destinations.values()
            if (due := d.due_at(self._min_interval_s, self._gather_s)) is not None and (flush or due <= now)
        ]

    def _next_due(self) -> float | None:
        assert self._destinations is not None
        times = [
            t for d in self._destinations.values() if (t := d.due_at(self._min_interval_s, self._gather_s)) is not None
        ]
        return min(times, default=None)

    def _load_destinations(self, found: list[tuple[str, str, str]] | None = None) -> bool:
        """(Re)read the URLs; keep each destination's state across a re-read. False if unreadable."""
        if found is None:
            try:
                found = _read_destinations(self.config)
            except ConfigError as exc:
                if self._source_error != str(exc):
                    self._source_error = str(exc)
                    then = (
                        "notifications wait until it is fixed"
                        if self._destinations is None
                        else "the URLs read before are used"
                    )
                    log.warning("alerts: %s; %s", exc, then)
                return False
        if self._source_error is not None:
            self._source_error = None
            log.info("alerts: the URLs can be read again")
        old = self._destinations or {}
        new: dict[str, _Destination] = {}
        for url, key, label in found:
            destination = old.pop(key, None) or _Destination(url, label)
            destination.url = url
            new[key] = destination
        for destination in old.values():
            if destination.pending:
                log.warning(
                    "alerts: %s was removed from the URLs; %s for it are dropped",
                    destination.label,
                    _describe(destination.pending),
                )
        self._destinations = new
        return True

    def _deliver(self, destination: _Destination, now: float) -> bool:
        batch, destination.pending = destination.pending, Batch()
        try:
            message = build_message(
                batch, host=self.host, name=self.config.name, now=now, config_path=self._config_path, tz=self._tz
            )
            self._send(destination.url, message)
            error = None
        except DeliveryError as exc:
            error = str(exc)
        except Exception as exc:  # a bug or a plugin's crash must not end the worker
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            destination.last_sent = now
            if destination.failures:
                log.info(
                    "alerts: sending to %s works again (after %d failed attempts); sent what was held",
                    destination.label,
                    destination.failures,
                )
            destination.failures, destination.retry_at = 0, 0.0
            return True
        batch.merge(destination.pending)  # what arrived meanwhile goes after what was held
        destination.pending = batch
        destination.failures += 1
        delay = min(self._retry_cap_s, self._retry_base_s * 2 ** min(destination.failures - 1, 30))
        destination.retry_at = now + delay
        error = _scrub(error, destination.url)
        if destination.failures == 1:
            log.warning(
                "alerts: cannot send to %s: %s; keeping %s and retrying (backoff up to %s); "
                "further failures are not logged until it works again",
                destination.label,
                error,
                _describe(batch),
                format_age(self._retry_cap_s),
            )
        else:
            log.debug("alerts: %s still failing (attempt %d): %s", destination.label, destination.failures, error)
        return False

    # -- the worker thread ------------------------------------------------------------------------

    def start(self) -> Alerts:
        """Read and check the URLs (``ConfigError``), then start the worker thread."""
        if not self.enabled or self._thread is not None:
            return self
        found = _read_destinations(self.config)  # fail at start, not months later
        self._load_destinations(found)
        log.info("alerts: notifications go to %s", ", ".join(label for _, _, label in found))
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> bool:
        """Send what is pending (ignoring the interval), within ``timeout_s``, and stop the thread.

        Returns False if a send was still running at the deadline (the thread is a daemon
        thread: it does not keep the process alive). What could not be sent is logged.
        """
        thread = self._thread
        if thread is None:
            return True
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._stopping = True
            self._flush_deadline = deadline
            self._cond.notify()
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("alerts: still sending after %.1f s; stopped waiting (that message may be lost)", timeout_s)
            return False
        self._thread = None
        return True

    def _run(self) -> None:
        next_due: float | None = None
        while True:
            with self._cond:
                if not self._stopping and not self._incoming:
                    self._cond.wait(None if next_due is None else max(0.0, next_due - self._clock()))
                if self._stopping:
                    break
            try:
                next_due = self.pump(self._clock())
            except Exception:  # never die: the daemon runs for months
                log.exception("alerts: unexpected error; notifications go on")
                next_due = self._clock() + self._retry_base_s
        self._flush()

    def _flush(self) -> None:
        """At close: one last attempt for every destination with something pending."""
        try:
            self.pump(self._clock(), flush_until=self._flush_deadline)
        except Exception:
            log.exception("alerts: unexpected error while flushing")
        lost = [f"{d.label}: {_describe(d.pending)}" for d in (self._destinations or {}).values() if d.pending]
        if self._unrouted:
            lost.append(f"every destination: {_describe(self._unrouted)}")
        if lost:
            log.warning("alerts: stopped with notifications not sent (%s)", "; ".join(lost))


def _describe(batch: Batch) -> str:
    parts = []
    if batch.file_count:
        parts.append(f"{batch.file_count:,} failed file{'s' if batch.file_count != 1 else ''}")
    notes = len(batch.notes) + batch.more_notes
    if notes:
        parts.append(f"{notes:,} change{'s' if notes != 1 else ''} of state")
    return " and ".join(parts) or "nothing"


def _scrub(text: str, url: str) -> str:
    """Take out of a reason anything secret-looking from the URL (its password, long tokens)."""
    try:
        parts = urlsplit(url)
        secrets = {parts.password or ""}
    except ValueError:
        return text
    secrets |= {s for s in re.split(r"[/?&=:@]", parts.path + "?" + parts.query) if len(s) >= 16}
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "****")
    return text
