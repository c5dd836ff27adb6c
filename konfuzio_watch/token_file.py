"""The API token, tried again as soon as it may have been fixed - not after the API gate's backoff.

While Konfuzio rejects the token, the API gate is blocked and its own probe (``Pipeline.probe_account``,
which reads ``konfuzio.token_file`` again) runs with backoff, up to ``upload.backoff_cap_seconds``
apart. The admin's fix would wait for it. So the loop looks at the token file every
``LOOK_EVERY_S`` (a stat: cheap), and while the gate is blocked for the token, a file whose mtime,
ctime, size or inode changed - written in place, or replaced by a rename - has the probe run at
once. A SIGHUP does the same without a change (the account was unlocked on the server), and with
the API working it reads the token file again (a rotation ahead of time).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .gates import Gate

log = logging.getLogger("konfuzio_watch")

LOOK_EVERY_S = 1.0

Signature = tuple[int, int, int, int] | None


def signature(path: Path) -> Signature:
    """What a change of the file changes: (mtime, ctime, size, inode); None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


class TokenWatch:
    """The loop's duty (``look``); ``hangup`` is safe to call from a signal handler (it only sets a flag)."""

    def __init__(self, path: Path | None, gate: Gate, reload_token: Callable[[], None]):
        self.path = path
        self.gate = gate
        self.reload_token = reload_token
        self._seen = signature(path) if path is not None else None  # as the daemon read it at start
        self._hangup = False
        self._pending = False  # a change seen while a probe was out: that probe may have read the old token

    def hangup(self) -> None:
        self._hangup = True

    def look(self, now: float) -> None:
        hangup, self._hangup = self._hangup, False
        changed = self._file_changed()
        if not (self.gate.is_blocked and self.gate.probe_fn is not None):  # the token is not rejected
            self._pending = False
            if hangup and self.path is not None:
                log.info("SIGHUP: Konfuzio has not rejected the API token; reading %s again", self.path)
                self.reload_token()
            elif hangup:
                log.info("SIGHUP: Konfuzio has not rejected the API token; nothing to try")
            return
        if changed:
            log.info("the API token file %s changed; trying the token now", self.path)
        if hangup:
            log.info("SIGHUP: trying the API token now")
        self._pending = self._pending or changed or hangup
        if self._pending and self.gate.probe_now(now):
            self._pending = False

    def _file_changed(self) -> bool:
        """Has the token file changed since the last look? (Looked at always: a change made just before
        the token was rejected counts too.)"""
        if self.path is None:
            return False
        seen, self._seen = self._seen, signature(self.path)
        return seen != self._seen
