"""The emulator's fault knobs and the records it keeps of what happened."""

from __future__ import annotations

from dataclasses import dataclass, field

from konfuzio_watch.emulator.faults import FaultRule


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
    retry_after_s: int | str = 1  # int: seconds; str: sent verbatim ("999999999", an HTTP date)
    rate_5xx: float = 0.0  # probability any API request answers 502 or 503
    upload_500_rate: float = 0.0  # probability the upload handler fails before storing: 500 {"detail": "Server Error"}
    outage: bool = False  # every API request answers 503; processing and callbacks go on
    stall_after_store_s: float = 0.0  # POST stores the document, then sleeps before answering
    callback_timeout_s: float = 5.0  # timeout of the emulator's own callback POSTs
    split_rate: float = 0.0  # probability processing stops at 41 until confirm_split (plus SPLIT_MARKER files)
    uncategorized_share: float = 0.0  # share of files (chosen by sha256) that get no category (plus NO_CATEGORY_MARKER)
    fault_rules: list[FaultRule] = field(default_factory=list)  # per-endpoint faults, first match answers


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
    gateway_status: int | None = None  # the error the client got instead (FaultRule.forward_after_s)


@dataclass(frozen=True)
class DeletionRecord:
    """One ``DELETE /api/v3/documents/<id>/`` that removed a document."""

    doc_id: int
    project: int
    deleted_at: float  # time.time()


@dataclass(frozen=True)
class CallbackRecord:
    """One callback POST attempt: ``status_code`` if answered, else ``error``."""

    doc_id: int
    url: str
    status_code: int | None
    error: str | None
    sent_at: float  # time.time()
