"""Wiring and lifecycle: build the parts, recover, start serving and watching, stop in order.

The parts, each with one job: the journal (state), the pipeline (the steps), the gates
(paused work), the candidate tracker (seen -> settled), the dispatcher (due rows -> worker
pools), the scheduler (the loop thread that decides), the callback server, the tunnel and
the inbox watcher (threads that only report facts).

Start-up takes the locks in this order: the state folder's (the journal is this process's); the
inbox's marker (a node of a cluster: later); with the journal open, the processing folder's lock;
only then is this daemon's name written into the inbox's marker. A daemon that finds a live one's
files in its processing folder refuses before its name is in the marker, so the live one, whose
marker it may have taken after it was removed, waits for it to go and takes the marker back. While
running, a loop duty looks after both markers (``markers.py``).

With a PostgreSQL journal (``journal.url``) the daemon is a node of a cluster on one shared inbox:
it registers in the journal and says it is alive (a loop duty that also renews the leases of the
rows in hand and measures the database's clock: a node's clock is the database's, whatever its own
says, ``clock.DatabaseClock``), takes over the rows of nodes that stopped renewing theirs, rescans
the inbox only while it holds the rescanner role, and wakes up when another node records something
that concerns it (LISTEN/NOTIFY; the loop also looks at the journal at least every few seconds).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from . import markers, processing, reachability
from .alerts import Alerts
from .callback import TryLater, create_app
from .clock import Clock, DatabaseClock, SteadyClock, describe_offset, is_off
from .config import Config
from .dispatcher import RESULTS, UPLOADS, Dispatcher
from .events import (
    CleanupWanted,
    Event,
    FileSeen,
    FolderSeen,
    JournalFailed,
    RescanRequested,
    StepDone,
    StopRequested,
    Wake,
)
from .gates import Gates, GateState
from .journal import ACTIVE, BaseJournal, JournalError, JournalWriteError, Role, Row, State, open_journal
from .konfuzio import KonfuzioClient
from .locks import (
    DaemonLock,
    InboxLock,
    LockHeld,
    ProcessingLock,
    foreign_inbox_nodes,
    hostname,
    node_marker_path,
    remove_node_marker,
    write_node_marker,
)
from .markers import MarkerKeeper
from .metrics import ClusterSample, Metrics, Sample
from .monitor import OK, STARTING, STOPPING, iso, local_url, start_monitor
from .pipeline import Pipeline, limits_from
from .policy import Scope
from .reachability import POLL_ONLY, CallbackVerdict, CallbackWatch, ProbeTokens, Reachability
from .scheduler import Duty, Scheduler
from .sdnotify import Notifier
from .server import PUBLIC_ENDPOINT_SETTINGS, ServerThread
from .shares import Folders
from .summary import status_line
from .token_file import LOOK_EVERY_S, TokenWatch
from .tokens import hash_token
from .tracker import CandidateTracker
from .tunnel import Tunnel, TunnelSettings
from .watcher import InboxFilter, InboxWatcher, ObserverFactory, make_observer

log = logging.getLogger("konfuzio_watch")

STATUS_EVERY_S = 5.0
OLDEST_EVERY_S = 60.0
TOKEN_HANGUP_ONLY_S = 3600.0
TUNNEL_CHECK_EVERY_S = 30.0
NODE_ID_WAIT_S = 5.0  # a restarted node waits this long for the database to let go of its previous run
RESCANNER = "rescanner"  # the role of the node that does the periodic full rescans


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        client: KonfuzioClient | None = None,
        clock: Clock | None = None,
        on_transition: Callable[[Row, State], None] | None = None,
        notifier: Notifier | None = None,
        observer_factory: ObserverFactory = make_observer,
        executors: Mapping[str, Executor] | None = None,
        config_path: str | None = None,
    ):
        self.config = config
        self.cluster = config.journal.url is not None  # a node of a cluster on a shared PostgreSQL journal
        # A node's times are compared by the other nodes: they are the database's (``_measure_clock``).
        self.clock: Clock = DatabaseClock(clock or SteadyClock()) if self.cluster else clock or SteadyClock()
        self._clock_off = False  # this node's clock is off from the database's (said once, and when right again)
        self._client = client
        self._on_transition = on_transition
        self.notifier = notifier or Notifier(None)
        self._observer_factory = observer_factory
        self._executors = dict(executors or {})
        self._own_pools: list[ThreadPoolExecutor] = []
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._last_status = ""
        self.tunnel: Tunnel | None = None
        self.journal: BaseJournal | None = None
        self.node_id = config.node_id
        self.rescanner: Role | None = None
        self._rescanner_held = False
        self._next_rescan_at = 0.0
        self._alone = True  # no other node alive when this one started
        self._alive_nodes: set[str] = set()  # the other nodes alive at the last look (``_tend_leases``)
        self._node_marker: str | None = None
        self.server: ServerThread | None = None
        self.monitor: ServerThread | None = None
        self.daemon_lock: DaemonLock | None = None
        self.inbox_lock: InboxLock | None = None
        self.processing_lock: ProcessingLock | None = None
        self.markers: MarkerKeeper | None = None
        # name -> callable whose answer /status (and `konfuzio-watch status`) shows under "extra";
        # called on a monitor thread, so it must be thread-safe (e.g. a snapshot taken under a lock).
        self.status_sources: dict[str, Callable[[], object]] = {}
        self.started_at = time.time()
        self._stop_requested_at: float | None = None
        self.watcher: InboxWatcher | None = None
        self._watch_trouble: str | None = None  # why the inbox cannot be watched now (said once)
        # The markers, and the inbox's share, are looked at this often: watching restarts within a poll_interval
        # of the share's return.
        self._markers_every_s = max(0.5, min(markers.MARKERS_EVERY_S, config.watch.poll_interval))
        self.pipeline: Pipeline | None = None
        self.dispatcher: Dispatcher | None = None
        self.scheduler: Scheduler | None = None
        self.public_url: str | None = None
        self.processing_dir: Path | None = None
        self.processing_choice: processing.Choice | None = None  # the folder and why it was chosen
        self.token_watch: TokenWatch | None = None
        self._token_duty: Duty | None = None
        self.metrics = Metrics(self._sample, node_id=self.node_id if self.cluster else None)
        self.gates = Gates(limits_from(config), on_change=self._gate_changed)
        for gate in self.gates.by_scope.values():
            gate.on_recovered = self._gate_recovered
        # The alerts' "what to do" names the config: as typed (`-c config.yaml`) it means nothing to the
        # admin who reads the mail elsewhere, so the path is made whole against the folder started in.
        self.config_path = os.path.abspath(config_path) if config_path else None
        self.alerts = Alerts(config.alerts, config_path=self.config_path)
        self.probe_tokens = ProbeTokens()
        # The one answer to "are callbacks arriving?" that status, /healthz, /metrics and the log show
        # (its times are this machine's, as the log's).
        self.callback_watch = CallbackWatch()

    # -- start-up ------------------------------------------------------------------------------

    def start(self) -> Daemon:
        """Take the locks, open the journal, recover, bind the servers, start watching. Returns when ready.
        If any of it fails (port taken, tunnel refused), what was started is stopped again; if
        another daemon holds a lock (``LockHeld``), nothing was started."""
        try:
            return self._start()
        except LockHeld:
            if self.journal is not None:
                self.journal.close()
            self._release_locks()
            raise
        except BaseException:
            self._shutdown()
            raise

    def _start(self) -> Daemon:
        c = self.config
        self.started_at = time.time()
        # Before anything else: is this state folder (the journal), and this inbox, ours alone?
        c.folders.state.mkdir(parents=True, exist_ok=True)
        self.daemon_lock = DaemonLock(c.folders.state, c.folders.inbox).acquire()
        c.folders.inbox.mkdir(parents=True, exist_ok=True)
        if not self.cluster:
            self.inbox_lock = InboxLock(c.folders.inbox, c.folders.state).acquire()
        for folder in (c.folders.done, c.folders.failed):
            folder.mkdir(parents=True, exist_ok=True)
        self.journal = self._open_journal()
        damage = self.journal.quick_check()
        if damage != "ok":
            if self.cluster:
                raise JournalError(damage)
            raise JournalError(
                f"the journal {c.journal_path} is damaged ({damage[:200]}); stop here: move it aside "
                f"(mv {c.journal_path} {c.journal_path}.damaged) and start again: files waiting in the "
                "processing folder then go back to the inbox and through again"
            )
        self.processing_choice = processing.find(c, self.journal.meta("processing_dir"))
        self.processing_dir = self.processing_choice.path
        processing.prepare(self.processing_dir, c.folders.inbox)
        if unverifiable := processing.unverifiable_privacy(self.processing_dir):
            log.warning("%s", unverifiable)
        # Before the inbox's marker is written: a daemon whose processing folder holds the files of a
        # live one (its marker removed, its inbox renamed and recreated) leaves the marker to it.
        self.processing_lock = ProcessingLock(
            self.processing_dir,
            c.folders.state,
            cluster_id=self.journal.journal_id if self.cluster else None,
            journal=self.journal.location if self.cluster else None,
        ).acquire()
        self.processing_lock.claim(self.journal.journal_id)
        if self.cluster:
            self._join_cluster()
        else:
            assert self.inbox_lock
            self.inbox_lock.claim(self.journal.journal_id)
        # The folders as they are now, on the file systems they are on: a share's error, a missing folder
        # or a bare mountpoint pauses the work on them (``shares.py``); nothing makes them again.
        folders = Folders([c.folders.inbox, self.processing_dir, c.folders.done, c.folders.failed])
        self.markers = MarkerKeeper(
            self.inbox_lock,
            self.processing_lock,
            inbox=c.folders.inbox,
            on_lost=lambda _reason: self.request_stop(),
            on_new_inbox=self._watch_new_inbox,
            on_inbox_away=self._pause_watching,
            on_inbox_back=self._watch_again,
            folders=folders,
        )
        self.journal.bind_processing_dir(self.processing_dir)
        if self._client is None:
            self._client = KonfuzioClient(
                c.konfuzio.host,
                c.api_token(),
                c.konfuzio.timeout_seconds,
                pool_size=c.upload.concurrency + c.results.workers + 2,
            )
        self.pipeline = Pipeline(
            c,
            self.journal,
            self._client,
            clock=self.clock,
            gates=self.gates,
            metrics=self.metrics,
            callback_base=lambda: self.public_url or "",
            processing_dir=self.processing_dir,
            on_transition=self._transitioned,
            folders=folders,
        )
        self.pipeline.holds_processing_dir = self.markers.holds_processing_dir
        self.token_watch = TokenWatch(c.konfuzio.token_file, self.gates[Scope.API], self.pipeline.reload_token)
        if c.callback.enabled:
            self.pipeline.callback_watch = self.callback_watch
            self.pipeline.on_callbacks_missing = self._callbacks_missing
        for pool, size in ((UPLOADS, c.upload.concurrency), (RESULTS, c.results.workers)):
            if pool not in self._executors:
                executor = ThreadPoolExecutor(size, thread_name_prefix=pool)
                self._own_pools.append(executor)
                self._executors[pool] = executor
        keep = InboxFilter(
            c.folders.inbox, [c.folders.done, c.folders.failed, c.folders.state, self.processing_dir], c.watch.ignore
        )
        self.watcher = InboxWatcher(
            keep,
            self._report_path,
            polling=c.watch.polling,
            poll_interval_s=c.watch.poll_interval,
            rescan_interval_s=c.watch.rescan_interval,
            observer_factory=self._observer_factory,
        )
        self.status_sources["watcher"] = self.watcher.describe
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.dispatcher = Dispatcher(
            self.journal,
            self.pipeline,
            self.gates,
            self._executors,
            {UPLOADS: c.upload.concurrency, RESULTS: c.results.workers},
            report=events.put,
            lease_s=c.node.lease_seconds,
        )
        tracker = CandidateTracker(
            c.watch.settle_seconds, c.watch.incomplete_grace_seconds, self.watcher.scan, inbox=keep.inbox
        )
        self.status_sources["candidates"] = lambda: [c.to_dict() for c in tracker.snapshot(self.clock.now())]
        self.scheduler = Scheduler(
            clock=self.clock,
            journal=self.journal,
            gates=self.gates,
            pipeline=self.pipeline,
            dispatcher=self.dispatcher,
            tracker=tracker,
            inbox=keep.inbox,
            scan=self.watcher.scan,
            duties=self._duties(),
            events=events,
        )
        active = self.pipeline.recover(alone=self._alone)
        if active and self.cluster:
            log.info("%d unfinished file(s) in the journal, for the nodes to go on with", active)
        elif active:
            log.info("resuming %d unfinished file(s) from the journal", active)
        if self.cluster:
            self.journal.listen(self._heard)
        if c.monitor.enabled:  # first: it answers 503 "starting" while the rest comes up
            self.monitor = start_monitor(self.snapshot, self.metrics.render, c.monitor.host, c.monitor.port)
            self.daemon_lock.set_listening("monitor.port", c.monitor.host, self.monitor.port)
            self.daemon_lock.set_monitor_url(local_url(self.monitor))
        if c.callback.enabled:
            app = create_app(self._record_callback, path=c.callback.path, max_body_bytes=c.callback.max_body_kb * 1024)
            settings = dict(PUBLIC_ENDPOINT_SETTINGS, max_request_body_size=c.callback.max_body_kb * 1024)
            self.server = ServerThread(
                app, c.callback.host, c.callback.port, name="callback-server", threads=4, **settings
            ).start()
            self.daemon_lock.set_listening("callback.port", c.callback.host, self.server.port)
            self.public_url = c.callback.public_url or self.server.url
            if c.ngrok.enabled:
                self.tunnel = Tunnel(
                    TunnelSettings(c.ngrok.path, c.ngrok_authtoken(), c.ngrok.domain, c.ngrok.region),
                    self.server.port,
                    state_dir=c.folders.state,
                )
                self.public_url = self.tunnel.open()
        self.alerts.start()
        self._start_probes()
        self.watcher.start()  # watch first, then scan (the rescan duty is due at once): nothing slips between
        self._ready.set()
        callbacks = (
            f"callbacks at {self.public_url}/{c.callback.path.strip('/')}/…"
            if c.callback.enabled
            else "poll-only (callback.enabled: false)"
        )
        node = f", node {self.node_id} of the cluster on {self.journal.location}" if self.cluster else ""
        # Said once started, not before (a start that fails says one line: why it failed).
        log.info("processing folder: %s", self.processing_choice)
        log.info(
            "ready: watching %s%s, %s%s%s",
            c.folders.inbox,
            " (polling)" if self.watcher.polling else "",
            callbacks,
            f", monitor at {local_url(self.monitor)}" if self.monitor else "",
            node,
        )
        self.notifier.ready(self.status_line())
        return self

    def _duties(self) -> list[Duty]:
        assert self.markers
        watchdog = self.notifier.watchdog_interval_s
        c = self.config
        quarter = c.node.lease_seconds / 4 if self.cluster else None
        assert self.token_watch
        # A fixed token file is tried at once, not after the API gate's backoff. Without a token file
        # only SIGHUP has anything for it to do, and SIGHUP makes it due at once (``hangup``).
        self._token_duty = Duty(
            "token", LOOK_EVERY_S if c.konfuzio.token_file else TOKEN_HANGUP_ONLY_S, self.token_watch.look
        )
        return [
            # WATCHDOG=1 comes from the loop thread only: a stuck loop (not a slow upload on a
            # worker) is what systemd's watchdog catches.
            Duty("watchdog", watchdog, lambda _now: self.notifier.watchdog()),
            # A node of a cluster: alive, its leases renewed, the rows of nodes that stopped renewing
            # theirs taken over; a quarter of a lease apart, so a lease survives three missed renewals.
            Duty("leases", quarter, self._tend_leases),
            # In a cluster one node at a time rescans; the others ask for the role this often.
            Duty(
                "rescan",
                min(c.watch.rescan_interval, c.node.lease_seconds) if self.cluster else c.watch.rescan_interval,
                self._rescan,
            ),
            # Anyone who may write the inbox may remove its marker; a renamed and recreated inbox has none;
            # its share may go away and come back.
            Duty("markers", self._markers_every_s, self._tend_inbox),
            Duty("status", STATUS_EVERY_S, self._publish_status),
            Duty(
                "tunnel",
                TUNNEL_CHECK_EVERY_S if self.config.ngrok.enabled else None,
                self._check_tunnel,
                next_at=self.clock.now() + TUNNEL_CHECK_EVERY_S,
            ),
            Duty("oldest pending", OLDEST_EVERY_S if self.alerts.enabled else None, self._tell_oldest_pending),
            self._token_duty,
        ]

    # -- the journal; a node of a cluster --------------------------------------------------------

    def _open_journal(self) -> BaseJournal:
        c = self.config
        if not self.cluster:
            return open_journal(c)
        # Connections for the loop, the workers, the callback and monitor threads; a call that gets
        # none within a quarter of a lease (the database cannot be reached) pauses the work.
        return open_journal(
            c,
            pool_size=c.upload.concurrency + c.results.workers + 8,
            wait_s=max(1.0, min(10.0, c.node.lease_seconds / 4)),
        )

    def _join_cluster(self) -> None:
        """This node's id is its own; the inbox is the cluster's (its marker shared), and this node says
        what it sees there; then it is listed in the journal's nodes."""
        c, journal = self.config, self.journal
        assert journal is not None
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
        self._alone = not others
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

    def _tend_leases(self, now: float) -> None:
        """Heartbeat, renew the leases of the rows in hand, take over the rows whose node stopped renewing."""
        assert self.journal and self.dispatcher and self.pipeline
        self.journal.heartbeat(clock_offset_s=self._measure_clock())
        self.dispatcher.renew_leases()
        self.pipeline.take_over(exclude=set(self.dispatcher.inflight))
        self._look_after_lost_nodes(now)

    def _measure_clock(self) -> float:
        """Keep this node's clock on the database's (at join, and at every heartbeat); say once that the
        node's own clock is off, and once that it is right again. Returns the offset measured."""
        assert self.journal and isinstance(self.clock, DatabaseClock)
        measured = self.journal.clock_offset(self.clock.base.now)
        self.clock.adjust(measured)
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
        alive = {n.id for n in self.journal.nodes() if n.id != self.node_id and n.silent_s <= lease_s}
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
        scheduler = self.scheduler
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

    # -- facts from other threads ---------------------------------------------------------------

    def _report_path(self, kind: str, path: str) -> None:
        assert self.scheduler
        self.scheduler.report(FolderSeen(path) if kind == "dir" else FileSeen(path))

    def _record_callback(self, token: str, claimed_id: int | None) -> str:
        assert self.journal and self.scheduler
        if self.probe_tokens.arrived(token):
            return "probe"
        if self.cluster and self.probe_tokens.looks_like_probe(token):  # another node's, through the balancer
            try:
                self.journal.notify(f"probe:{hash_token(token)}")
            except JournalWriteError as exc:
                raise TryLater from exc
            return "probe"
        now = self.clock.now()
        try:
            outcome, row = self.journal.record_callback(hash_token(token), claimed_id, now)
        except JournalWriteError as exc:
            self.scheduler.report(JournalFailed(str(exc)))
            raise TryLater from exc
        self.metrics.callbacks.labels(outcome).inc()
        if outcome == "recorded":
            if row is not None and row.uploaded_at is not None:
                self.metrics.callback_latency.observe(max(0.0, now - row.uploaded_at))
            self.scheduler.report(Wake())
            if self.callback_watch.callback_arrived():
                self._callbacks_arriving()
        elif outcome == "finished" and row is not None:  # a done file's callback again: a refresh is due
            self.scheduler.report(Wake())
        elif outcome == "extra":  # a late copy from an earlier attempt: check it and delete it
            self.scheduler.report(CleanupWanted())
        return outcome

    def _gate_changed(self, state: GateState) -> None:
        if self.scheduler:
            self.scheduler.report(Wake())
        if state.blocked:
            self.alerts.blocked(state.reason)

    def _gate_recovered(self, _episode: GateState) -> None:
        if not self.gates.blocked():
            self.alerts.unblocked()

    def _transitioned(self, row: Row, old: State) -> None:
        if row.state == State.FAILED:
            self.alerts.file_failed(row.display_path, row.stage or "", row.error or "")
        if self._on_transition:
            self._on_transition(row, old)

    def _callbacks_arriving(self) -> None:
        """The verdict turned to yes: results are waited for (their callbacks) again."""
        log.info("callbacks arriving: %s", self.callback_watch.verdict().text)
        if self.pipeline is not None:
            self.pipeline.expect_callbacks = True
        self.alerts.callbacks_arriving()

    def _callbacks_missing(self, url: str) -> None:
        """Results keep being found by polling, their callbacks never came: the verdict is no."""
        log.warning(
            "callbacks arriving: %s (check callback.public_url, the reverse proxy or the tunnel, or set "
            "callback.enabled: false)",
            self.callback_watch.verdict().text,
        )
        self._poll_soon()
        self.alerts.callbacks_not_arriving(url)

    def _poll_soon(self) -> None:
        """No callbacks to wait for: results are polled soon after the upload (``results.first_poll_seconds``,
        then less and less often up to ``results.poll_interval``), not after ``results.callback_timeout``."""
        assert self.pipeline
        self.pipeline.expect_callbacks = False

    # -- start-up probes: the token and projects, the callback route -----------------------------

    def _start_probes(self) -> None:
        """In the background (start-up stays fast): does Konfuzio accept the token and know the
        projects; and can its callbacks reach us?"""
        assert self.pipeline
        pipeline = self.pipeline

        def run() -> None:
            try:
                pipeline.probe_account()
            except Exception:  # noqa: BLE001 - a probe must never take the daemon down
                log.exception("the start-up check of the API token failed")
            if self.config.callback.enabled:
                self._probe_callbacks()

        self._probe_thread = threading.Thread(target=run, name="start-up-probes", daemon=True)
        self._probe_thread.start()

    def _probe_callbacks(self) -> None:
        c = self.config
        public = (self.public_url or "").rstrip("/")
        if reachability.callback_base_is_private(public) and not reachability.callback_base_is_private(c.konfuzio.host):
            found = Reachability(False, public, f"{public} is a loopback address, which Konfuzio cannot reach")
        else:
            found = reachability.probe(public, c.callback.path, self.probe_tokens)
        verdict = self.callback_watch.probed(found)
        if found.ok or verdict.arriving:  # (a real callback may have come first)
            log.info("callbacks arriving: %s", verdict.text)
            return
        self._poll_soon()
        log.warning(
            "callbacks arriving: %s (%g s after the upload, then less and less often up to every %g s). "
            "Set callback.public_url, enable ngrok, or callback.enabled: false",
            verdict.text,
            c.results.first_poll_seconds,
            c.results.poll_interval,
        )
        self.alerts.callbacks_not_arriving(public)

    def callbacks_verdict(self) -> CallbackVerdict:
        """Are callbacks arriving? The one answer (``reachability.CallbackWatch``)."""
        return self.callback_watch.verdict() if self.config.callback.enabled else POLL_ONLY

    def _tell_oldest_pending(self, now: float) -> None:
        assert self.journal
        row = self.journal.oldest_active()
        self.alerts.oldest_pending(
            None if row is None else max(0.0, now - row.detected_at), "" if row is None else row.display_path
        )

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> bool:
        """The scheduling loop, until ``request_stop``; then the shutdown. True if it was clean; False
        if steps in hand were cut off after ``service.stop_timeout_seconds`` (their worker threads
        are still stuck: a process should exit now, with ``os._exit``, as ``konfuzio-watch run`` does)."""
        assert self.scheduler
        self.scheduler.run(self._stopping)
        return self._shutdown()

    def request_stop(self) -> None:
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()  # the stop timeout counts from here
        self._stopping.set()
        if self.scheduler:
            self.scheduler.report(StopRequested())

    def hangup(self) -> None:
        """SIGHUP: the API token is tried at once if Konfuzio rejected it (else the token file is read
        again). Called from the signal handler, on the loop's thread between any two of its steps: it
        only sets flags and reports a fact, which takes no lock the loop might hold."""
        if self.token_watch is None or self._token_duty is None or self.scheduler is None:
            return
        self.token_watch.hangup()
        self._token_duty.next_at = 0.0
        self.scheduler.report(Wake())

    def request_rescan(self) -> None:
        if self.scheduler:
            self.scheduler.report(RescanRequested())

    @property
    def lost_lock(self) -> str | None:
        """Why the daemon stopped by itself: another daemon took its inbox's marker (or its processing
        folder's lock) while it ran."""
        return self.markers.lost if self.markers else None

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    # -- periodic duties -------------------------------------------------------------------------

    def _rescan(self, now: float) -> None:
        """A full rescan of the inbox; in a cluster only by the node with the rescanner role, at once when
        it gets the role (the node that had it may have died in the middle of an interval). Not while the
        inbox's share is away: there is nothing to find, and its return brings a rescan of its own."""
        assert self.scheduler
        if self.markers is not None and self.markers.away is not None:
            return
        if self.rescanner is not None:
            held, had = self.rescanner.acquire(), self._rescanner_held
            self._rescanner_held = held
            if held and not had:
                log.info(
                    "this node rescans the inbox every %g s now (the rescanner role)", self.config.watch.rescan_interval
                )
            elif had and not held:
                log.warning(
                    "this node lost the rescanner role (its database connection broke); another node rescans the inbox"
                )
            if not held or (had and now < self._next_rescan_at):
                return
            self._next_rescan_at = now + self.config.watch.rescan_interval
        self.scheduler.rescan(now)

    def _watch_new_inbox(self, now: float) -> None:
        """The inbox was renamed and made again: the file events come from the old folder; watch the new
        one, and look at what it holds now."""
        log.info("the inbox %s is a new folder: watching it", self.config.folders.inbox)
        self._watch_again(now)

    def _tend_inbox(self, now: float) -> None:
        """The markers and the inbox's share (``markers.py``); and an observer that stopped by itself (watchdog's
        poller does when its folder is missing for a moment) is started again."""
        assert self.markers and self.watcher
        self.markers.tend(now)
        if self.markers.away is None and self.markers.lost is None and not self.watcher.is_running():
            if self._watch_trouble is None:
                log.warning(
                    "the observer of the inbox %s had stopped (its folder was missing for a moment?): "
                    "watching it again",
                    self.config.folders.inbox,
                )
            self._watch_again(now)

    def _pause_watching(self, reason: str) -> None:
        assert self.watcher
        self.watcher.pause(f"the inbox's share is away since {time.strftime('%H:%M:%S')}: {reason}")

    def _watch_again(self, now: float) -> None:
        """Watch the inbox anew (a new folder, its share back, an observer that stopped) and look at what it
        holds now: a new observer reports only what changes after it started."""
        assert self.watcher and self.scheduler
        self.watcher.stop()
        try:
            self.watcher.start()
        except OSError as exc:  # missing, or gone again in between: the next look at the markers tries again
            reason = exc.strerror or str(exc)
            if reason != self._watch_trouble:
                log.warning(
                    "cannot watch the inbox %s: %s; trying again every %g s",
                    self.config.folders.inbox,
                    reason,
                    self._markers_every_s,
                )
            self._watch_trouble = reason
            return
        if self._watch_trouble is not None:
            log.info("watching the inbox %s again", self.config.folders.inbox)
            self._watch_trouble = None
        self.scheduler.rescan(now)

    def _publish_status(self, _now: float) -> None:
        line = self.status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    def _check_tunnel(self, _now: float) -> None:
        assert self.tunnel
        try:
            url = self.tunnel.ensure_open()
        except Exception as exc:  # keep running: uploads wait, callbacks fall back to polling
            log.error("the ngrok tunnel is down and could not be reopened: %s", exc)
            return
        if url != self.public_url:
            log.warning("callbacks now arrive through %s (was %s); earlier uploads are polled", url, self.public_url)
            self.public_url = url

    # -- what the daemon tells: status line, metrics ----------------------------------------------

    def status_line(self) -> str:
        """One line for systemd's STATUS=: pending / done / failed, the oldest pending, blocks."""
        assert self.journal
        blocked = [g.reason for g in self.gates.blocked()]
        try:
            return status_line(
                self.journal.counts(), self.journal.oldest_active_detected_at(), self.clock.now(), blocked
            )
        except JournalWriteError as exc:  # a database that cannot be reached: say so, not a traceback
            return f"the journal cannot be read ({exc})" + "".join(f"; BLOCKED: {b}" for b in blocked)

    def snapshot(self) -> dict[str, object]:
        """What only the running daemon knows, for the monitor's /status (and /healthz)."""
        status = OK if self._ready.is_set() else STOPPING if self._stopping.is_set() else STARTING
        now = self.clock.now()
        blocked = [
            {
                "scope": g.scope.value,
                "reason": g.reason,
                "since": iso(g.since),
                "for_seconds": None if g.since is None else round(max(0.0, now - g.since), 1),
            }
            for g in self.gates.blocked()
        ]
        extra: dict[str, object] = {}
        for name, source in list(self.status_sources.items()):
            try:
                extra[name] = source()
            except Exception as exc:  # one broken source must not hide the others
                extra[name] = {"error": f"{type(exc).__name__}: {exc}"}
        snapshot: dict[str, object] = {
            "status": status,
            "line": self.status_line() if self.journal is not None else status,
            "pid": os.getpid(),
            "host": hostname(),
            "started_at": iso(self.started_at),
            "state_folder": str(self.config.folders.state),
            "inbox": str(self.config.folders.inbox),
            "public_url": self.public_url,
            "blocked": blocked,
            "in_hand": len(self.dispatcher.inflight) if self.dispatcher else 0,
            "callbacks": self.callbacks_verdict().to_dict(),
            "extra": extra,
        }
        if self.cluster:
            snapshot["node"] = {"id": self.node_id, "rescanner": self._rescanner_held}
        return snapshot

    def _sample(self) -> Sample:
        if self.journal is None:
            return Sample()
        blocked = {g.scope.value: g.reason for g in self.gates.blocked()}
        try:
            oldest = self.journal.oldest_active_detected_at()
            files = {state.value: n for state, n in self.journal.counts().items()}
            cluster = None
            if self.cluster:
                cluster = ClusterSample(
                    leased=len(self.dispatcher.inflight) if self.dispatcher else 0,
                    rescanner=self._rescanner_held,
                    heartbeat_age_s={n.id: n.silent_s for n in self.journal.nodes()},
                    alive_within_s=self.config.node.lease_seconds,
                )
        except JournalWriteError:  # the database cannot be reached: what the daemon knows by itself
            return Sample(ready=self._ready.is_set(), blocked=blocked, callbacks_arriving=self.callbacks_arriving())
        return Sample(
            files_by_state=files,
            oldest_pending_age_seconds=None if oldest is None else max(0.0, self.clock.now() - oldest),
            ready=self._ready.is_set(),
            blocked=blocked,
            callbacks_arriving=self.callbacks_arriving(),
            cluster=cluster,
        )

    def callbacks_arriving(self) -> bool | None:
        """The verdict's yes or no; None while not known yet, and in poll-only mode."""
        return self.callbacks_verdict().arriving

    def pending(self) -> int:
        assert self.journal
        return sum(n for state, n in self.journal.counts().items() if state in ACTIVE)

    # -- shutdown ------------------------------------------------------------------------------

    def _shutdown(self) -> bool:
        """Stop taking work, let the steps in hand finish within ``service.stop_timeout_seconds`` (counted
        from ``request_stop``), then close observer -> servers -> tunnel -> journal and the locks.

        Returns False if steps were cut off: one WARNING names them, and their worker threads are
        left behind (the journal is safe: every state change is a committed transaction, and start-up
        reconciles an ``uploading`` row with the server before uploading again)."""
        budget = self.config.service.stop_timeout_seconds
        deadline = (self._stop_requested_at or time.monotonic()) + budget
        inflight = len(self.dispatcher.inflight) if self.dispatcher else 0
        # After a failed start the caller reports the error in one line; undoing the start is no news.
        level = logging.INFO if self._ready.is_set() else logging.DEBUG
        log.log(level, "stopping: %d step(s) in hand", inflight)
        self.notifier.stopping(f"stopping; {inflight} step(s) in hand")
        self._stopping.set()
        self._ready.clear()
        if self.watcher:
            self.watcher.stop()
        for pool in self._own_pools:
            pool.shutdown(wait=False, cancel_futures=True)  # nothing new starts; queued steps are dropped
        cut_off = self._wait_for_steps(deadline)
        if cut_off:
            log.warning(
                "stopping: cut off after %g s: %s; start-up will reconcile them", budget, self._describe(cut_off)
            )
        else:
            for pool in self._own_pools:
                pool.shutdown(wait=True)
        for server in (self.server, self.monitor):
            if server:
                server.close(timeout_s=5 if not cut_off else 1)
        if self.tunnel:
            self.tunnel.close()
        self.alerts.close(timeout_s=3)  # what is pending is sent now, within a bound
        if self._client:
            self._client.close()
        if self.journal:
            if self.cluster:
                self._leave(cut_off)
            self.journal.close()
        self._release_locks()
        if cut_off:
            log.log(level, "stopped, leaving %d step(s) behind", len(cut_off))
        else:
            log.log(level, "stopped")
        return not cut_off

    def _leave(self, cut_off: list[int]) -> None:
        """A node stops: its leases go to the others at once (not those of steps cut off: they expire and
        are taken over like a dead node's), and it leaves the list of nodes and its inbox marker."""
        assert self.journal
        if self._node_marker is None:  # it never joined
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
        remove_node_marker(self.config.folders.inbox, self.node_id)

    def _wait_for_steps(self, deadline: float) -> list[int]:
        """Until the dispatcher has nothing in hand, or the deadline: the ids of the rows still in hand.
        The loop has stopped, so the workers' completions are taken from its queue here."""
        if self.dispatcher is None or self.scheduler is None:
            return []
        inflight = self.dispatcher.inflight
        while inflight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                event = self.scheduler.events.get(timeout=remaining)
            except queue.Empty:
                break
            if isinstance(event, StepDone):
                self.dispatcher.finished(event)
        return sorted(inflight)

    def _describe(self, row_ids: list[int], names_shown: int = 10) -> str:
        """``2 upload(s) in flight (a.pdf, b.pdf), 1 exporting (c.pdf)``, from the journal's rows."""
        try:
            assert self.journal
            rows = self.journal.get_many(row_ids)
        except Exception as exc:  # say what we can: the ids
            return f"{len(row_ids)} step(s) (journal rows {', '.join(map(str, row_ids))}; {exc})"
        by_state: dict[State, list[Row]] = {}
        for row in rows:
            by_state.setdefault(row.state, []).append(row)
        parts = []
        for state, group in by_state.items():
            names = ", ".join(r.display_path for r in group[:names_shown])
            if len(group) > names_shown:
                names += f", and {len(group) - names_shown} more"
            what = "upload(s) in flight" if state == State.UPLOADING else state.value
            parts.append(f"{len(group)} {what} ({names})")
        return ", ".join(parts)

    def _release_locks(self) -> None:
        for lock in (self.inbox_lock, self.processing_lock, self.daemon_lock):
            if lock:
                lock.release()


def run_in_thread(daemon: Daemon) -> threading.Thread:
    """Start and run a daemon on a background thread (tests, demo)."""
    daemon.start()
    thread = threading.Thread(target=daemon.run, name="konfuzio-watch-loop")
    thread.start()
    return thread
