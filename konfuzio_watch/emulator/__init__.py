"""A local Konfuzio REST API v3 emulator for tests, benchmarks and the demo.

Start one with ``Emulator(token=..., project_ids=(1,), knobs=Knobs(...)).start()`` (also a context
manager) and point the SDK at it: ``konfuzio_session(token, host=emu.url)``.

Every processed document gets a category and annotations (see ``schema`` and ``extraction``),
its searchable PDF and original at ``/doc/show/<id>/`` and ``/doc/show-original/<id>/``.
``Emulator.review``, ``reextract``, ``confirm_split``, ``seed_documents`` and the ``/emulator/``
control endpoints (``control``) play the people and the history of a real project.
"""

from konfuzio_watch.emulator.content import (
    FAIL_MARKER,
    NO_CATEGORY_MARKER,
    SPLIT_MARKER,
    count_pages,
    ocr_text_for,
    page_size,
)
from konfuzio_watch.emulator.core import Emulator
from konfuzio_watch.emulator.documents import NotAllowed
from konfuzio_watch.emulator.faults import FaultRule
from konfuzio_watch.emulator.knobs import CallbackRecord, DeletionRecord, Knobs, UploadRecord

__all__ = [
    "FAIL_MARKER",
    "NO_CATEGORY_MARKER",
    "SPLIT_MARKER",
    "CallbackRecord",
    "DeletionRecord",
    "Emulator",
    "FaultRule",
    "Knobs",
    "NotAllowed",
    "UploadRecord",
    "count_pages",
    "ocr_text_for",
    "page_size",
]
