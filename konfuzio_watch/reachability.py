"""Do Konfuzio's callbacks reach this daemon? A probe through the public callback URL, and one verdict.

The daemon (at start-up) and ``konfuzio-watch check`` send a request to their own public
callback URL — through the reverse proxy or the tunnel, as Konfuzio would — carrying a one-time
probe token, and confirm that it arrives at the callback handler. If it does not, every file
would wait ``results.callback_timeout`` for a callback that can never come: the daemon says so
once and relies on polling.

``CallbackWatch`` holds the one answer to "are callbacks arriving?" (``CallbackVerdict``), from
what the daemon saw last: the probe's outcome, a real callback, or results found by polling
although their callbacks never came (``MISSES_BEFORE_WARNING`` in a row). ``status``, ``/healthz``,
``/status``, ``/metrics`` (``konfuzio_watch_callbacks_arriving``) and the log line at each change
all show that verdict, never a part of it:

- ``yes: a probe through <url> arrived at 14:02:07`` / ``yes: the last callback arrived at 14:05:31``
- ``no: a probe through <url> failed at 14:02:07: cannot connect to ...; results are polled``
- ``no: 3 results in a row were found by polling, their callbacks never came (since 14:09:12);
  results are polled``
- not known yet (the start-up probe is under way), or none expected (poll-only mode): ``arriving``
  is None and the metric is absent.

The latest fact wins: a callback that arrives after a failed probe (the proxy was fixed) means yes;
while the answer is no, the daemon polls results soon after the upload instead of waiting for them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from .clock import Clock, WallClock
from .tokens import hash_token, new_token

log = logging.getLogger("konfuzio_watch")

PROBE_TIMEOUT_S = 10.0
MISSES_BEFORE_WARNING = 3  # results found by polling in a row, with no callback at all meanwhile


PROBE_PREFIX = "kwprobe-"  # a probe token's shape: another node of a cluster recognises one it did not send


class ProbeTokens:
    """One-time tokens of reachability probes; the callback handler asks ``arrived`` first.

    In a cluster, the public URL leads to any node (a load balancer): a node that gets a probe it did
    not send tells the others through the journal (``probe:<token hash>``), and the node that sent
    it hears that (``arrived_hash``)."""

    def __init__(self) -> None:
        self._waiting: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def expect(self) -> tuple[str, threading.Event]:
        token, event = PROBE_PREFIX + new_token(), threading.Event()
        with self._lock:
            self._waiting[token] = event
        return token, event

    def arrived(self, token: str) -> bool:
        with self._lock:
            event = self._waiting.pop(token, None)
        if event is None:
            return False
        event.set()
        return True

    def arrived_hash(self, token_hash: str) -> bool:
        """A probe arrived at another node of the cluster: is it one of ours (by its hash)?"""
        with self._lock:
            token = next((t for t in self._waiting if hash_token(t) == token_hash), None)
        return token is not None and self.arrived(token)

    @staticmethod
    def looks_like_probe(token: str) -> bool:
        return token.startswith(PROBE_PREFIX)


@dataclass(frozen=True)
class Reachability:
    ok: bool
    url: str  # the public callback base that was probed
    detail: str  # what is wrong (empty when ok)


def callback_base_is_private(url: str) -> bool:
    """A loopback or link-local address, or ``localhost``: Konfuzio, on the internet, cannot reach it."""
    host = urlsplit(url).hostname or ""
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local or address.is_unspecified


def probe(public_base: str, path: str, tokens: ProbeTokens, timeout_s: float = PROBE_TIMEOUT_S) -> Reachability:
    """POST to ``<public_base>/<path>/<probe token>`` and wait for the handler to see it."""
    import requests

    from .konfuzio import classify

    token, arrived = tokens.expect()
    url = f"{public_base.rstrip('/')}/{path.strip('/')}/{token}"
    try:
        with requests.Session() as session:
            session.trust_env = False  # the probe must take the public route, not a local proxy
            response = session.post(url, json={"probe": True}, timeout=timeout_s)
    except requests.RequestException as exc:
        tokens.arrived(token)  # forget it
        return Reachability(False, public_base, classify(exc).failure.message)
    if arrived.wait(timeout=0.5 if response.ok else 0):
        return Reachability(True, public_base, "")
    tokens.arrived(token)
    return Reachability(
        False,
        public_base,
        f"{public_base} answered HTTP {response.status_code} but the request "
        "never reached this daemon (does the proxy forward the callback path here?)",
    )


@dataclass(frozen=True)
class CallbackVerdict:
    """The one answer to "are callbacks arriving?" (see the module doc)."""

    arriving: bool | None  # None: not known yet, or none expected (poll-only)
    text: str  # "yes: ..." / "no: ...; results are polled" / "not known yet: ..." / "none expected: ..."
    since: float | None = None  # when this answer began
    url: str | None = None  # the public callback base

    def to_dict(self) -> dict[str, object]:
        """For /healthz and /status (the time in UTC, ISO 8601)."""
        since = (
            None
            if self.since is None
            else dt.datetime.fromtimestamp(self.since, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        )
        return {"arriving": self.arriving, "text": self.text, "since": since, "url": self.url}


POLL_ONLY = CallbackVerdict(None, "none expected: poll-only mode (callback.enabled: false); results are polled")
POLLED = "; results are polled"


class CallbackWatch:
    """What the daemon saw of its callbacks, as one ``CallbackVerdict`` (thread-safe: the probe thread,
    the callback handlers and the workers report; the monitor reads)."""

    def __init__(self, clock: Clock | None = None):
        self._clock = clock or WallClock()  # its times are shown to the admin: the wall clock's
        self._lock = threading.Lock()
        self._misses = 0
        self._url: str | None = None
        self._verdict = CallbackVerdict(None, "not known yet: the start-up probe has not answered")

    @property
    def missing(self) -> bool:
        """The verdict is no (the probe failed, or results keep being found by polling)."""
        return self._verdict.arriving is False

    def verdict(self) -> CallbackVerdict:
        return self._verdict

    def probed(self, found: Reachability) -> CallbackVerdict:
        """The start-up probe's outcome becomes the verdict (unless a callback came first)."""
        now = self._clock.now()
        with self._lock:
            self._url = found.url
            if self._verdict.arriving is not None:
                return self._verdict  # a real callback (or polling) answered before the probe did
            if found.ok:
                text = f"yes: a probe through {found.url} arrived at {clock_time(now)}"
            else:
                text = f"no: a probe through {found.url} failed at {clock_time(now)}: {found.detail}{POLLED}"
            self._verdict = CallbackVerdict(found.ok, text, now, found.url)
            return self._verdict

    def callback_arrived(self) -> bool:
        """A real callback arrived. Returns True if this ends a "no" (or an unknown) answer."""
        now = self._clock.now()
        with self._lock:
            self._misses = 0
            was = self._verdict
            since = was.since if was.arriving else now
            self._verdict = CallbackVerdict(
                True, f"yes: the last callback arrived at {clock_time(now)}", since, self._url
            )
        return was.arriving is not True

    def found_by_polling(self) -> bool:
        """A result was found done by polling and its callback never came. Returns True exactly
        once when that has happened often enough in a row to say so (the verdict is then no)."""
        now = self._clock.now()
        with self._lock:
            self._misses += 1
            if self._misses < MISSES_BEFORE_WARNING or self._verdict.arriving is False:
                return False
            text = (
                f"no: {self._misses} results in a row were found by polling, their callbacks never came "
                f"(since {clock_time(now)}){POLLED}"
            )
            self._verdict = CallbackVerdict(False, text, now, self._url)
            return True


def clock_time(timestamp: float) -> str:
    """``14:02:07`` today, ``2026-11-23 14:02:07`` before (local time, as the log's)."""
    when = dt.datetime.fromtimestamp(timestamp)
    return when.strftime("%H:%M:%S" if when.date() == dt.date.today() else "%Y-%m-%d %H:%M:%S")
