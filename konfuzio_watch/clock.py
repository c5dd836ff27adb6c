"""The daemon's clock: wall-clock scale, monotonic steps.

Due times are stored in the journal so that they survive a restart, which needs a wall-clock
scale; but a wall clock can be stepped (NTP, an admin, a VM resumed), and a step backwards
would make every due time wait as long as the step. ``SteadyClock`` reads the wall clock once,
at start, and advances by the monotonic clock from then on. A step while running changes
nothing; due times found at the next start that lie further ahead than any delay could be are
clamped by the journal (``Journal.clamp_due``).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class SteadyClock:
    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)
