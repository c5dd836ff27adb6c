"""Is this file finished being written? Pure decisions from observations and ``now``.

A file is ready when its size and mtime have not changed for ``settle_s`` *as observed by us*
(an old mtime on a file copied in proves nothing), it is non-empty, and its content looks
complete (a PDF ends with ``%%EOF``). A file that stays empty or incomplete is claimed anyway
after ``grace_s`` of stability, so that it reaches failed/ with a reason instead of waiting forever.
"""

from __future__ import annotations

from dataclasses import dataclass

PDF_MAGIC = b"%PDF"
PDF_EOF = b"%%EOF"
TAIL_BYTES = 1024


@dataclass(frozen=True)
class Observation:
    size: int
    mtime_ns: int
    since: float  # when we first saw this (size, mtime) pair
    looks_complete: bool = True


def observe(previous: Observation | None, size: int, mtime_ns: int, now: float,
            looks_complete: bool = True) -> Observation:
    """Fold a fresh stat into the previous observation; the clock restarts on any change."""
    if previous is not None and (previous.size, previous.mtime_ns) == (size, mtime_ns):
        return previous
    return Observation(size, mtime_ns, now, looks_complete)


def ready_at(obs: Observation, settle_s: float, grace_s: float) -> float:
    """The earliest time the file may be claimed if nothing changes."""
    if obs.size > 0 and obs.looks_complete:
        return obs.since + settle_s
    return obs.since + max(settle_s, grace_s)


def is_ready(obs: Observation, now: float, settle_s: float, grace_s: float) -> bool:
    return now >= ready_at(obs, settle_s, grace_s)


def content_looks_complete(head: bytes, tail: bytes) -> bool:
    """Cheap plausibility check on the first and last bytes of a file."""
    if head.startswith(PDF_MAGIC):
        return PDF_EOF in tail
    return True
