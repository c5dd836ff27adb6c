"""Gates: when a whole kind of work is blocked (Konfuzio down or rejecting our token, a full
disk, an unwritable journal), it pauses together instead of every file backing off on its own.

A blocked gate admits nothing until its delay has passed, then exactly one probe; the probe's
success opens the gate, its failure blocks it again for longer. The state lives in memory only:
a restart starts with open gates (a stored pause would outlive its cause).

Each change is logged once: "blocked" with the reason, "open again" with how long it lasted
and how many probes failed. A gate that blocks again soon after it opened (a disk with a few
bytes free, a flapping service) continues the same episode: same start, growing backoff, no new
log lines. ``on_change`` lets the daemon publish the state (status, metrics, alerts).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .policy import Limits, Scope, backoff_s

log = logging.getLogger("konfuzio_watch")

FLAP_WINDOW_S = 60.0


@dataclass(frozen=True)
class GateState:
    scope: Scope
    blocked: bool
    reason: str = ""
    since: float | None = None
    until: float = 0.0
    failures: int = 0


class Gate:
    def __init__(self, scope: Scope, limits: Limits, *, rng: random.Random | None = None,
                 on_change: Callable[[GateState], None] | None = None):
        self.scope = scope
        self.limits = limits
        self._rng = rng or random.Random()
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = GateState(scope, blocked=False)
        self._probing = False
        self._episode: GateState | None = None  # the last blocked state, kept for a while after opening
        self._opened_at = 0.0
        self._told_open = False

    @property
    def state(self) -> GateState:
        return self._state

    @property
    def is_blocked(self) -> bool:
        return self._state.blocked

    def admits(self, now: float) -> int | None:
        """How many new tasks of this scope may start now: None = no limit, 0 = none, 1 = a probe."""
        s = self._state
        if not s.blocked:
            return None
        if self._probing or now < s.until:
            return 0
        return 1

    def next_probe_at(self) -> float | None:
        s = self._state
        return s.until if s.blocked and not self._probing else None

    def probe_started(self) -> None:
        with self._lock:
            self._probing = True

    def probe_finished(self) -> None:
        """The probe's task ended; if it neither opened nor blocked the gate, the next may go."""
        with self._lock:
            self._probing = False

    def block(self, now: float, reason: str, retry_after_s: float | None = None, note: str = "") -> float:
        """Record a failure of this scope; returns the delay until the next probe."""
        with self._lock:
            s = self._state
            newly = not s.blocked
            if newly and self._episode is not None and now - self._opened_at < FLAP_WINDOW_S:
                s, newly = self._episode, False  # blocked again right after opening: the same episode
            failures = s.failures + 1
            delay = max(backoff_s(failures, self.limits, self._rng.uniform(0.5, 1.0)), retry_after_s or 0.0)
            until = max(s.until if self._state.blocked else 0.0, now + delay)
            self._state = GateState(self.scope, True, reason, s.since if s.blocked else now, until, failures)
            self._probing = False
            if newly:
                self._told_open = False
        if newly:
            log.error("%s; pausing %s, next try in %.0f s%s", reason, _WHAT[self.scope], delay,
                      f" ({note})" if note else "")
        else:
            log.debug("%s still blocked (probe %d failed): %s; next try in %.0f s", self.scope, failures, reason,
                      delay)
        self._changed()
        return until - now

    def open(self, now: float) -> bool:
        """A task of this scope succeeded. Returns True if the gate was blocked."""
        with self._lock:
            s = self._state
            self._probing = False
            if not s.blocked:
                return False
            self._state = GateState(self.scope, blocked=False)
            self._episode, self._opened_at = s, now
            tell, self._told_open = not self._told_open, True
        lasted = now - (s.since or now)
        log.log(logging.WARNING if tell else logging.DEBUG, "%s again after %.0f s (%d failed tries); resuming",
                _RESUMED[self.scope], lasted, s.failures)
        self._changed()
        return True

    def _changed(self) -> None:
        if self._on_change:
            self._on_change(self._state)


_WHAT = {
    Scope.API: "every upload and result fetch",
    Scope.OUTPUT: "every export into done/ and failed/",
    Scope.JOURNAL: "all work",
}
_RESUMED = {
    Scope.API: "Konfuzio answers",
    Scope.OUTPUT: "results can be written",
    Scope.JOURNAL: "the journal is writable",
}


# Probing local disks is cheap: after a full disk is freed, work resumes within seconds.
LOCAL_LIMITS = {Scope.JOURNAL: Limits(base_s=0.25, cap_s=2.0), Scope.OUTPUT: Limits(base_s=0.5, cap_s=10.0)}


class Gates:
    """The three gates of a daemon, by scope. ``limits`` paces the API gate's probes."""

    def __init__(self, limits: Limits, *, rng: random.Random | None = None,
                 on_change: Callable[[GateState], None] | None = None):
        self.by_scope = {scope: Gate(scope, LOCAL_LIMITS.get(scope, limits), rng=rng, on_change=on_change)
                         for scope in Scope}

    def __getitem__(self, scope: Scope) -> Gate:
        return self.by_scope[scope]

    def blocked(self) -> list[GateState]:
        return [g.state for g in self.by_scope.values() if g.is_blocked]
