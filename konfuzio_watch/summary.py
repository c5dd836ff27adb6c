"""Human summaries of the journal: ages and the one-line status (systemd STATUS=, the demo)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .states import ACTIVE, State


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def status_line(
    counts: Mapping[State, int], oldest_detected_at: float | None, now: float, blocked: Sequence[str] = ()
) -> str:
    """``3 pending, 120 done, 1 failed; oldest pending 40s`` (+ ``; BLOCKED: reason``)."""
    pending = sum(counts.get(s, 0) for s in ACTIVE)
    line = f"{pending} pending, {counts.get(State.DONE, 0)} done, {counts.get(State.FAILED, 0)} failed"
    if oldest_detected_at is not None:
        line += f"; oldest pending {format_age(now - oldest_detected_at)}"
    for reason in blocked:
        line += f"; BLOCKED: {reason}"
    return line
