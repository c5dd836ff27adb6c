"""Wiring and lifecycle: build the parts, recover, start serving and watching, stop in order.

The parts, each with one job: the journal (state), the pipeline (the steps), the gates
(paused work), the candidate tracker (seen -> settled), the dispatcher (due rows -> worker
pools), the scheduler (the loop thread that decides, running the ``duties.py``), the callback
server (``callback_intake.py``), the tunnel and the inbox watcher (threads that only report facts);
what differs between a daemon alone and a node of a cluster is its ``membership.py``.

Start-up takes the locks in this order: the state folder's (the journal is this process's); the
inbox's marker (a node of a cluster: later); with the journal open, the processing folder's lock;
only then is this daemon's name written into the inbox's marker. A daemon that finds a live one's
files in its processing folder refuses before its name is in the marker, so the live one, whose
marker it may have taken after it was removed, waits for it to go and takes the marker back. While
running, a loop duty looks after both markers (``markers.py``).
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

from . import processing
from .alerts import Alerts
from .callback import create_app
from .callback_intake import CallbackIntake
from .clock import Clock
from .config import Config
from .deliver_worker import Deliverer
from .delivery import Deliveries
from .dispatcher import RESULTS, UPLOADS, Dispatcher
from .duties import Duties
from .events import Event, FileSeen, FolderSeen, RescanRequested, StepDone, StopRequested, Wake
from .gates import Gates, GateState
from .journal import BaseJournal, Row, State, display_name
from .konfuzio import KonfuzioClient
from .lock_file import LockHeld
from .locks import DaemonLock, InboxLock, ProcessingLock
from .markers import MarkerKeeper
from .membership import membership_for
from .metrics import Metrics
from .monitor import local_url, start_monitor
from .page_view import PageView
from .policy import Scope
from .reachability import CallbackVerdict
from .runner import Pipeline, limits_from
from .sampling import StatusSampler
from .scheduler import Scheduler
from .sdnotify import Notifier
from .server import PUBLIC_ENDPOINT_SETTINGS, ServerThread
from .shares import Folders
from .token_file import TokenWatch
from .tracker import CandidateTracker
from .transition_metrics import count_transition
from .tunnel import Tunnel, TunnelSettings
from .watcher import InboxFilter, InboxWatcher, ObserverFactory, make_observer

log = logging.getLogger("konfuzio_watch")


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
        self.callbacks = CallbackIntake(self)
        self.probe_tokens = self.callbacks.probe_tokens
        self.callback_watch = self.callbacks.watch
        # Alone on its journal and inbox, or a node of a cluster: chosen here, once.
        self.membership = membership_for(config, clock, self.probe_tokens)
        self.clock: Clock = self.membership.clock
        self._client = client
        self._on_transition = on_transition
        self.notifier = notifier or Notifier(None)
        self._observer_factory = observer_factory
        self._executors = dict(executors or {})
        self._own_pools: list[ThreadPoolExecutor] = []
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self.tunnel: Tunnel | None = None
        self.journal: BaseJournal | None = None
        self.node_id = config.node_id
        self.server: ServerThread | None = None
        self.monitor: ServerThread | None = None
        self.daemon_lock: DaemonLock | None = None
        self.processing_lock: ProcessingLock | None = None
        self.markers: MarkerKeeper | None = None
        # name -> callable whose answer /status (and `konfuzio-watch status`) shows under "extra";
        # called on a monitor thread, so it must be thread-safe (e.g. a snapshot taken under a lock).
        self.status_sources: dict[str, Callable[[], object]] = {}
        self.started_at = time.time()
        self._stop_requested_at: float | None = None
        self.watcher: InboxWatcher | None = None
        self.duties = Duties(self)
        self.sampler = StatusSampler(self)
        self.pipeline: Pipeline | None = None
        self.deliverer: Deliverer | None = None  # with a ``deliver`` section: the outbox's sender
        self.dispatcher: Dispatcher | None = None
        self.scheduler: Scheduler | None = None
        self.public_url: str | None = None
        self.processing_dir: Path | None = None
        self.processing_choice: processing.Choice | None = None  # the folder and why it was chosen
        self.token_watch: TokenWatch | None = None
        self.metrics = Metrics(
            self.sampler.sample, node_id=self.membership.metrics_node_id, deliveries=config.deliver.enabled
        )
        self.gates = Gates(limits_from(config), on_change=self._gate_changed)
        for gate in self.gates.by_scope.values():
            gate.on_recovered = self._gate_recovered
        # The alerts' "what to do" names the config: as typed (`-c config.yaml`) it means nothing to the
        # admin who reads the mail elsewhere, so the path is made whole against the folder started in.
        self.config_path = os.path.abspath(config_path) if config_path else None
        self.alerts = Alerts(config.alerts, config_path=self.config_path)

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
        self.membership.lock_inbox()
        for folder in (c.folders.done, c.folders.failed):
            folder.mkdir(parents=True, exist_ok=True)
        self.journal = self.membership.open_journal()
        damage = self.journal.quick_check()
        if damage != "ok":
            raise self.membership.damaged(damage)
        self.processing_choice = processing.find(c, self.journal.meta("processing_dir"))
        self.processing_dir = self.processing_choice.path
        processing.prepare(self.processing_dir, c.folders.inbox)
        if unverifiable := processing.unverifiable_privacy(self.processing_dir):
            log.warning("%s", unverifiable)
        # Before the inbox's marker is written: a daemon whose processing folder holds the files of a
        # live one (its marker removed, its inbox renamed and recreated) leaves the marker to it.
        self.processing_lock = self.membership.processing_lock(self.processing_dir, self.journal).acquire()
        self.processing_lock.claim(self.journal.journal_id)
        self.membership.enter(self.journal)
        # The folders as they are now, on the file systems they are on: a share's error, a missing folder
        # or a bare mountpoint pauses the work on them (``shares.py``); nothing makes them again.
        folders = Folders([c.folders.inbox, self.processing_dir, c.folders.done, c.folders.failed])
        self.markers = MarkerKeeper(
            self.inbox_lock,
            self.processing_lock,
            inbox=c.folders.inbox,
            on_lost=lambda _reason: self.request_stop(),
            on_new_inbox=self.duties.watch_new_inbox,
            on_inbox_away=self.duties.pause_watching,
            on_inbox_back=self.duties.watch_again,
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
        self.pipeline.ctx.holds_processing_dir = self.markers.holds_processing_dir
        if c.deliver.enabled:
            self.deliverer = Deliverer.build(
                c, self.journal, self.gates[Scope.RECEIVER], self.clock, self.metrics, on_failed=self._delivery_failed
            )
            self.pipeline.ctx.deliveries = Deliveries(c.deliver, self.journal, wake=self.deliverer.wake)
        self.token_watch = TokenWatch(c.konfuzio.token_file, self.gates[Scope.API], self.pipeline.reload_token)
        if c.callback.enabled:
            self.pipeline.ctx.callback_watch = self.callback_watch
            self.pipeline.ctx.on_callbacks_missing = self.callbacks.missing
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
            duties=self.duties.build(),
            events=events,
        )
        self.membership.say_resuming(self.pipeline.recover(alone=self.membership.alone))
        self.membership.listen(self.scheduler)
        if c.monitor.enabled:  # first: it answers 503 "starting" while the rest comes up
            self.monitor = start_monitor(
                self.snapshot, self.metrics.render, c.monitor.host, c.monitor.port, page=PageView(self)
            )
            self.daemon_lock.set_listening("monitor.port", c.monitor.host, self.monitor.port)
            self.daemon_lock.set_monitor_url(local_url(self.monitor))
        if c.callback.enabled:
            app = create_app(self.callbacks.record, path=c.callback.path, max_body_bytes=c.callback.max_body_kb * 1024)
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
        if self.deliverer:
            self.deliverer.start()
        self.callbacks.start_probes()
        self.watcher.start()  # watch first, then scan (the rescan duty is due at once): nothing slips between
        self._ready.set()
        callbacks = (
            f"callbacks at {self.public_url}/{c.callback.path.strip('/')}/…"
            if c.callback.enabled
            else "poll-only (callback.enabled: false)"
        )
        # Said once started, not before (a start that fails says one line: why it failed).
        log.info("processing folder: %s", self.processing_choice)
        log.info(
            "ready: watching %s%s, %s%s%s",
            c.folders.inbox,
            " (polling)" if self.watcher.polling else "",
            callbacks,
            f", monitor at {local_url(self.monitor)}" if self.monitor else "",
            self.membership.described(),
        )
        self.notifier.ready(self.status_line())
        return self

    # -- facts from other threads ---------------------------------------------------------------

    def _report_path(self, kind: str, path: str) -> None:
        assert self.scheduler
        self.scheduler.report(FolderSeen(path) if kind == "dir" else FileSeen(path))

    def _gate_changed(self, state: GateState) -> None:
        if self.scheduler:
            self.scheduler.report(Wake())
        if state.blocked:
            self.alerts.blocked(state.reason)

    def _gate_recovered(self, _episode: GateState) -> None:
        if not self.gates.blocked():
            self.alerts.unblocked()

    def _delivery_failed(self, delivery: object, error: str) -> None:
        self.alerts.file_failed(display_name(delivery.file_path), "deliver", error)  # type: ignore[attr-defined]

    def _transitioned(self, row: Row, old: State) -> None:
        count_transition(self.metrics, row, old)
        if row.state == State.FAILED:
            self.alerts.file_failed(row.display_path, row.stage or "", row.error or "")
        if self._on_transition:
            self._on_transition(row, old)

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
        if self.token_watch is None or self.duties.token is None or self.scheduler is None:
            return
        self.token_watch.hangup()
        self.duties.token.next_at = 0.0
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

    @property
    def is_stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def inbox_lock(self) -> InboxLock | None:
        return self.membership.inbox_lock

    # -- what the daemon tells (``sampling.py``), callbacks (``callback_intake.py``) ---------------

    def status_line(self) -> str:
        return self.sampler.status_line()

    def snapshot(self) -> dict[str, object]:
        return self.sampler.snapshot()

    def pending(self) -> int:
        return self.sampler.pending()

    def callbacks_verdict(self) -> CallbackVerdict:
        return self.callbacks.verdict()

    def callbacks_arriving(self) -> bool | None:
        """The verdict's yes or no; None while not known yet, and in poll-only mode."""
        return self.callbacks_verdict().arriving

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
                "stopping: cut off after %g s: %s; start-up will reconcile them", budget, self.sampler.describe(cut_off)
            )
        else:
            for pool in self._own_pools:
                pool.shutdown(wait=True)
        # A delivery in hand past the deadline is left behind (its thread is stuck in the send): it is
        # sent again after the restart, with the same key.
        delivery_cut = self.deliverer is not None and not self.deliverer.stop(max(1.0, deadline - time.monotonic()))
        for server in (self.server, self.monitor):
            if server:
                server.close(timeout_s=5 if not cut_off else 1)
        if self.tunnel:
            self.tunnel.close()
        self.alerts.close(timeout_s=3)  # what is pending is sent now, within a bound
        if self._client:
            self._client.close()
        if self.journal:
            self.membership.leave(cut_off)
            self.journal.close()
        self._release_locks()
        if cut_off:
            log.log(level, "stopped, leaving %d step(s) behind", len(cut_off))
        else:
            log.log(level, "stopped")
        return not cut_off and not delivery_cut

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
