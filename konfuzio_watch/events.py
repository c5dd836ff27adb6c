"""Facts that threads listening to the outside world report to the scheduling loop.

The observer, the HTTP handlers and the worker pools never decide anything: they put one of
these on the loop's queue, and the loop thread alone acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import Scope


@dataclass(frozen=True)
class FileSeen:
    """A path in the inbox may be new or changed (watchdog event or scan)."""

    path: str


@dataclass(frozen=True)
class FolderSeen:
    """A folder appeared in the inbox (moved in with files that bring no events of their own)."""

    path: str


@dataclass(frozen=True)
class RescanRequested:
    pass


@dataclass(frozen=True)
class StepDone:
    """A worker finished a step for these rows; ``probes``: the gates it was a probe for."""

    row_ids: tuple[int, ...]
    pool: str
    probes: tuple[Scope, ...] = ()
    is_reconcile: bool = False


@dataclass(frozen=True)
class JournalFailed:
    """A worker or handler could not write the journal."""

    error: str


@dataclass(frozen=True)
class Wake:
    """Something became due (a callback was recorded): look at the journal again."""


@dataclass(frozen=True)
class CleanupWanted:
    """A callback revealed a second copy of one of our files on the server (a late earlier attempt)."""


@dataclass(frozen=True)
class StopRequested:
    pass


Event = FileSeen | FolderSeen | RescanRequested | StepDone | JournalFailed | CleanupWanted | Wake | StopRequested
