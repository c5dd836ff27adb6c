"""The emulator's fault knobs and the records it keeps of what happened."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Knobs:
    """How imperfect the emulated server is. Defaults describe a perfect server.

    Fields may be changed while the emulator runs; each request reads them afresh.
    """

    upload_latency_s: float = 0.0  # sleep in POST /documents/ before storing and answering
    processing_s: float = 0.2  # simulated OCR + extraction time per document
    processing_jitter_s: float = 0.0  # uniform extra time in [0, jitter]
    callback_loss: float = 0.0  # probability a finished document's callback is never sent
    callback_duplicate: float = 0.0  # probability the callback is sent twice
    early_callback: bool = False  # finish + send the callback inside the upload POST, before its 201
    fail_rate: float = 0.0  # probability processing ends in status 111 (plus FAIL_MARKER files)
    rate_429: float = 0.0  # probability any API request answers 429 with Retry-After
    retry_after_s: int = 1
    rate_5xx: float = 0.0  # probability any API request answers 502 or 503
    outage: bool = False  # every API request answers 503; processing and callbacks go on
    stall_after_store_s: float = 0.0  # POST stores the document, then sleeps before answering
    callback_timeout_s: float = 5.0  # timeout of the emulator's own callback POSTs


@dataclass(frozen=True)
class UploadRecord:
    """One accepted upload (a stored document), in arrival order."""

    doc_id: int
    data_file_name: str
    sha256: str
    size: int
    callback_url: str | None
    project: int
    category: int | None
    received_at: float  # time.time() when stored, i.e. after the upload_latency_s sleep
    arrived_at: float | None = None  # time.time() when the request reached the API, before any sleep


@dataclass(frozen=True)
class CallbackRecord:
    """One callback POST attempt: ``status_code`` if answered, else ``error``."""

    doc_id: int
    url: str
    status_code: int | None
    error: str | None
    sent_at: float  # time.time()
