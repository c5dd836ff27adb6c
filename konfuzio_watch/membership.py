"""Alone or a node of a cluster: what differs for the daemon, chosen once (``membership_for``).

A daemon with a SQLite journal is alone on its inbox (``Alone``): its inbox's marker is taken before
the journal is opened, its clock is its own, every rescan is its own. With a PostgreSQL journal
(``journal.url``) it is a node of a cluster on one shared inbox (``ClusterNode``): it registers in
the journal and says it is alive (a loop duty that also renews the leases of the rows in hand and
measures the database's clock: a node's clock is the database's, whatever its own says,
``clock.DatabaseClock``), takes over the rows of nodes that stopped renewing theirs, rescans the
inbox only while it holds the rescanner role, and wakes up when another node records something that
concerns it (LISTEN/NOTIFY; the loop also looks at the journal at least every few seconds).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from .callback import TryLater
from .clock import Clock, DatabaseClock, SteadyClock, describe_offset, is_off
from .config import Config
from .events import Wake
from .journal import BaseJournal, JournalError, JournalWriteError, Role, State, open_journal
from .lock_file import LockHeld
from .locks import InboxLock, ProcessingLock
from .metrics import ClusterSample
from .node_markers import foreign_inbox_nodes, node_marker_path, remove_node_marker, write_node_marker
from .reachability import ProbeTokens
from .scheduler import Duty
from .tokens import hash_token

if TYPE_CHECKING:
    from .dispatcher import Dispatcher
    from .runner import Pipeline
    from .scheduler import Scheduler

log = logging.getLogger("konfuzio_watch")

NODE_ID_WAIT_S = 5.0  # a restarted node waits this long for the database to let go of its previous run
RESCANNER = "rescanner"  # the role of the node that does the periodic full rescans


class Membership(ABC):
    """The daemon's place among the daemons on its journal and inbox."""

    #: The daemon's clock: the times it writes into the journal are on it.
    clock: Clock
    #: The node id the metrics carry (None: alone, no label).
    metrics_node_id: str | None = None
    #: Whether no other node was alive when this one started (recovery may then take every row).
    alone = True
    #: The inbox's lock, once taken.
    inbox_lock: InboxLock | None = None

    def __init__(self, config: Config, clock: Clock | None, probe_tokens: ProbeTokens):
        self.config = config
        self.probe_tokens = probe_tokens
        self.journal: BaseJournal | None = None

    def lock_inbox(self) -> None:  # noqa: B027 - a hook: a node takes the inbox's marker later
        """Before the journal is opened: take the inbox's marker, if it is this daemon's alone."""

    @abstractmethod
    def open_journal(self) -> BaseJournal: ...

    @abstractmethod
    def damaged(self, damage: str) -> JournalError:
        """The error that stops a start on a damaged journal (``quick_check``)."""

    @abstractmethod
    def processing_lock(self, folder: Path, journal: BaseJournal) -> ProcessingLock: ...

    @abstractmethod
    def enter(self, journal: BaseJournal) -> None:
        """With the processing folder's lock held: this daemon's name goes into the inbox's marker."""

    @abstractmethod
    def say_resuming(self, active: int) -> None: ...

    def listen(self, scheduler: Scheduler) -> None:  # noqa: B027 - a hook: alone, nobody else writes
        """Wake the loop when another node records something that concerns this one."""

    @abstractmethod
    def described(self) -> str:
        """What the ``ready`` line says about this daemon's place (empty: alone)."""

    def duties(self, dispatcher: Dispatcher, pipeline: Pipeline) -> list[Duty]:
        """The loop duties of its place."""
        return []

    @property
    def rescan_interval_s(self) -> float:
        return self.config.watch.rescan_interval

    def may_rescan(self, now: float) -> bool:
        """Whether this daemon does the full rescan that is due now."""
        return True

    def forward_probe(self, token: str) -> bool:
        """A callback that carries no file's token: True if it was another daemon's probe, passed on."""
        return False

    def snapshot(self) -> dict[str, object]:
        """Its part of /status."""
        return {}

    def sample(self, in_hand: int) -> ClusterSample | None:
        """Its part of the metrics."""
        return None

    def leave(self, cut_off: list[int]) -> None:  # noqa: B027 - a hook: alone, nobody to tell
        """The daemon stops: tell the others (not about the rows in ``cut_off``)."""


class Alone(Membership):
    """The only daemon on its journal (SQLite) and its inbox."""

    def __init__(self, config: Config, clock: Clock | None, probe_tokens: ProbeTokens):
        super().__init__(config, clock, probe_tokens)
        self.clock = clock or SteadyClock()

    def lock_inbox(self) -> None:
        self.inbox_lock = InboxLock(self.config.folders.inbox, self.config.folders.state).acquire()

    def open_journal(self) -> BaseJournal:
        return open_journal(self.config)

    def damaged(self, damage: str) -> JournalError:
        path = self.config.journal_path
        return JournalError(
            f"the journal {path} is damaged ({damage[:200]}); stop here: move it aside "
            f"(mv {path} {path}.damaged) and start again: files waiting in the "
            "processing folder then go back to the inbox and through again"
        )

    def processing_lock(self, folder: Path, journal: BaseJournal) -> ProcessingLock:
        return ProcessingLock(folder, self.config.folders.state)

    def enter(self, journal: BaseJournal) -> None:
        self.journal = journal
        assert self.inbox_lock
        self.inbox_lock.claim(journal.journal_id)

    def say_resuming(self, active: int) -> None:
        if active:
            log.info("resuming %d unfinished file(s) from the journal", active)

    def described(self) -> str:
        return ""


class ClusterNode(Membership):
    """A node of a cluster on a shared PostgreSQL journal and one shared inbox."""

    def __init__(self, config: Config, clock: Clock | None, probe_tokens: ProbeTokens):
        super().__init__(config, clock, probe_tokens)
        # A node's times are compared by the other nodes: they are the database's (``_measure_clock``).
        self.clock = self.database_clock = DatabaseClock(clock or SteadyClock())
        self.metrics_node_id = config.node_id
        self._clock_off = False  # this node's clock is off from the database's (said once, and when right again)
        self.rescanner: Role | None = None
        self.rescanner_held = False
        self._next_rescan_at = 0.0
        self._alive_nodes: set[str] = set()  # the other nodes alive at the last look (``_tend_leases``)
        self._node_marker: str | None = None
        self._scheduler: Scheduler | None = None

    def open_journal(self) -> BaseJournal:
        c = self.config
        # Connections for the loop, the workers, the callback and monitor threads; a call that gets
        # none within a quarter of a lease (the database cannot be reached) pauses the work.
        return open_journal(
            c,
            pool_size=c.upload.concurrency + c.results.workers + 8,
            wait_s=max(1.0, min(10.0, c.node.lease_seconds / 4)),
        )

    def damaged(self, damage: str) -> JournalError:
        return JournalError(damage)

    def processing_lock(self, folder: Path, journal: BaseJournal) -> ProcessingLock:
        state = self.config.folders.state
        return ProcessingLock(folder, state, cluster_id=journal.journal_id, journal=journal.location)

    def enter(self, journal: BaseJournal) -> None:
        """This node's id is its own; the inbox is the cluster's (its marker shared), and this node says
        what it sees there; then it is listed in the journal's nodes."""
        self.journal = journal
        c = self.config
        own_id = journal.role(f"node:{journal.node_id}")
        deadline = time.monotonic() + NODE_ID_WAIT_S
        while not own_id.acquire():
            if time.monotonic() > deadline:
                other = next((n for n in journal.nodes() if n.id == journal.node_id), None)
                who = f" (pid {other.pid} on host {other.host}, heard {other.silent_s:.0f} s ago)" if other else ""
                raise LockHeld(
                    f"another konfuzio-watch node with node.id {journal.node_id}{who} uses the journal "
                    f"{journal.location}; give each node its own node.id"
                )
            time.sleep(0.1)  # its previous run just ended: the database lets go of its session in a moment
        self.inbox_lock = InboxLock(
            c.folders.inbox, c.folders.state, cluster_id=journal.journal_id, journal=journal.location
        ).acquire()
        self.inbox_lock.claim(journal.journal_id)
        self._node_marker = write_node_marker(c.folders.inbox, journal.node_id, journal.journal_id)
        alive_s = c.node.lease_seconds
        others = [n for n in journal.nodes() if n.id != journal.node_id and n.silent_s <= alive_s]
        journal.join(inbox_marker=self._node_marker, clock_offset_s=self._measure_clock())
        self.alone = not others
        self._alive_nodes = {n.id for n in others}
        for node in foreign_inbox_nodes(c.folders.inbox, journal.node_id, others, alive_s):
            log.error(
                "node %s (host %s) watches another inbox: its marker %s is not in %s as this machine sees it; "
                "every node must see the same share under the same path (konfuzio-watch check)",
                node.id,
                node.host,
                node_marker_path(c.folders.inbox, node.id).name,
                c.folders.inbox,
            )
        self.rescanner = journal.role(RESCANNER)
        log.info(
            "node %s joins the cluster on %s (%s)",
            journal.node_id,
            journal.location,
            f"{len(others)} other node(s) alive: {', '.join(n.id for n in others)}"
            if others
            else "no other node alive",
        )

    def say_resuming(self, active: int) -> None:
        if active:
            log.info("%d unfinished file(s) in the journal, for the nodes to go on with", active)

    def listen(self, scheduler: Scheduler) -> None:
        assert self.journal
        self._scheduler = scheduler
        self.journal.listen(self._heard)

    def described(self) -> str:
        assert self.journal
        return f", node {self.config.node_id} of the cluster on {self.journal.location}"

    def duties(self, dispatcher: Dispatcher, pipeline: Pipeline) -> list[Duty]:
        def tend_leases(now: float) -> None:
            """Heartbeat, renew the leases of the rows in hand, take over the rows whose node stopped renewing."""
            assert self.journal
            self.journal.heartbeat(clock_offset_s=self._measure_clock())
            dispatcher.renew_leases()
            pipeline.take_over(exclude=set(dispatcher.inflight))
            self._look_after_lost_nodes(now)

        # Alive, its leases renewed, the rows of nodes that stopped renewing theirs taken over; a
        # quarter of a lease apart, so a lease survives three missed renewals.
        return [Duty("leases", self.config.node.lease_seconds / 4, tend_leases)]

    @property
    def rescan_interval_s(self) -> float:
        # One node at a time rescans; the others ask for the role this often.
        return min(self.config.watch.rescan_interval, self.config.node.lease_seconds)

    def may_rescan(self, now: float) -> bool:
        """Only the node with the rescanner role rescans, at once when it gets the role (the node that had
        it may have died in the middle of an interval)."""
        assert self.rescanner is not None
        held, had = self.rescanner.acquire(), self.rescanner_held
        self.rescanner_held = held
        if held and not had:
            log.info(
                "this node rescans the inbox every %g s now (the rescanner role)", self.config.watch.rescan_interval
            )
        elif had and not held:
            log.warning(
                "this node lost the rescanner role (its database connection broke); another node rescans the inbox"
            )
        if not held or (had and now < self._next_rescan_at):
            return False
        self._next_rescan_at = now + self.config.watch.rescan_interval
        return True

    def forward_probe(self, token: str) -> bool:
        """Another node's probe, through the balancer: passed on to every node."""
        if not self.probe_tokens.looks_like_probe(token):
            return False
        assert self.journal
        try:
            self.journal.notify(f"probe:{hash_token(token)}")
        except JournalWriteError as exc:
            raise TryLater from exc
        return True

    def snapshot(self) -> dict[str, object]:
        return {"node": {"id": self.config.node_id, "rescanner": self.rescanner_held}}

    def sample(self, in_hand: int) -> ClusterSample:
        assert self.journal
        return ClusterSample(
            leased=in_hand,
            rescanner=self.rescanner_held,
            heartbeat_age_s={n.id: n.silent_s for n in self.journal.nodes()},
            alive_within_s=self.config.node.lease_seconds,
        )

    def leave(self, cut_off: list[int]) -> None:
        """A node stops: its leases go to the others at once (not those of steps cut off: they expire and
        are taken over like a dead node's), and it leaves the list of nodes and its inbox marker."""
        if self.journal is None or self._node_marker is None:  # it never joined
            return
        try:
            self.journal.leave(keep=cut_off)
        except JournalWriteError as exc:
            log.warning(
                "stopping: could not tell the other nodes (%s); its rows pass to them when its leases expire "
                "(node.lease_seconds, %g s)",
                exc,
                self.config.node.lease_seconds,
            )
        remove_node_marker(self.config.folders.inbox, self.config.node_id)

    def _measure_clock(self) -> float:
        """Keep this node's clock on the database's (at join, and at every heartbeat); say once that the
        node's own clock is off, and once that it is right again. Returns the offset measured."""
        assert self.journal
        measured = self.journal.clock_offset(self.database_clock.base.now)
        self.database_clock.adjust(measured)
        off = is_off(measured.offset_s)
        if off and not self._clock_off:
            log.warning(
                "this node's clock is %s (the PostgreSQL server's): the times it writes for the other nodes "
                "are on the database's clock all the same, but its log lines are not; set the clocks right "
                "(NTP) on this machine or the database server",
                describe_offset(measured.offset_s),
            )
        elif self._clock_off and not off:
            log.info("this node's clock is %s now", describe_offset(measured.offset_s))
        self._clock_off = off
        return measured.offset_s

    def _look_after_lost_nodes(self, now: float) -> None:
        """A node that fell silent (or left) since the last look may have been the one its files'
        callbacks go to (a callback URL of its own, a tunnel on it; or its callbacks were refused while
        it could not reach the journal): the files waiting for their results are looked at now, as a
        single daemon does after a restart, rather than a ``results.callback_timeout`` later."""
        assert self.journal
        lease_s = self.config.node.lease_seconds
        alive = {n.id for n in self.journal.nodes() if n.id != self.config.node_id and n.silent_s <= lease_s}
        lost, self._alive_nodes = self._alive_nodes - alive, alive
        if lost:
            due = self.journal.make_due([State.UPLOADED], now)
            # A warning when files wait on it; with none, nothing is at risk (and a node whose
            # heartbeats flap on a loaded machine, e.g. after a database outage, would repeat it).
            log.log(
                logging.WARNING if due else logging.INFO,
                "node(s) %s stopped or fell silent: callbacks sent to them may be lost; %d file(s) waiting "
                "for their results are looked at now",
                ", ".join(sorted(lost)),
                due,
            )

    def _heard(self, payload: str) -> None:
        """A notification from the journal (any node's write; on the listener's thread)."""
        if payload.startswith("probe:"):
            self.probe_tokens.arrived_hash(payload.removeprefix("probe:"))
            return
        scheduler = self._scheduler
        if scheduler is None:
            return
        if payload.startswith("due:"):
            try:
                due = float(payload.removeprefix("due:"))
            except ValueError:
                due = 0.0
            if due >= scheduler.sleeping_until:
                return  # the loop wakes before that anyway
        scheduler.report(Wake())


def membership_for(config: Config, clock: Clock | None, probe_tokens: ProbeTokens) -> Membership:
    """A node of a cluster with a PostgreSQL journal (``journal.url``), else alone."""
    kind = ClusterNode if config.journal.url is not None else Alone
    return kind(config, clock, probe_tokens)
