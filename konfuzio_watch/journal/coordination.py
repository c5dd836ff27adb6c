"""Cluster coordination: what the nodes sharing one journal tell each other, behind one small interface.

A journal is also a ``Coordination``: the nodes (``join``, ``heartbeat``, ``leave``, ``nodes``, the
clock's offset), the leases on rows (``take_due`` ... ``leases_by_node``), the roles one node at a
time holds (``role``) and the notifications between nodes (``listen``, ``notify``). Each engine picks
its implementation once, by its class: ``LocalCoordination`` below for SQLite (one node: every row is
this node's, every role is held, notifications reach this journal object's listeners only), and
``pg_cluster.PgCoordination`` for PostgreSQL. Nothing above the journal asks which it has.
"""

from __future__ import annotations

import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..clock import ClockOffset
from ..states import State

if TYPE_CHECKING:
    from .outbox import DeliveryRow
    from .rows import Row

#: The LISTEN/NOTIFY channel. Payloads: ``callback:<row id>`` (a callback was recorded for that
#: row) and ``due:<seconds since the epoch>`` (a row is due then, or earlier), ``reconnected``
#: (from a listener only: notifications may have been missed while it was cut off: look again).
CHANNEL = "konfuzio_watch"


def default_node_id() -> str:
    return socket.gethostname() or "localhost"


@dataclass(frozen=True)
class Node:
    """A daemon that uses the journal: its id, host and process, and, by the database's clock,
    when it started and when it last said it is alive (``silent_s`` ago)."""

    id: str
    host: str
    pid: int | None
    started_at: float
    heartbeat_at: float
    silent_s: float
    inbox_marker: str | None = None  # what its marker file in the inbox says (``join``)
    clock_offset_s: float | None = None  # how far the database's clock was ahead of its own, at its last heartbeat


@dataclass(frozen=True)
class Lease:
    """Which node works on a row, and for how much longer (negative: expired), by the database's clock."""

    node: str
    remaining_s: float


class Listener(Protocol):
    def close(self) -> None: ...


class Role(Protocol):
    """A job that one node at a time does (e.g. rescanning the inbox)."""

    name: str

    def acquire(self) -> bool:
        """Take the role if no other node has it; True if this node has it now. Never waits."""
        ...

    def held(self) -> bool:
        """Whether this node still has the role (a lost database connection loses it)."""
        ...

    def release(self) -> None: ...


class Coordination(ABC):
    """The nodes of a cluster on one journal: membership, leases, roles, notifications."""

    #: Whether several nodes may share this journal: the daemon then runs as a node of a cluster.
    shared: bool
    #: This daemon's name among the nodes that share the journal.
    node_id: str

    @abstractmethod
    def _lease_new(self, tx: Any, row_ids: Sequence[int]) -> None:
        """Lease rows that the write transaction ``tx`` created to this node (a claim is the claimer's
        until it is done)."""

    @abstractmethod
    def join(self, inbox_marker: str | None = None, clock_offset_s: float | None = None) -> None:
        """This node starts (the daemon, once): it is listed in ``nodes``, with what its marker file in
        the inbox says (``check`` compares what each node sees) and how far the journal's clock is ahead
        of its own (``status`` shows a node whose clock is off)."""

    @abstractmethod
    def heartbeat(self, clock_offset_s: float | None = None) -> None:
        """Say that this node is alive (every few seconds), and its clock's offset now."""

    @abstractmethod
    def clock_offset(self, local: Callable[[], float] = time.time) -> ClockOffset:
        """How far the journal's clock is ahead of ``local`` (every time the nodes of a cluster compare is
        on it)."""

    @abstractmethod
    def leave(self, keep: Iterable[int] = ()) -> None:
        """This node stops (the daemon, once): its leases go at once, except on the rows in ``keep``
        (steps cut off at shutdown: those expire, and are taken over like a dead node's)."""

    @abstractmethod
    def nodes(self) -> list[Node]:
        """The nodes that use this journal, as they last said."""

    @abstractmethod
    def take_due(
        self, states: Iterable[State], now: float, exclude: Iterable[int], limit: int, lease_s: float = 60.0
    ) -> list[Row]:
        """Like ``runnable``, and lease the rows to this node for ``lease_s`` seconds, skipping rows that
        another node holds (even with its lease expired: ``take_over_expired`` takes those, to be
        recovered first) or is taking right now."""

    @abstractmethod
    def take_due_refreshes(self, now: float, exclude: Iterable[int], limit: int, lease_s: float = 60.0) -> list[Row]:
        """Like ``due_refreshes``, and lease the rows to this node (an expired lease of another node's
        may be taken: a refresh needs no recovery)."""

    @abstractmethod
    def take_due_deliveries(self, now: float, limit: int, lease_s: float = 60.0) -> list[DeliveryRow]:
        """Like ``due_deliveries`` (``outbox.py``), and lease them to this node for ``lease_s`` seconds,
        skipping those another node holds (an expired lease may be taken: a delivery needs no recovery,
        it is sent again with the same key)."""

    @abstractmethod
    def release_deliveries(self, delivery_ids: Iterable[int]) -> None:
        """Give up this node's leases on these deliveries (sent, or not taken)."""

    @abstractmethod
    def renew_leases(self, row_ids: Iterable[int], lease_s: float = 60.0) -> set[int]:
        """Extend this node's leases on these rows; returns the ids it still holds (a row whose lease
        another node took over is no longer this node's to work on)."""

    @abstractmethod
    def release_leases(self, row_ids: Iterable[int]) -> None:
        """Give up this node's leases on these rows (the step is done)."""

    @abstractmethod
    def take_over_expired(
        self, lease_s: float = 60.0, limit: int = 100, *, own: bool = False, exclude: Iterable[int] = ()
    ) -> list[Row]:
        """Lease to this node the active rows whose lease expired (their node died or hung), to be
        recovered as after a crash; with ``own``, also the rows this node holds itself (a previous run
        of it, or writes lost with the connection) except those in ``exclude`` (in hand)."""

    @abstractmethod
    def lease_of(self, row_id: int) -> Lease | None:
        """Who works on a row, and for how long."""

    @abstractmethod
    def lease_holders(self, row_ids: Iterable[int]) -> dict[int, str]:
        """Row id -> the node holding it, for those of these rows that are leased."""

    @abstractmethod
    def leases_by_node(self) -> dict[str, int]:
        """Node id -> how many rows it holds."""

    @abstractmethod
    def role(self, name: str) -> Role:
        """A job that one node at a time does, e.g. ``role("rescanner")``."""

    @abstractmethod
    def listen(self, callback: Callable[[str], None]) -> Listener:
        """Call ``callback(payload)`` for every notification on ``CHANNEL`` (see there). Close the
        returned listener to stop."""

    @abstractmethod
    def notify(self, payload: str) -> None:
        """Send ``payload`` to every listener (every node's)."""


class LocalCoordination(Coordination):
    """One node: the only daemon. Every row is its own (no leases), it has every role, the journal has
    no clock of its own (the daemon's is the one), and notifications reach the listeners of this
    journal object, called in the thread that wrote, after the commit (``_deliver``)."""

    shared = False

    def __init__(self) -> None:
        super().__init__()
        self._listeners: list[_LocalListener] = []
        self._started_at = time.time()

    # what the rows part of the journal provides
    runnable: Callable[..., list[Row]]
    due_refreshes: Callable[..., list[Row]]
    due_deliveries: Callable[..., list[DeliveryRow]]

    def _lease_new(self, tx: Any, row_ids: Sequence[int]) -> None:
        pass

    def join(self, inbox_marker: str | None = None, clock_offset_s: float | None = None) -> None:
        pass

    def heartbeat(self, clock_offset_s: float | None = None) -> None:
        pass

    def clock_offset(self, local: Callable[[], float] = time.time) -> ClockOffset:
        return ClockOffset(0.0, 0.0)

    def leave(self, keep: Iterable[int] = ()) -> None:
        pass

    def nodes(self) -> list[Node]:
        return [Node(self.node_id, socket.gethostname(), os.getpid(), self._started_at, time.time(), 0.0)]

    def take_due(
        self, states: Iterable[State], now: float, exclude: Iterable[int], limit: int, lease_s: float = 60.0
    ) -> list[Row]:
        return self.runnable(states, now, exclude, limit)

    def take_due_refreshes(self, now: float, exclude: Iterable[int], limit: int, lease_s: float = 60.0) -> list[Row]:
        return self.due_refreshes(now, exclude, limit)

    def take_due_deliveries(self, now: float, limit: int, lease_s: float = 60.0) -> list[DeliveryRow]:
        return self.due_deliveries(now, limit)

    def release_deliveries(self, delivery_ids: Iterable[int]) -> None:
        pass

    def renew_leases(self, row_ids: Iterable[int], lease_s: float = 60.0) -> set[int]:
        return set(row_ids)

    def release_leases(self, row_ids: Iterable[int]) -> None:
        pass

    def take_over_expired(
        self, lease_s: float = 60.0, limit: int = 100, *, own: bool = False, exclude: Iterable[int] = ()
    ) -> list[Row]:
        return []  # a restart recovers every row

    def lease_of(self, row_id: int) -> Lease | None:
        return None

    def lease_holders(self, row_ids: Iterable[int]) -> dict[int, str]:
        return {}

    def leases_by_node(self) -> dict[str, int]:
        return {}

    def role(self, name: str) -> Role:
        return _LocalRole(name)

    def listen(self, callback: Callable[[str], None]) -> Listener:
        listener = _LocalListener(self, callback)
        self._listeners.append(listener)
        return listener

    def notify(self, payload: str) -> None:
        self._deliver([payload])

    def _deliver(self, payloads: Sequence[str]) -> None:
        for payload in dict.fromkeys(payloads):  # like NOTIFY: one of equal payloads per transaction
            for listener in list(self._listeners):
                listener.callback(payload)


class _LocalRole:
    """One node: the only daemon has every role."""

    def __init__(self, name: str):
        self.name = name
        self._held = False

    def acquire(self) -> bool:
        self._held = True
        return True

    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        self._held = False


class _LocalListener:
    def __init__(self, coordination: LocalCoordination, callback: Callable[[str], None]):
        self._coordination, self.callback = coordination, callback

    def close(self) -> None:
        with suppress(ValueError):
            self._coordination._listeners.remove(self)
