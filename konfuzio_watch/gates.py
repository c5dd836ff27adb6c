"""Gates: when a whole kind of work is blocked (Konfuzio down or rejecting our token, a full
disk, an unwritable journal, a share that does not answer), it pauses together instead of every
file backing off on its own.

A blocked gate admits nothing until its delay has passed, then exactly one probe; the probe's
success opens the gate, its failure blocks it again for longer. The state lives in memory only:
a restart starts with open gates (a stored pause would outlive its cause).

Each episode is logged twice: once when it starts (ERROR, with the reason) and once when work
has gone on for ``CONFIRM_S`` without a new failure (WARNING, with how long it lasted). A gate that
blocks again before that (a disk with a few bytes free, a flapping service) continues the same
episode: same start, growing backoff, no new lines. ``on_change`` lets the daemon publish the
state (status, metrics, alerts); ``tend(now)`` announces confirmed recoveries.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from .policy import Limits, Scope, draw_jitter, gate_backoff

log = logging.getLogger("konfuzio_watch")

CONFIRM_S = 5.0  # open this long without a new failure before the recovery is announced


@dataclass(frozen=True)
class GateState:
    scope: Scope
    blocked: bool
    reason: str = ""
    since: float | None = None
    until: float = 0.0
    failures: int = 0


class Gate:
    def __init__(
        self,
        scope: Scope,
        limits: Limits,
        *,
        rng: random.Random | None = None,
        on_change: Callable[[GateState], None] | None = None,
    ):
        self.scope = scope
        self.limits = limits
        self._rng = rng or random.Random()
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = GateState(scope, blocked=False)
        self._probing = False
        self._episode: GateState | None = None  # the blocked state, until its end is confirmed
        self._opened_at = 0.0
        self._successes = 0  # tasks that succeeded since the gate last opened
        self.probe_fn: Callable[[], None] | None = None  # a probe of its own instead of the next task
        self.on_recovered: Callable[[GateState], None] | None = None

    @property
    def state(self) -> GateState:
        return self._state

    @property
    def opened_at(self) -> float:
        """When the gate last opened after being blocked (0.0: never blocked)."""
        return self._opened_at

    @property
    def is_blocked(self) -> bool:
        return self._state.blocked

    def admits(self, now: float) -> int | None:
        """How many new tasks of this scope may start now: None = no limit, 0 = none, 1 = a probe.
        A gate with a ``probe_fn`` admits no task at all: it is probed by that function."""
        s = self._state
        if not s.blocked:
            return None
        if self._probing or now < s.until or self.probe_fn is not None:
            return 0
        return 1

    def own_probe_due(self, now: float) -> Callable[[], None] | None:
        s = self._state
        if s.blocked and self.probe_fn is not None and not self._probing and now >= s.until:
            return self.probe_fn
        return None

    def probe_now(self, now: float) -> bool:
        """The cause its own probe looks at may be gone (the token file changed): that probe goes at the
        next tick instead of after the backoff. False if there is none to hurry (the gate is open or
        blocked for another cause, or the probe is out)."""
        with self._lock:
            s = self._state
            if not s.blocked or self.probe_fn is None or self._probing:
                return False
            self._state = replace(s, until=min(s.until, now))
        self._changed()
        return True

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

    def block(
        self,
        now: float,
        reason: str,
        retry_after_s: float | None = None,
        note: str = "",
        probe: Callable[[], None] | None = None,
    ) -> float:
        """Record a failure of this scope; returns the delay until the next probe. ``probe``: how to
        find out that it is over, if not by trying the next task (a rejected token: a cheap request)."""
        with self._lock:
            self.probe_fn = probe
            current = self._state
            s = current if current.blocked else (self._episode or current)  # unconfirmed recovery: same episode
            newly = not s.blocked
            failures, delay = gate_backoff(
                s.failures,
                was_blocked=current.blocked,
                successes=self._successes,
                limits=self.limits,
                jitter=draw_jitter(self._rng),
                retry_after_s=retry_after_s,
            )
            until = max(current.until if current.blocked else 0.0, now + delay)
            self._state = GateState(self.scope, True, reason, now if newly else s.since, until, failures)
            self._episode = None
            self._probing = False
        if newly:
            log.error(
                "%s; pausing %s, next try in %.1f s%s",
                reason,
                _WHAT[self.scope],
                delay,
                f" ({note})" if note else "",
                extra={"scope": self.scope.value, "error": reason},
            )
        else:
            log.debug("%s still blocked (try %d failed): %s; next try in %.1f s", self.scope, failures, reason, delay)
        self._changed()
        return until - now

    def open(self, now: float) -> bool:
        """A task of this scope succeeded. Returns True if the gate was blocked."""
        with self._lock:
            s = self._state
            self._probing = False
            if not s.blocked:
                self._successes += 1
                return False
            self._state = GateState(self.scope, blocked=False)
            self._episode, self._opened_at = s, now
            self._successes = 0
            self.probe_fn = None
        log.debug("%s: a try succeeded; resuming", self.scope)
        self._changed()
        return True

    def announce_at(self) -> float | None:
        """When ``tend`` will announce the end of the episode (None: nothing to announce)."""
        return self._opened_at + CONFIRM_S if self._episode is not None else None

    def tend(self, now: float) -> None:
        """Announce a recovery that has held for ``CONFIRM_S``."""
        with self._lock:
            episode = self._episode
            if episode is None or now < self._opened_at + CONFIRM_S:
                return
            self._episode = None
        log.warning(
            "%s again after %.0f s (%d failed tries); resumed",
            _RESUMED[self.scope],
            self._opened_at - (episode.since or self._opened_at),
            episode.failures,
        )
        if self.on_recovered:
            self.on_recovered(episode)

    def _changed(self) -> None:
        if self._on_change:
            self._on_change(self._state)


_WHAT = {
    Scope.API: "every upload and result fetch",
    Scope.OUTPUT: "every export into done/ and failed/",
    Scope.JOURNAL: "all work",
    Scope.SHARES: "all work on the shares (claims, reading files, placing into done/ and failed/)",
    Scope.RECEIVER: "every delivery to the next system",
}
_RESUMED = {
    Scope.API: "Konfuzio answers",
    Scope.OUTPUT: "results can be written",
    Scope.JOURNAL: "the journal is writable",
    Scope.SHARES: "the shares answer",
    Scope.RECEIVER: "the receiver takes deliveries",
}


# Probing local disks is cheap: after a full disk is freed, work resumes within seconds. A look at the
# shares' folders is cheap too: work goes on within 5 s of a share's return.
LOCAL_LIMITS = {
    Scope.JOURNAL: Limits(base_s=0.25, cap_s=2.0),
    Scope.OUTPUT: Limits(base_s=0.5, cap_s=10.0),
    Scope.SHARES: Limits(base_s=0.5, cap_s=5.0),
}


class Gates:
    """The gates of a daemon, by scope. ``limits`` paces the API gate's probes."""

    def __init__(
        self, limits: Limits, *, rng: random.Random | None = None, on_change: Callable[[GateState], None] | None = None
    ):
        self.by_scope = {
            scope: Gate(scope, LOCAL_LIMITS.get(scope, limits), rng=rng, on_change=on_change) for scope in Scope
        }

    def __getitem__(self, scope: Scope) -> Gate:
        return self.by_scope[scope]

    def blocked(self) -> list[GateState]:
        return [g.state for g in self.by_scope.values() if g.is_blocked]

    def tend(self, now: float) -> None:
        for gate in self.by_scope.values():
            gate.tend(now)

    def next_announcement(self) -> float | None:
        times = [t for g in self.by_scope.values() if (t := g.announce_at()) is not None]
        return min(times) if times else None
