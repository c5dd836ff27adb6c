"""A local Konfuzio REST API v3 emulator for tests, benchmarks and the demo.

Start one with ``Emulator(token=..., project_ids=(1,), knobs=Knobs(...)).start()`` (also a context
manager) and point the SDK at it: ``konfuzio_session(token, host=emu.url)``.
"""

from konfuzio_watch.emulator.content import FAIL_MARKER, count_pages, ocr_text_for, page_size
from konfuzio_watch.emulator.core import Emulator
from konfuzio_watch.emulator.knobs import CallbackRecord, Knobs, UploadRecord

__all__ = [
    "FAIL_MARKER",
    "CallbackRecord",
    "Emulator",
    "Knobs",
    "UploadRecord",
    "count_pages",
    "ocr_text_for",
    "page_size",
]
