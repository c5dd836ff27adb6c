"""One thread that runs due jobs from a heap, and a counter of outstanding work."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Scheduler:
    """Runs ``job()`` at monotonic time ``due`` on a single thread, in due order."""

    def __init__(self, name: str = "emulator-scheduler") -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._is_stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def call_at(self, due: float, job: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), job))
            self._cond.notify()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Drop pending jobs, let the running one finish, join. False if it overran."""
        with self._cond:
            self._is_stopping = True
            self._heap.clear()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                job()
            except Exception:  # a job must never kill the scheduler
                log.exception("emulator job failed")

    def _next_job(self) -> Callable[[], None] | None:
        with self._cond:
            while not self._is_stopping:
                if self._heap:
                    wait_s = self._heap[0][0] - time.monotonic()
                    if wait_s <= 0:
                        return heapq.heappop(self._heap)[2]
                    self._cond.wait(wait_s)
                else:
                    self._cond.wait()
            return None


class WorkCounter:
    """Counts outstanding units of work; ``wait_idle`` blocks until none is left."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def begin(self) -> None:
        with self._cond:
            self._count += 1

    def end(self) -> None:
        with self._cond:
            self._count -= 1
            if self._count <= 0:
                self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count <= 0, timeout_s)
