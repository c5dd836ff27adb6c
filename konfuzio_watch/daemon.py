"""Wiring, recovery at start-up, the scheduling loop, and an ordered shutdown.

Threads that listen to the outside world (the observer, the HTTP handlers, worker completions)
only put facts on ``self._events``. The loop thread alone decides: it tracks candidate files
until they are stable, claims them in batches, and hands due journal rows to two bounded
pools (uploads; results). It sleeps until the next thing is due, so an idle daemon costs nothing.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from . import metrics, readiness
from .callback import create_app
from .config import Config
from .journal import ACTIVE, Journal, Row, State
from .konfuzio import KonfuzioClient
from .pipeline import Pipeline, hash_token
from .sdnotify import Notifier
from .server import PUBLIC_ENDPOINT_SETTINGS, ServerThread
from .status import format_age
from .tunnel import Tunnel, TunnelSettings
from .watcher import InboxFilter, InboxWatcher, ObserverFactory, make_observer

log = logging.getLogger("konfuzio_watch")

CLAIM_BATCH = 500
MAX_SLEEP_S = 60.0
STATUS_EVERY_S = 5.0
TUNNEL_CHECK_EVERY_S = 30.0
RESULT_STATES = (State.UPLOADED, State.EXPORTING, State.FAILING)


@dataclass
class Stats:
    """Counters for metrics and the demo's progress display."""

    uploads: int = 0
    callbacks: dict[str, int] = field(default_factory=dict)
    callback_latency: metrics.Histogram = field(default_factory=metrics.Histogram)


class Daemon:
    def __init__(self, config: Config, *, client: KonfuzioClient | None = None,
                 clock: Callable[[], float] = time.time,
                 on_transition: Callable[[Row, State], None] | None = None,
                 notifier: Notifier | None = None, observer_factory: ObserverFactory = make_observer):
        self.config = config
        self.clock = clock
        self._client = client
        self._on_transition = on_transition
        self.notifier = notifier or Notifier(None)
        self._observer_factory = observer_factory
        self.tunnel: Tunnel | None = None
        self._last_status = ""
        self._next_status = 0.0
        self._next_watchdog = 0.0
        self._next_tunnel_check = 0.0
        self._events: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._candidates: dict[str, readiness.Observation | None] = {}
        self._due: list[tuple[float, str]] = []  # heap of (check at, path)
        self._inflight: dict[int, str] = {}  # row id -> pool name
        self._reconciling = False
        self._next_rescan = 0.0
        self.stats = Stats()
        self.journal: Journal | None = None
        self.server: ServerThread | None = None
        self.watcher: InboxWatcher | None = None
        self.pipeline: Pipeline | None = None
        self.public_url: str | None = None
        self._uploads: ThreadPoolExecutor | None = None
        self._results: ThreadPoolExecutor | None = None

    # -- start-up ------------------------------------------------------------------------------

    def start(self) -> Daemon:
        """Open the journal, recover, bind the server, start watching. Returns when ready.
        If any of it fails (port taken, tunnel refused), what was started is stopped again."""
        try:
            return self._start()
        except BaseException:
            self._shutdown()
            raise

    def _start(self) -> Daemon:
        c = self.config
        for folder in (c.folders.inbox, c.folders.done, c.folders.failed, c.folders.state, c.processing_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(c.journal_path)
        self.journal.bind_processing_dir(c.processing_dir)
        if self._client is None:
            self._client = KonfuzioClient(c.konfuzio.host, c.api_token(), c.konfuzio.timeout_seconds,
                                          pool_size=c.upload.concurrency + c.results.workers + 2)
        self.pipeline = Pipeline(c, self.journal, self._client, callback_base=lambda: self.public_url or "",
                                 clock=self.clock, on_transition=self._transitioned)
        self._uploads = ThreadPoolExecutor(c.upload.concurrency, thread_name_prefix="upload")
        self._results = ThreadPoolExecutor(c.results.workers, thread_name_prefix="results")
        self._recover()
        app = create_app(self._record_callback, self._ready.is_set, path=c.callback.path,
                         max_body_bytes=c.callback.max_body_kb * 1024, metrics=self.render_metrics)
        settings = dict(PUBLIC_ENDPOINT_SETTINGS, max_request_body_size=c.callback.max_body_kb * 1024)
        self.server = ServerThread(app, c.callback.host, c.callback.port, name="callback-server", threads=4,
                                   **settings).start()
        self.public_url = c.callback.public_url or self.server.url
        if c.ngrok.enabled:
            self.tunnel = Tunnel(TunnelSettings(c.ngrok.path, c.ngrok_authtoken(), c.ngrok.domain, c.ngrok.region),
                                 self.server.port, state_dir=c.folders.state)
            self.public_url = self.tunnel.open()
            self._next_tunnel_check = self.clock() + TUNNEL_CHECK_EVERY_S
        keep = InboxFilter(c.folders.inbox, [c.folders.done, c.folders.failed, c.folders.state, c.processing_dir],
                           c.watch.ignore)
        self.watcher = InboxWatcher(keep, self._report, polling=c.watch.polling,
                                    poll_interval_s=c.watch.poll_interval, observer_factory=self._observer_factory)
        self.watcher.start()  # watch first, then scan: nothing slips between the two
        self._events.put(("rescan", None))
        self._ready.set()
        log.info("ready: watching %s%s, callbacks at %s/%s/…", c.folders.inbox,
                 " (polling)" if self.watcher.polling else "", self.public_url, c.callback.path.strip("/"))
        self.notifier.ready(self.status_line())
        return self

    def _recover(self) -> None:
        """Finish what a previous run left half done. Journal rows are the truth."""
        assert self.journal and self.pipeline
        claiming = self.journal.rows([State.CLAIMING], limit=1_000_000)
        if claiming:
            self.pipeline.finish_claims(claiming)
        now = self.clock()
        waiting = self.journal.rows([State.UPLOADED], limit=1_000_000)
        # Callbacks that came while we were down are lost: look at every waiting file once now.
        self.journal.update_many([r.id for r in waiting], now, next_at=now)
        active = sum(n for s, n in self.journal.counts().items() if s in ACTIVE)
        if active:
            log.info("resuming %d unfinished file(s) from the journal", active)

    # -- facts from other threads ---------------------------------------------------------------

    def _report(self, kind: str, path: str) -> None:
        self._events.put((kind, path))

    def _record_callback(self, token: str, claimed_id: int | None) -> str:
        assert self.journal
        now = self.clock()
        token_hash = hash_token(token)
        outcome = self.journal.record_callback(token_hash, claimed_id, now)
        self.stats.callbacks[outcome] = self.stats.callbacks.get(outcome, 0) + 1
        if outcome == "recorded":
            row = self.journal.find_by_token_hash(token_hash)
            if row is not None and row.uploaded_at is not None:
                self.stats.callback_latency.observe(max(0.0, now - row.uploaded_at))
            self._events.put(("wake", None))
        return outcome

    def _transitioned(self, row: Row, old: State) -> None:
        if row.state == State.UPLOADED and old == State.UPLOADING:
            self.stats.uploads += 1
        if self._on_transition:
            self._on_transition(row, old)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """The scheduling loop; returns after ``request_stop`` once in-flight steps are finished."""
        while not self._stopping.is_set():
            try:
                self._wait_for_events(self._seconds_until_next())
                if self._stopping.is_set():
                    break
                self._step(self.clock())
            except Exception:  # e.g. the journal's disk failing: say so, keep going, don't spin
                log.exception("the scheduling loop hit an error; going on in 5 s")
                self._stopping.wait(5.0)
        self._shutdown()

    def _step(self, now: float) -> None:
        if now >= self._next_rescan:
            self._next_rescan = now + self.config.watch.rescan_interval
            self._scan(None)
        self._claim_ready(now)
        self._dispatch(now)
        self._tend(now)

    def request_stop(self) -> None:
        self._stopping.set()
        self._events.put(("stop", None))

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def _wait_for_events(self, timeout_s: float) -> None:
        try:
            item = self._events.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return
        self._handle(item)
        while True:
            try:
                self._handle(self._events.get_nowait())
            except queue.Empty:
                return

    def _handle(self, item: tuple[str, object]) -> None:
        kind, payload = item
        if kind == "file":
            self._observe(str(payload))
        elif kind == "dir":
            if os.path.isdir(str(payload)) and not os.path.islink(str(payload)):
                self._scan(str(payload))
        elif kind == "rescan":
            self._next_rescan = 0.0
        elif kind == "done":
            self._inflight.pop(int(payload), None)  # type: ignore[call-overload]
        elif kind == "reconciled":
            self._reconciling = False

    def _seconds_until_next(self) -> float:
        assert self.journal
        now = self.clock()
        times = [self._next_rescan, now + MAX_SLEEP_S, self._next_watchdog, self._next_status]
        if self.tunnel:
            times.append(self._next_tunnel_check)
        if self._due:
            times.append(self._due[0][0])
        busy = set(self._inflight)
        if self._free("upload") > 0:
            assert self.pipeline
            due = self.journal.next_due_at([State.CLAIMED], busy)
            if due is not None:
                times.append(max(due, self.pipeline.breaker.paused_until))
        if self._free("results") > 0:
            times.append(self.journal.next_due_at(RESULT_STATES, busy) or float("inf"))
            if not self._reconciling:
                times.append(self.journal.next_due_at([State.UPLOADING], busy) or float("inf"))
        return min(times) - now

    # -- candidates: seen -> stable -> claimed ----------------------------------------------------

    def _scan(self, top: str | None) -> None:
        assert self.watcher
        for path in self.watcher.scan(top):
            self._observe(path)

    def _observe(self, path: str) -> None:
        """A fresh look at a candidate: (re)start its settle clock if it changed."""
        now = self.clock()
        try:
            st = os.lstat(path)
        except OSError:
            self._candidates.pop(path, None)  # gone (claimed, renamed away, deleted)
            return
        if stat.S_ISDIR(st.st_mode):
            self._scan(path)
            return
        if not stat.S_ISREG(st.st_mode):
            obs = readiness.Observation(st.st_size, st.st_mtime_ns, now - 1e9)  # never read: claim at once
        else:
            obs = readiness.observe(self._candidates.get(path), st.st_size, st.st_mtime_ns, now)
        if self._candidates.get(path) is not obs:
            self._candidates[path] = obs
            w = self.config.watch
            heapq.heappush(self._due, (readiness.ready_at(obs, w.settle_seconds, w.incomplete_grace_seconds), path))

    def _claim_ready(self, now: float) -> None:
        assert self.pipeline
        w = self.config.watch
        ready: list[str] = []
        while self._due and self._due[0][0] <= now and len(ready) < CLAIM_BATCH:
            _, path = heapq.heappop(self._due)
            obs = self._candidates.get(path)
            if obs is None or not readiness.is_ready(obs, now, w.settle_seconds, w.incomplete_grace_seconds):
                continue  # stale heap entry; a newer one is queued
            fresh = self._recheck(path, obs, now)
            if fresh is obs:
                ready.append(path)
                del self._candidates[path]
        if ready:
            assert self.watcher
            inbox = self.watcher.keep.inbox
            self.pipeline.claim([os.fsencode(os.path.relpath(p, inbox)) for p in ready])
        if self._due and self._due[0][0] <= now:
            self._events.put(("wake", None))  # more than one batch is ready

    def _recheck(self, path: str, obs: readiness.Observation, now: float) -> readiness.Observation | None:
        """Stat once more at claim time; a PDF must also end with %%EOF (or wait out the grace)."""
        try:
            st = os.lstat(path)
        except OSError:
            self._candidates.pop(path, None)
            return None
        parent = os.path.dirname(path)
        if os.path.realpath(parent) != parent:  # a folder on the way was swapped for a symlink
            log.warning("%s: a folder in its path is a symbolic link; not followed", path)
            self._candidates.pop(path, None)
            return None
        if stat.S_ISDIR(st.st_mode):  # a folder took the file's place
            self._candidates.pop(path, None)
            self._scan(path)
            return None
        if not stat.S_ISREG(st.st_mode):
            return obs
        if (st.st_size, st.st_mtime_ns) != (obs.size, obs.mtime_ns):
            self._observe(path)
            return None
        w = self.config.watch
        if obs.looks_complete and obs.size > 0 and not _looks_complete(path, st.st_size):
            marked = readiness.Observation(obs.size, obs.mtime_ns, obs.since, looks_complete=False)
            self._candidates[path] = marked
            heapq.heappush(self._due, (readiness.ready_at(marked, w.settle_seconds, w.incomplete_grace_seconds), path))
            return None
        return obs

    # -- dispatching due journal rows to the pools -----------------------------------------------

    def _free(self, pool: str) -> int:
        if pool == "upload":
            assert self.pipeline
            size = self.pipeline.breaker.allowed_in_flight(self.config.upload.concurrency)
        else:  # a reconciliation pass holds one results worker, whatever the number of its rows
            size = self.config.results.workers - (1 if self._reconciling else 0)
        return size - sum(1 for p in self._inflight.values() if p == pool)

    def _dispatch(self, now: float) -> None:
        assert self.journal and self.pipeline
        p = self.pipeline
        free = self._free("upload")
        if free > 0 and now >= p.breaker.paused_until:
            for row in self.journal.runnable([State.CLAIMED], now, self._inflight, free):
                self._submit("upload", p.upload, row)
        free = self._free("results")
        if free > 0 and not self._reconciling:
            due = self.journal.runnable([State.UPLOADING], now, self._inflight, 200)
            if due:
                self._reconciling = True
                for row in due:
                    self._inflight[row.id] = "reconcile"
                assert self._results
                future = self._results.submit(self._guard, p.reconcile, due)
                future.add_done_callback(lambda _f, ids=[r.id for r in due]: self._reconciled(ids))
                free -= 1
        if free > 0:
            steps = {State.UPLOADED: p.check_result, State.EXPORTING: p.export, State.FAILING: p.finish_failed}
            for row in self.journal.runnable(RESULT_STATES, now, self._inflight, free):
                self._submit("results", steps[row.state], row)

    def _submit(self, pool: str, step: Callable[[Row], Row], row: Row) -> None:
        self._inflight[row.id] = pool
        executor = self._uploads if pool == "upload" else self._results
        assert executor
        future: Future = executor.submit(self._guard, step, row)
        future.add_done_callback(lambda _f, row_id=row.id: self._events.put(("done", row_id)))

    def _reconciled(self, ids: list[int]) -> None:
        for row_id in ids:
            self._events.put(("done", row_id))
        self._events.put(("reconciled", None))

    def _guard(self, step: Callable, arg: object) -> object:
        """A bug in a step must not kill the daemon or spin: log it and look again later."""
        try:
            return step(arg)
        except Exception:
            rows = arg if isinstance(arg, list) else [arg]
            log.exception("unexpected error in %s for %s", getattr(step, "__name__", step),
                          ", ".join(r.display_path for r in rows))
            assert self.journal
            self.journal.update_many([r.id for r in rows], self.clock(), next_at=self.clock() + 60,
                                     error="internal error; see the log")
            return None

    # -- liveness, status, tunnel ------------------------------------------------------------------

    def _tend(self, now: float) -> None:
        """Periodic duties of the loop thread. WATCHDOG=1 comes from here only, so a stuck
        loop (not a slow upload on a worker) is what systemd's watchdog catches."""
        interval = self.notifier.watchdog_interval_s
        if interval and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + interval
        elif not interval:
            self._next_watchdog = now + MAX_SLEEP_S
        if now >= self._next_status:
            self._next_status = now + STATUS_EVERY_S
            line = self.status_line()
            if line != self._last_status:
                self._last_status = line
                self.notifier.status(line)
        if self.tunnel and now >= self._next_tunnel_check:
            self._next_tunnel_check = now + TUNNEL_CHECK_EVERY_S
            self._check_tunnel()

    def _check_tunnel(self) -> None:
        assert self.tunnel
        try:
            url = self.tunnel.ensure_open()
        except Exception as exc:  # keep running: uploads wait, callbacks fall back to polling
            log.error("the ngrok tunnel is down and could not be reopened: %s", exc)
            return
        if url != self.public_url:
            log.warning("callbacks now arrive through %s (was %s); earlier uploads are polled", url, self.public_url)
            self.public_url = url

    def status_line(self) -> str:
        """One line for systemd's STATUS=: pending / done / failed, and the oldest pending."""
        assert self.journal
        counts = self.journal.counts()
        pending = sum(counts[s] for s in ACTIVE)
        line = f"{pending} pending, {counts[State.DONE]} done, {counts[State.FAILED]} failed"
        oldest = self.journal.oldest_active_detected_at()
        if oldest is not None:
            line += f"; oldest pending {format_age(self.clock() - oldest)}"
        return line

    def render_metrics(self) -> str:
        assert self.journal and self.pipeline
        oldest = self.journal.oldest_active_detected_at()
        snapshot = metrics.MetricsSnapshot(
            files_by_state={state.value: n for state, n in self.journal.counts().items()},
            uploads_total=self.stats.uploads,
            upload_retries_total=self.pipeline.retries["upload"],
            fetch_retries_total=self.pipeline.retries["fetch"],
            callbacks_total=dict(self.stats.callbacks),
            callback_latency_seconds=self.stats.callback_latency.snapshot(),
            oldest_pending_age_seconds=None if oldest is None else max(0.0, self.clock() - oldest),
            ready=self._ready.is_set(),
        )
        return metrics.render(snapshot)

    # -- shutdown ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop taking files, let the steps in hand finish, then close observer -> server -> tunnel -> journal."""
        log.info("stopping: %d step(s) in hand", len(self._inflight))
        self.notifier.stopping(f"stopping; {len(self._inflight)} step(s) in hand")
        self._ready.clear()
        if self.watcher:
            self.watcher.stop()
        for pool in (self._uploads, self._results):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if self.server:
            self.server.close(timeout_s=5)
        if self.tunnel:
            self.tunnel.close()
        if self._client:
            self._client.close()
        if self.journal:
            self.journal.close()
        log.info("stopped")


def _looks_complete(path: str, size: int) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True  # let validation report it
    try:
        head = os.pread(fd, 8, 0)
        tail = os.pread(fd, readiness.TAIL_BYTES, max(0, size - readiness.TAIL_BYTES))
    except OSError:
        return True
    finally:
        os.close(fd)
    return readiness.content_looks_complete(head, tail)


def run_in_thread(daemon: Daemon) -> threading.Thread:
    """Start and run a daemon on a background thread (tests, demo)."""
    daemon.start()
    thread = threading.Thread(target=daemon.run, name="konfuzio-watch-loop")
    thread.start()
    return thread

