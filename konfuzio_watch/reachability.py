"""Can Konfuzio's callbacks reach this daemon? A probe through the public callback URL.

The daemon (at start-up) and ``konfuzio-watch check`` send a request to their own public
callback URL — through the reverse proxy or the tunnel, as Konfuzio would — carrying a one-time
probe token, and confirm that it arrives at the callback handler. If it does not, every file
would wait ``results.callback_timeout`` for a callback that can never come: the daemon says so
once and relies on polling. While running, ``CallbackWatch`` notices when results keep being
found by polling although their callbacks never came.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

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
    return Reachability(False, public_base, f"{public_base} answered HTTP {response.status_code} but the request "
                                           "never reached this daemon (does the proxy forward the callback path here?)")


class CallbackWatch:
    """Notices when results keep being found by polling although their callbacks never came."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._misses = 0
        self.missing = False  # the condition: callbacks are not arriving

    def callback_arrived(self) -> bool:
        """Returns True if this ends a "not arriving" condition."""
        with self._lock:
            self._misses = 0
            was, self.missing = self.missing, False
        return was

    def found_by_polling(self) -> bool:
        """A result was found done by polling and its callback never came. Returns True exactly
        once when that has happened often enough in a row to say so."""
        with self._lock:
            self._misses += 1
            if self._misses >= MISSES_BEFORE_WARNING and not self.missing:
                self.missing = True
                return True
        return False
