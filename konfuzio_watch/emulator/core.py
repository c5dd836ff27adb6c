"""The Emulator: a local Konfuzio API v3 that the unmodified konfuzio-sdk talks to over HTTP.

Threads: Waitress (one loop thread + a worker pool) serves the API; ONE scheduler thread moves
documents through their statuses (and stores uploads a gateway fault forwarded late); a small
bounded pool POSTs the callbacks. ``stop()`` joins all of them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import TracebackType

import requests

from konfuzio_watch.emulator.accounting import RequestAccounting, RequestStats
from konfuzio_watch.emulator.app import create_app
from konfuzio_watch.emulator.blobs import BlobStore
from konfuzio_watch.emulator.content import FAIL_MARKER, SPLIT_MARKER
from konfuzio_watch.emulator.documents import (
    COULD_NOT_BE_PROCESSED,
    DONE,
    EXTRACTION_IN_PROGRESS,
    OCR_IN_PROGRESS,
    QUEUING_EXTRACTION,
    QUEUING_SPLITTING,
    REVIEWER,
    SEEDED_NAME,
    SPLITTING_IN_PROGRESS,
    WAITING_FOR_SPLITTING_CONFIRMATION,
    DocumentStore,
    NewDocument,
)
from konfuzio_watch.emulator.faults import FaultRule
from konfuzio_watch.emulator.forms import UploadForm
from konfuzio_watch.emulator.knobs import CallbackRecord, DeletionRecord, Knobs, UploadRecord
from konfuzio_watch.emulator.scheduler import Scheduler, WorkCounter
from konfuzio_watch.server import ServerThread

log = logging.getLogger(__name__)

# (fraction of the processing time, status) for each way processing can end
SUCCESS_STEPS = (
    (0.25, OCR_IN_PROGRESS),
    (0.5, QUEUING_EXTRACTION),
    (0.75, EXTRACTION_IN_PROGRESS),
    (1.0, DONE),
)
FAILURE_STEPS = ((0.25, OCR_IN_PROGRESS), (1.0, COULD_NOT_BE_PROCESSED))
SPLIT_STEPS = (  # stops at 41 until confirm_split(); then RESUME_STEPS
    (0.2, OCR_IN_PROGRESS),
    (0.4, QUEUING_EXTRACTION),
    (0.6, QUEUING_SPLITTING),
    (0.8, SPLITTING_IN_PROGRESS),
    (1.0, WAITING_FOR_SPLITTING_CONFIRMATION),
)
RESUME_STEPS = ((0.5, EXTRACTION_IN_PROGRESS), (1.0, DONE))  # after a split confirmation or for re-extraction
# A processing run ends at one of these; only the final ones send the callback.
END_OF_RUN = (DONE, COULD_NOT_BE_PROCESSED, WAITING_FOR_SPLITTING_CONFIRMATION)
FINAL = (DONE, COULD_NOT_BE_PROCESSED)
Steps = tuple[tuple[float, int], ...]


class Emulator:
    """A Konfuzio API stand-in. ``start()`` serves it on ``url``; ``stop()`` ends every thread."""

    def __init__(
        self,
        token: str = "secret-token",
        project_ids: Iterable[int] = (1,),
        knobs: Knobs | None = None,
        seed: int = 0,
        callback_workers: int = 4,
    ) -> None:
        self.token = token
        self.project_ids = frozenset(int(p) for p in project_ids)
        self.knobs = knobs if knobs is not None else Knobs()
        self.store = DocumentStore()
        self.blobs = BlobStore()  # the uploaded originals
        self.uploads: list[UploadRecord] = []
        self.callbacks: list[CallbackRecord] = []
        self.dropped_callbacks: list[int] = []  # doc ids whose callback callback_loss swallowed
        self.deletions: list[DeletionRecord] = []
        self.accounting = RequestAccounting()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._records_lock = threading.Lock()
        self._work = WorkCounter()
        self._is_stopping = threading.Event()
        self._scheduler = Scheduler(name="emulator-scheduler")
        self._callback_workers = callback_workers
        self._callback_pool: ThreadPoolExecutor | None = None
        self._server: ServerThread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0, threads: int = 16) -> Emulator:
        """Bind and serve in the background; returns self."""
        if self._server is not None:
            raise RuntimeError("emulator already started")
        server = ServerThread(
            create_app(self),
            host,
            port,
            name="emulator-http",
            threads=threads,
            ident="konfuzio-emulator",
            expose_tracebacks=False,
        )
        self._server = server
        self._callback_pool = ThreadPoolExecutor(self._callback_workers, thread_name_prefix="emulator-callback")
        self._scheduler.start()
        server.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop serving, drop pending processing, finish in-flight callbacks, join all threads."""
        self._is_stopping.set()  # wakes handlers sleeping for latency/stall knobs
        clean = True
        if self._server is not None:
            clean = self._server.close(timeout_s) and clean
        clean = self._scheduler.stop(timeout_s) and clean
        if self._callback_pool is not None:
            self._callback_pool.shutdown(wait=True, cancel_futures=True)
        self.blobs.close()
        return clean

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL for the SDK's host, e.g. ``http://127.0.0.1:8123`` (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("emulator not started")
        return self._server.url

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return self._server.port

    # -- inspection --------------------------------------------------------------------------

    def documents(self) -> list[dict]:
        """Copies of all stored documents' full details, ordered by id (seeded ones only once
        reviewed or re-extracted; the API lists them all)."""
        return self.store.all_details()

    def request_stats(self) -> dict[str, RequestStats]:
        """API requests answered so far by kind (upload, details, bbox, list, annotations, labels,
        label_sets, categories, project, projects, pdf, original, delete, other)."""
        return self.accounting.snapshot()

    def api_requests(self, *kinds: str) -> int:
        """How many API requests of these kinds (all kinds if none given) were answered."""
        stats = self.accounting.snapshot()
        return sum(s.count for kind, s in stats.items() if not kinds or kind in kinds)

    def reset_request_stats(self) -> None:
        self.accounting.reset()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no processing or callback is pending or in flight."""
        return self._work.wait_idle(timeout_s)

    # -- randomness --------------------------------------------------------------------------

    def chance(self, probability: float) -> bool:
        """A seeded coin toss; 0 and 1 are certain and draw nothing."""
        if probability <= 0:
            return False
        if probability >= 1:
            return True
        with self._rng_lock:
            return self._rng.random() < probability

    def _uniform(self, high: float) -> float:
        if high <= 0:
            return 0.0
        with self._rng_lock:
            return self._rng.uniform(0.0, high)

    # -- uploads and processing --------------------------------------------------------------

    def accept_upload(self, upload: UploadForm, arrived_at: float | None = None) -> dict:
        """Store a validated upload and start its processing; return the 201 body.

        ``arrived_at`` (``time.time()``) is when the request reached the API; default: now. The
        handler goes on after its client gave up (a timeout during ``upload_latency_s``): the
        document is stored all the same, as a real server does.
        """
        arrived_at = time.time() if arrived_at is None else arrived_at
        knobs = self.knobs
        self._is_stopping.wait(knobs.upload_latency_s)
        details = self._store(upload, arrived_at)
        self._is_stopping.wait(knobs.stall_after_store_s)
        return details

    def forward_upload(self, upload: UploadForm, rule: FaultRule, arrived_at: float) -> None:
        """A gateway answered ``rule.status`` already; the app stores the upload
        ``rule.forward_after_s`` later anyway, with the callback URL it carried. At 0 it is stored
        before the error is answered: an app whose handler stored the file, then failed (a 500)."""
        if not rule.forward_after_s:
            self._store(upload, arrived_at, gateway_status=rule.status)
            return
        self._work.begin()

        def store_late() -> None:
            try:
                self._store(upload, arrived_at, gateway_status=rule.status)
            finally:
                self._work.end()

        self._scheduler.call_at(time.monotonic() + max(0.0, rule.forward_after_s or 0.0), store_late)

    def _store(self, upload: UploadForm, arrived_at: float, gateway_status: int | None = None) -> dict:
        new = upload.document
        steps = self._plan(new)
        doc_id, details = self.store.create(new, steps[-1][1])
        self._record_upload(doc_id, new, arrived_at, gateway_status)
        if upload.is_sync:
            details = self._process_now(doc_id, steps, is_callback_inline=False)
        elif self.knobs.early_callback and gateway_status is None:  # (a late store has no response to beat)
            self._process_now(doc_id, steps, is_callback_inline=True)
        else:
            self._schedule(doc_id, steps, self._processing_time())
        return details

    def _plan(self, new: NewDocument) -> Steps:
        if FAIL_MARKER in new.facts.markers or self.chance(self.knobs.fail_rate):
            return FAILURE_STEPS
        if SPLIT_MARKER in new.facts.markers or self.chance(self.knobs.split_rate):
            return SPLIT_STEPS
        return SUCCESS_STEPS

    def _record_upload(self, doc_id: int, new: NewDocument, arrived_at: float, gateway_status: int | None) -> None:
        record = UploadRecord(
            doc_id=doc_id,
            data_file_name=new.data_file_name,
            sha256=new.facts.sha256,
            size=new.facts.size,
            callback_url=new.callback_url,
            project=new.project,
            category=new.category,
            received_at=time.time(),
            arrived_at=arrived_at,
            gateway_status=gateway_status,
        )
        with self._records_lock:
            self.uploads.append(record)

    def _processing_time(self) -> float:
        return max(0.0, self.knobs.processing_s) + self._uniform(self.knobs.processing_jitter_s)

    def _schedule(self, doc_id: int, steps: Steps, duration_s: float) -> None:
        started = time.monotonic()
        self._work.begin()
        for fraction, status in steps:
            self._scheduler.call_at(started + duration_s * fraction, partial(self._advance, doc_id, status))

    def _advance(self, doc_id: int, status: int) -> None:
        """Scheduler job: one status step; at the end of a run, hand over the callback."""
        details = self.store.advance(doc_id, status, self.knobs.uncategorized_share, deep=False)  # callback_url
        if status in END_OF_RUN:
            try:
                if details is not None and status in FINAL:
                    self._finish(doc_id, details, is_callback_inline=False)
            finally:
                self._work.end()

    def _process_now(self, doc_id: int, steps: Steps, is_callback_inline: bool) -> dict:
        self._work.begin()
        try:
            details: dict = {}
            for _, status in steps:
                details = self.store.advance(doc_id, status, self.knobs.uncategorized_share) or details
            if details.get("status_data") in FINAL:
                self._finish(doc_id, details, is_callback_inline)
            return details
        finally:
            self._work.end()

    # -- what people do in the web app -------------------------------------------------------

    def review(
        self,
        doc_id: int,
        changes: dict[int | str, str] | None = None,
        category: int | None = None,
        reviewer: str = REVIEWER,
    ) -> dict:
        """Mark a done document reviewed (every annotation accepted: ``revised``/``is_correct``),
        correct ``changes`` (label name or id -> new value, on that label's first annotation),
        optionally change its ``category`` (re-extracting for it); ``updated_at`` moves and the
        callback is sent again. Raises KeyError (unknown id), NotAllowed (not done), ValueError."""
        details = self.store.review(doc_id, changes, category, reviewer)
        if details is None:
            raise KeyError(doc_id)
        self._finish(doc_id, details, is_callback_inline=False)
        return details

    def reextract(self, doc_id: int, duration_s: float | None = None) -> dict:
        """Run extraction again on a done document: status 1, 20, then 2 with new annotation ids and
        confidences (revised annotations are kept), then the callback again. ``duration_s``
        defaults to half of ``processing_s``. Returns the details in status 1."""
        details = self.store.begin_reextraction(doc_id)
        if details is None:
            raise KeyError(doc_id)
        self._schedule(doc_id, RESUME_STEPS, self.knobs.processing_s / 2 if duration_s is None else duration_s)
        return details

    def confirm_split(self, doc_id: int) -> dict:
        """Confirm the proposed split of a document waiting in status 41: extraction runs (half of
        ``processing_s``), it ends done and the callback is sent."""
        details = self.store.confirm_split(doc_id)
        if details is None:
            raise KeyError(doc_id)
        self._schedule(doc_id, RESUME_STEPS, self.knobs.processing_s / 2)
        return details

    def delete_document(self, doc_id: int) -> bool:
        """What ``DELETE /api/v3/documents/<id>/`` does; False if there is no such document."""
        details = self.store.delete(doc_id)
        if details is None:
            return False
        with self._records_lock:
            self.deletions.append(DeletionRecord(doc_id, details["project"], time.time()))
        return True

    def seed_documents(
        self, project_id: int, count: int, *, callback_url: str | None = None, name: str = SEEDED_NAME
    ) -> range:
        """Add ``count`` done documents to a project at once (50,000 in milliseconds, a few MB):
        for reconciliation and listing at scale. ``callback_url`` and ``name`` may hold ``{id}``.
        Returns their ids; the API serves them like uploaded ones (details, bbox, annotations,
        files), ``uploads`` and ``documents()`` do not show them."""
        if project_id not in self.project_ids:
            raise ValueError(f"unknown project {project_id}")
        return self.store.seed(
            project_id, count, callback_url=callback_url, name=name, uncategorized_share=self.knobs.uncategorized_share
        )

    # -- callbacks ---------------------------------------------------------------------------

    def _finish(self, doc_id: int, details: dict, is_callback_inline: bool) -> None:
        url = details.get("callback_url")
        if not url or self._is_stopping.is_set():
            return
        if self.chance(self.knobs.callback_loss):
            with self._records_lock:
                self.dropped_callbacks.append(doc_id)
            return
        times = 2 if self.chance(self.knobs.callback_duplicate) else 1
        if is_callback_inline:
            self._send_callbacks(doc_id, url, times)
            return
        self._work.begin()
        try:
            assert self._callback_pool is not None
            self._callback_pool.submit(self._send_callbacks_then_end, doc_id, url, times)
        except RuntimeError:  # the pool is shut down: we are stopping
            self._work.end()

    def _send_callbacks_then_end(self, doc_id: int, url: str, times: int) -> None:
        try:
            self._send_callbacks(doc_id, url, times)
        finally:
            self._work.end()

    def _send_callbacks(self, doc_id: int, url: str, times: int) -> None:
        for _ in range(times):
            if self._is_stopping.is_set():
                return
            self._send_callback(doc_id, url)

    def _send_callback(self, doc_id: int, url: str) -> None:
        """POST the current details as JSON; record the answer or the error, never raise."""
        body = self.store.details_json(doc_id)
        if body is None:  # deleted meanwhile
            return
        status_code: int | None = None
        error: str | None = None
        sent_at = time.time()
        try:
            with requests.Session() as session:
                session.trust_env = False  # never route loopback callbacks through a proxy
                response = session.post(
                    url, data=body, headers={"Content-Type": "application/json"}, timeout=self.knobs.callback_timeout_s
                )
            status_code = response.status_code
            self.store.record_callback_status(doc_id, status_code)
        except Exception as exc:  # unreachable, timeout, bad URL: record it, carry on
            error = f"{type(exc).__name__}: {exc}"
            log.info("callback for document %s to %s failed: %s", doc_id, url, error)
        with self._records_lock:
            self.callbacks.append(CallbackRecord(doc_id, url, status_code, error, sent_at))
