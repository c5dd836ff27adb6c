"""systemd's sd_notify(3) protocol in the standard library: one datagram per message.

``Notifier.from_env()`` reads ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) and
the watchdog settings. Without ``NOTIFY_SOCKET`` (not run by systemd, or ``Type=simple``) every
call is a no-op. A failed send never raises: it is logged once as a warning and then ignored.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends ``READY=1``, ``STATUS=...``, ``STOPPING=1`` and ``WATCHDOG=1`` to the service manager."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None, _watchdog_usec(env))

    @property
    def is_enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1`` (half the configured period), or None if no watchdog is set."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec else None

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        return self.send(RELOADING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines (fields whose value is None are left out). True if delivered."""
        lines = [f"{key}={_one_line(value)}" for key, value in fields.items() if value is not None]
        return self.send_raw("\n".join(lines))

    def send_raw(self, message: str) -> bool:
        """Send one datagram as is. False (and a warning, the first time) if it could not be sent."""
        if self.address is None or not message:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(_socket_address(self.address))
                sock.sendall(message.encode("utf-8"))
            return True
        except OSError as exc:
            with self._lock:
                warn, self._warned = not self._warned, True
            if warn:
                log.warning("cannot notify systemd at %s: %s (further failures are not logged)", self.address, exc)
            return False


def _socket_address(address: str) -> str | bytes:
    """``@name`` is an abstract socket: its address starts with a NUL byte."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC, if set for this process (WATCHDOG_PID, when present, must be our pid)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _one_line(value: object) -> str:
    """A field value may not contain a newline (it would start another field)."""
    return " ".join(str(value).splitlines())
