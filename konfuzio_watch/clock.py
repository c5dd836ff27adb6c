"""The daemon's clock: wall-clock scale, monotonic steps; in a cluster, the database's time.

Due times are stored in the journal so that they survive a restart, which needs a wall-clock
scale; but a wall clock can be stepped (NTP, an admin, a VM resumed), and a step backwards
would make every due time wait as long as the step. ``SteadyClock`` reads the wall clock once,
at start, and advances by the monotonic clock from then on. A step while running changes
nothing; due times found at the next start that lie further ahead than any delay could be are
clamped by the journal (``Journal.clamp_due``).

In a cluster the times one node writes are compared by the others (when an upload that timed out
may be tried again, when a file is due), so they must all be on one clock: the database's, which
the leases use already. ``DatabaseClock`` is a node's ``SteadyClock`` plus the offset to the
database's clock, measured when the node joins and at every heartbeat (``measure_offset``). A
node whose own clock is off by more than ``CLOCK_OFF_WARN_S`` says so (at start, in ``status`` and
``check``): it works right all the same, but its logs and the ages it shows by itself are off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

CLOCK_OFF_WARN_S = 5.0  # a node's clock this far from the database's is said to be off
OFFSET_NOISE_S = 0.05  # measurements this close to the offset in use do not change it


class Clock(Protocol):
    def now(self) -> float: ...


class SteadyClock:
    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)


class WallClock:
    """The machine's wall clock as it is, stepped or not (the times an admin reads in a message)."""

    def now(self) -> float:
        return time.time()


@dataclass(frozen=True)
class ClockOffset:
    """How far another clock is ahead of ours (negative: behind), give or take ``error_s``."""

    offset_s: float
    error_s: float


def measure_offset(local: Callable[[], float], remote: Callable[[], float], samples: int = 3) -> ClockOffset:
    """The offset of ``remote``'s clock to ``local``'s, as NTP measures it: the remote time read between two
    local readings is taken as of their midpoint, so it is off by at most half the round trip. Of
    ``samples`` readings, the one with the shortest round trip counts (the others waited somewhere)."""
    best: ClockOffset | None = None
    for _ in range(max(1, samples)):
        before = local()
        theirs = remote()
        after = local()
        found = ClockOffset(theirs - (before + after) / 2, max(0.0, after - before) / 2)
        if best is None or found.error_s < best.error_s:
            best = found
    assert best is not None
    return best


class DatabaseClock:
    """A node's clock in a cluster: the database's time, as ``base`` (the node's steady clock) plus the
    offset measured to the database's clock (``adjust``; zero until the first measurement)."""

    def __init__(self, base: Clock):
        self.base = base
        self.offset_s = 0.0

    def now(self) -> float:
        return self.base.now() + self.offset_s

    def adjust(self, measured: ClockOffset) -> bool:
        """Follow a new measurement; True if the offset changed. One within its own error (and
        ``OFFSET_NOISE_S``) of the offset in use changes nothing: the clock does not jitter with the
        round trip of every heartbeat."""
        if abs(measured.offset_s - self.offset_s) <= measured.error_s + OFFSET_NOISE_S:
            return False
        self.offset_s = measured.offset_s
        return True


def is_off(offset_s: float) -> bool:
    """Whether a clock this far from the database's (either way) is to be called off."""
    return abs(offset_s) > CLOCK_OFF_WARN_S


def describe_offset(offset_s: float) -> str:
    """``600.0 s ahead of the database's`` for a node whose clock the database's is ``offset_s`` ahead of."""
    return f"{abs(offset_s):.1f} s {'ahead of' if offset_s < 0 else 'behind'} the database's"
