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

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import tzinfo

from .alert_messages import Batch, FailedFile, Note, NoteKind, build_message, clip, describe
from .alert_sending import DeliveryError, Sender, read_destinations, scrub_secrets, send_with_apprise
from .clock import Clock, WallClock
from .config import AlertsConfig, ConfigError
from .policy import Limits, backoff_s
from .status import format_age

log = logging.getLogger(__name__)

GATHER_S = 5.0  # a first fact waits this long for the rest of its burst
RETRY = Limits(base_s=10.0, cap_s=600.0)  # a failed send is retried after base_s, doubling up to cap_s


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
        clock: Clock | None = None,
        sender: Sender = send_with_apprise,
        host: str | None = None,
        config_path: str | None = None,
        gather_s: float = GATHER_S,
        retry: Limits = RETRY,
        tz: tzinfo | None = None,
    ):
        self.config = config
        self.enabled = config.enabled
        self.host = host or socket.gethostname()
        self._clock = clock or WallClock()
        self._send = sender
        self._config_path = config_path
        self._min_interval_s = config.min_interval_seconds
        self._gather_s = min(gather_s, config.min_interval_seconds)
        self._retry = retry
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
        now = self._clock.now()
        failed = FailedFile(clip(display_path), clip(stage, 40), clip(error), now if when is None else when)
        with self._cond:
            self._add(lambda batch: batch.add_file(failed, now))

    def blocked(self, reason: str) -> None:
        """The daemon cannot work (API token rejected, disk full, ...). Told once; calls while it
        lasts are ignored until ``unblocked()``."""
        if not self.enabled:
            return
        now = self._clock.now()
        with self._cond:
            if self._blocked is not None:
                return
            self._blocked = (clip(reason), now)
            note = Note(NoteKind.BLOCKED, now, self._blocked[0])
            self._add(lambda batch: batch.add_note(note, now))

    def unblocked(self) -> None:
        """The daemon works again after ``blocked()``; a no-op if it was not blocked."""
        if not self.enabled:
            return
        now = self._clock.now()
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
        now = self._clock.now()
        with self._cond:
            if self._callbacks_reported == url:
                return
            self._callbacks_reported = url
            note = Note(NoteKind.CALLBACKS, now, clip(url))
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
        now = self._clock.now()
        with self._cond:
            if over == self._oldest_over:
                return
            self._oldest_over = over
            if over:
                assert age_s is not None
                note = Note(NoteKind.OLDEST, now, clip(display_path or "?"), age_s)
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
        now = self._clock.now() if now is None else now
        with self._cond:
            incoming, self._incoming = self._incoming, Batch()
        self._unrouted.merge(incoming)
        if self._destinations is None and not self._load_destinations():
            return now + self._retry.base_s if self._unrouted else None
        assert self._destinations is not None
        if self._unrouted:
            for destination in self._destinations.values():
                destination.pending.merge(self._unrouted)
            self._unrouted = Batch()
        for destination in self._destinations.values():  # the clock went back: do not wait for it
            if destination.last_sent is not None:
                destination.last_sent = min(destination.last_sent, now)
            destination.retry_at = min(destination.retry_at, now + self._retry.cap_s)
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
                found = read_destinations(self.config)
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
                    describe(destination.pending),
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
        delay = backoff_s(destination.failures, self._retry)
        destination.retry_at = now + delay
        error = scrub_secrets(error, destination.url)
        if destination.failures == 1:
            log.warning(
                "alerts: cannot send to %s: %s; keeping %s and retrying (backoff up to %s); "
                "further failures are not logged until it works again",
                destination.label,
                error,
                describe(batch),
                format_age(self._retry.cap_s),
            )
        else:
            log.debug("alerts: %s still failing (attempt %d): %s", destination.label, destination.failures, error)
        return False

    # -- the worker thread ------------------------------------------------------------------------

    def start(self) -> Alerts:
        """Read and check the URLs (``ConfigError``), then start the worker thread."""
        if not self.enabled or self._thread is not None:
            return self
        found = read_destinations(self.config)  # fail at start, not months later
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
                    self._cond.wait(None if next_due is None else max(0.0, next_due - self._clock.now()))
                if self._stopping:
                    break
            try:
                next_due = self.pump(self._clock.now())
            except Exception:  # never die: the daemon runs for months
                log.exception("alerts: unexpected error; notifications go on")
                next_due = self._clock.now() + self._retry.base_s
        self._flush()

    def _flush(self) -> None:
        """At close: one last attempt for every destination with something pending."""
        try:
            self.pump(self._clock.now(), flush_until=self._flush_deadline)
        except Exception:
            log.exception("alerts: unexpected error while flushing")
        lost = [f"{d.label}: {describe(d.pending)}" for d in (self._destinations or {}).values() if d.pending]
        if self._unrouted:
            lost.append(f"every destination: {describe(self._unrouted)}")
        if lost:
            log.warning("alerts: stopped with notifications not sent (%s)", "; ".join(lost))
