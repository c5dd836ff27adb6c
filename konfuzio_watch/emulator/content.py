"""What the emulator "reads" from a file: page count, page sizes, OCR text and character bboxes.

All of it is a pure function of the uploaded bytes and file name, so tests can recompute it.
"""

from __future__ import annotations

import hashlib
import re
import struct

FAIL_MARKER = b"KONFUZIO-EMULATOR-FAIL"
PDF_PAGE_SIZE = (595, 842)
DEFAULT_PAGE_SIZE = (1000, 1000)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_LINE_BREAKS = {ord(c): " " for c in "\f\n\r\v"}
_WORDS = (
    "invoice", "total", "amount", "due", "date", "customer", "order", "net",
    "tax", "payment", "account", "reference", "delivery", "address", "item", "quantity",
)  # fmt: skip


def is_pdf(data: bytes) -> bool:
    """True for PDF bytes (the SDK also accepts junk before ``%PDF``)."""
    return b"%PDF" in data[:1024]


def count_pages(data: bytes) -> int:
    """PDF: number of ``/Type /Page`` objects (at least 1); anything else: 1."""
    if is_pdf(data):
        return max(1, len(_PDF_PAGE.findall(data)))
    return 1


def page_size(data: bytes) -> tuple[int, int]:
    """Page size: PDF -> A4 points; PNG -> pixel size from IHDR; else 1000 x 1000."""
    if is_pdf(data):
        return PDF_PAGE_SIZE
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        if width and height:
            return width, height
    return DEFAULT_PAGE_SIZE


def page_texts(data: bytes, data_file_name: str) -> list[str]:
    """One text per page: file name, "page i of n", the sha256 of the bytes, two filler lines."""
    digest = hashlib.sha256(data).hexdigest()
    name = data_file_name.translate(_LINE_BREAKS) or "unnamed"
    pages = count_pages(data)
    return [
        "\n".join([name, f"page {i} of {pages}", f"sha256 {digest}", *_filler(digest, i)]) for i in range(1, pages + 1)
    ]


def ocr_text_for(data: bytes, data_file_name: str) -> str:
    """The OCR text the emulator reports for these bytes: pages joined by form feed."""
    return "\f".join(page_texts(data, data_file_name))


def _filler(digest: str, page: int) -> list[str]:
    seed = hashlib.sha256(f"{digest}:{page}".encode()).digest()
    words = " ".join(_WORDS[b % len(_WORDS)] for b in seed[:6])
    number = int.from_bytes(seed[6:9], "big")
    day, month, year = seed[9] % 28 + 1, seed[10] % 12 + 1, 2000 + seed[11] % 30
    return [words, f"{_WORDS[seed[12] % len(_WORDS)]} {number:08d} {day:02d}.{month:02d}.{year}"]


def bbox_for(text: str, sizes: list[tuple[int, int]]) -> dict[str, dict]:
    """Character bboxes keyed by index into ``text``, one per non-whitespace character.

    Fixed-pitch layout per page, scaled so every line fits inside the page.
    """
    boxes: dict[str, dict] = {}
    offset = 0
    for number, page_text in enumerate(text.split("\f"), start=1):
        width, height = sizes[min(number, len(sizes)) - 1]
        boxes.update(_page_boxes(page_text, offset, number, width, height))
        offset += len(page_text) + 1  # the form feed
    return boxes


def _page_boxes(page_text: str, offset: int, number: int, width: int, height: int) -> dict[str, dict]:
    lines = page_text.split("\n")
    margin = min(36.0, width * 0.05, height * 0.05)
    char_w = min(6.0, (width - 2 * margin) / max(1, max(len(line) for line in lines)))
    line_h = min(14.0, (height - 2 * margin) / len(lines))
    boxes: dict[str, dict] = {}
    index = offset
    for line_number, line in enumerate(lines, start=1):
        y1 = height - margin - (line_number - 1) * line_h
        y0 = y1 - line_h * 0.8
        for column, char in enumerate(line):
            if not char.isspace():
                x0 = margin + column * char_w
                boxes[str(index + column)] = _char_box(char, x0, x0 + char_w, y0, y1, height, number, line_number)
        index += len(line) + 1  # the newline
    return boxes


def _char_box(char: str, x0: float, x1: float, y0: float, y1: float, height: int, page: int, line: int) -> dict:
    return {
        "x0": round(x0, 3),
        "x1": round(x1, 3),
        "y0": round(y0, 3),
        "y1": round(y1, 3),
        "top": round(height - y1, 3),
        "bottom": round(height - y0, 3),
        "page_number": page,
        "line_number": line,
        "text": char,
        "font_size": round((y1 - y0), 3),
        "font_name": "EmulatedMono",
    }
