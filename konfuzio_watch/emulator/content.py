"""What the emulator "reads" from a file: page count, page sizes, OCR text, fields and character bboxes.

All of it is a pure function of the uploaded bytes and file name, so tests can recompute it. The
bytes are read once, as a stream (``scan``), so a 100 MB upload is never held in memory for this.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

FAIL_MARKER = b"KONFUZIO-EMULATOR-FAIL"
SPLIT_MARKER = b"KONFUZIO-EMULATOR-SPLIT"  # processing stops at status 41 until the split is confirmed
NO_CATEGORY_MARKER = b"KONFUZIO-EMULATOR-NO-CATEGORY"  # categorization finds no category
MARKERS = (FAIL_MARKER, SPLIT_MARKER, NO_CATEGORY_MARKER)
PDF_PAGE_SIZE = (595, 842)
DEFAULT_PAGE_SIZE = (1000, 1000)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEAD_BYTES = 1024  # enough for the PDF signature (the SDK accepts junk before it) and a PNG header
_OVERLAP = 1024  # bytes kept between chunks so a page object or marker split across them is found once

_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_LINE_BREAKS = {ord(c): " " for c in "\f\n\r\v"}
_WORDS = (
    "invoice",
    "total",
    "amount",
    "due",
    "date",
    "customer",
    "order",
    "net",
    "tax",
    "payment",
    "account",
    "reference",
    "delivery",
    "address",
    "item",
    "quantity",
)
_ITEMS = ("consulting", "delivery", "licence", "support", "hardware", "training", "travel", "maintenance")
_FIRMS = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne")
_TRADES = ("Widgets", "Logistics", "Software", "Trading", "Consulting", "Industries", "Services", "Supplies")
# What a document "is", from its content: the categorization the emulator's AI will find.
KINDS = ("invoice", "invoice", "invoice", "invoice", "receipt", "receipt", "letter", "letter")
TITLES = {"invoice": "INVOICE", "receipt": "RECEIPT", "letter": "LETTER", "unknown": "NOTE"}


@dataclass(frozen=True)
class FileFacts:
    """Everything the emulator needs to know about an uploaded file, gathered in one streaming pass."""

    sha256: str
    size: int
    pages: int
    page_size: tuple[int, int]
    is_pdf: bool
    markers: frozenset[bytes] = frozenset()
    media_type: str = "application/octet-stream"


class Scanner:
    """Feed chunks with ``update``; ``facts()`` at the end. Memory: one chunk plus ``_OVERLAP``."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._size = 0
        self._head = b""
        self._tail = b""
        self._page_objects = 0
        self._markers: set[bytes] = set()

    def update(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._sha.update(chunk)
        self._size += len(chunk)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        buffer = self._tail + chunk
        self._count(buffer, final=False)
        self._tail = buffer[-_OVERLAP:]

    def _count(self, buffer: bytes, final: bool) -> None:
        # Each match is counted in the pass where its start lies in the first len - _OVERLAP bytes
        # (or anywhere, in the last pass): every position is "owned" by exactly one pass.
        limit = len(buffer) if final else len(buffer) - _OVERLAP
        self._page_objects += sum(1 for m in _PDF_PAGE.finditer(buffer) if m.start() < limit)
        for marker in MARKERS:
            if marker in buffer:
                self._markers.add(marker)

    def facts(self) -> FileFacts:
        self._count(self._tail, final=True)  # the tail holds exactly the bytes no pass owned yet
        head = self._head
        pdf = b"%PDF" in head
        return FileFacts(
            sha256=self._sha.hexdigest(),
            size=self._size,
            pages=max(1, self._page_objects) if pdf else 1,
            page_size=_page_size(head, pdf),
            is_pdf=pdf,
            markers=frozenset(self._markers),
            media_type=_media_type(head, pdf),
        )


def scan(chunks: Iterable[bytes]) -> FileFacts:
    scanner = Scanner()
    for chunk in chunks:
        scanner.update(chunk)
    return scanner.facts()


def facts_of(data: bytes) -> FileFacts:
    return scan([data])


def is_pdf(data: bytes) -> bool:
    """True for PDF bytes (the SDK also accepts junk before ``%PDF``)."""
    return b"%PDF" in data[:HEAD_BYTES]


def count_pages(data: bytes) -> int:
    """PDF: number of ``/Type /Page`` objects (at least 1); anything else: 1."""
    return facts_of(data).pages


def page_size(data: bytes) -> tuple[int, int]:
    """Page size: PDF -> A4 points; PNG -> pixel size from IHDR; else 1000 x 1000."""
    return _page_size(data[:HEAD_BYTES], is_pdf(data))


def _page_size(head: bytes, pdf: bool) -> tuple[int, int]:
    if pdf:
        return PDF_PAGE_SIZE
    if head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        if width and height:
            return width, height
    return DEFAULT_PAGE_SIZE


def _media_type(head: bytes, pdf: bool) -> str:
    if pdf:
        return "application/pdf"
    if head.startswith(PNG_SIGNATURE):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return "application/octet-stream"


# -- the text: lines per page, with the values an extraction AI would find ----------------------


@dataclass(frozen=True)
class Field:
    """A value printed in the OCR text: ``text[start:end] == value``; ``group`` 0 is the header,
    1..n the line items."""

    key: str  # invoice_number, date, sender, iban, description, amount, total
    value: str
    normalized: str | float
    start: int
    end: int
    group: int = 0


@dataclass(frozen=True)
class Layout:
    """The OCR text of a file and where each field sits in it."""

    text: str
    kind: str  # invoice, receipt, letter or unknown (what categorization will find)
    fields: tuple[Field, ...]


def kind_of(facts: FileFacts) -> str:
    """What the document is, from its content: NO_CATEGORY_MARKER -> "unknown"; else from its sha256."""
    if NO_CATEGORY_MARKER in facts.markers:
        return "unknown"
    return KINDS[int(facts.sha256[-2:], 16) % len(KINDS)]


def layout_for(facts: FileFacts, data_file_name: str) -> Layout:
    """The OCR text (pages joined by form feed) and its fields. Every page starts with the file name,
    "page i of n" and the sha256 of the bytes; page 1 carries the header fields, the last page the
    line items and the total."""
    digest = facts.sha256
    kind = kind_of(facts)
    values = _values(digest, kind)
    name = data_file_name.translate(_LINE_BREAKS) or "unnamed"
    builder = _TextBuilder()
    for number in range(1, facts.pages + 1):
        if number > 1:
            builder.page_break()
        builder.line(name)
        builder.line(f"page {number} of {facts.pages}")
        builder.line(f"sha256 {digest}")
        if number == 1:
            builder.line(TITLES[kind])
            _header_lines(builder, kind, values)
        if number == facts.pages:
            _item_lines(builder, kind, values)
        for filler in _filler(digest, number):
            builder.line(filler)
    return Layout(text=builder.text(), kind=kind, fields=tuple(builder.fields))


def _header_lines(builder: _TextBuilder, kind: str, values: dict) -> None:
    if kind == "invoice":
        builder.line("Invoice No. ", ("invoice_number", values["invoice_number"], values["invoice_number"]))
    builder.line("Date ", ("date", values["date"], values["date_iso"]))
    if kind != "unknown":
        builder.line("From ", ("sender", values["sender"], values["sender"]))
    if kind == "invoice":
        for iban in values["ibans"]:
            builder.line("IBAN ", ("iban", iban, iban))


def _item_lines(builder: _TextBuilder, kind: str, values: dict) -> None:
    if kind not in ("invoice", "receipt"):
        return
    for group, (description, amount, normalized) in enumerate(values["items"], start=1):
        builder.line(
            "Item ", ("description", description, description), " ", ("amount", amount, normalized), group=group
        )
    builder.line("Total ", ("total", values["total"], values["total_normalized"]), " EUR")


class _TextBuilder:
    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self.fields: list[Field] = []

    def line(self, *pieces: str | tuple[str, str, str | float], group: int = 0) -> None:
        if self._parts and not self._parts[-1].endswith("\f"):
            self._append("\n")
        for piece in pieces:
            if isinstance(piece, str):
                self._append(piece)
            else:
                key, value, normalized = piece
                self.fields.append(Field(key, value, normalized, self._length, self._length + len(value), group))
                self._append(value)

    def page_break(self) -> None:
        self._append("\f")

    def _append(self, piece: str) -> None:
        self._parts.append(piece)
        self._length += len(piece)

    def text(self) -> str:
        return "".join(self._parts)


def _values(digest: str, kind: str) -> dict:
    seed = hashlib.sha256(f"fields:{digest}".encode()).digest()
    day, month, year = seed[0] % 28 + 1, seed[1] % 12 + 1, 2015 + seed[2] % 12
    items = []
    for k in range(1 + seed[3] % 3):
        cents = 1000 + int.from_bytes(seed[4 + 2 * k : 6 + 2 * k], "big") * 7 % 99000
        items.append((_ITEMS[seed[10 + k] % len(_ITEMS)], german_amount(cents), cents / 100))
    total_cents = sum(round(normalized * 100) for _, _, normalized in items)
    ibans = [iban_from(int.from_bytes(seed[13:21], "big"))]
    if kind == "invoice" and seed[21] % 2:  # some invoices name two accounts: one label, two values
        ibans.append(iban_from(int.from_bytes(seed[22:30], "big")))
    return {
        "invoice_number": f"INV-{digest[:8].upper()}",
        "date": f"{day:02d}.{month:02d}.{year}",
        "date_iso": f"{year}-{month:02d}-{day:02d}",
        "sender": f"{_FIRMS[seed[30] % len(_FIRMS)]} {_TRADES[seed[31] % len(_TRADES)]} GmbH",
        "ibans": ibans,
        "items": items,
        "total": german_amount(total_cents),
        "total_normalized": total_cents / 100,
    }


def german_amount(cents: int) -> str:
    """12345678 -> "123.456,78"."""
    euros, rest = divmod(cents, 100)
    return f"{euros:,}".replace(",", ".") + f",{rest:02d}"


def iban_from(number: int, country: str = "DE") -> str:
    """A German IBAN with valid check digits (ISO 13616 mod 97) for an 18-digit BBAN."""
    bban = f"{number % 10**18:018d}"
    numeric = bban + "".join(str(ord(c) - 55) for c in country) + "00"
    return f"{country}{98 - int(numeric) % 97:02d}{bban}"


def page_texts(data: bytes, data_file_name: str) -> list[str]:
    """One text per page (see ``layout_for``)."""
    return ocr_text_for(data, data_file_name).split("\f")


def ocr_text_for(data: bytes, data_file_name: str) -> str:
    """The OCR text the emulator reports for these bytes: pages joined by form feed."""
    return layout_for(facts_of(data), data_file_name).text


def _filler(digest: str, page: int) -> list[str]:
    seed = hashlib.sha256(f"{digest}:{page}".encode()).digest()
    words = " ".join(_WORDS[b % len(_WORDS)] for b in seed[:6])
    number = int.from_bytes(seed[6:9], "big")
    day, month, year = seed[9] % 28 + 1, seed[10] % 12 + 1, 2000 + seed[11] % 30
    return [words, f"{_WORDS[seed[12] % len(_WORDS)]} {number:08d} {day:02d}.{month:02d}.{year}"]


# -- geometry: one fixed-pitch layout shared by the bbox endpoint, annotations and the PDF --------


@dataclass(frozen=True)
class PageGeometry:
    """Fixed-pitch layout of one page, scaled so every line fits inside the page."""

    number: int  # 1-based
    width: int
    height: int
    margin: float
    char_w: float
    line_h: float
    lines: tuple[str, ...]
    offset: int  # of the page's first character in the document text

    def line_box(self, line_number: int) -> tuple[float, float]:
        """(y0, y1) of a 1-based line, PDF coordinates (origin bottom left)."""
        y1 = self.height - self.margin - (line_number - 1) * self.line_h
        return y1 - self.line_h * 0.8, y1

    def x(self, column: int) -> float:
        return self.margin + column * self.char_w


def geometry(text: str, sizes: list[tuple[int, int]]) -> list[PageGeometry]:
    pages = []
    offset = 0
    for number, page_text in enumerate(text.split("\f"), start=1):
        width, height = sizes[min(number, len(sizes)) - 1]
        lines = tuple(page_text.split("\n"))
        margin = min(36.0, width * 0.05, height * 0.05)
        char_w = min(6.0, (width - 2 * margin) / max(1, max(len(line) for line in lines)))
        line_h = min(14.0, (height - 2 * margin) / len(lines))
        pages.append(PageGeometry(number, width, height, margin, char_w, line_h, lines, offset))
        offset += len(page_text) + 1  # the form feed
    return pages


def bbox_for(text: str, sizes: list[tuple[int, int]]) -> dict[str, dict]:
    """Character bboxes keyed by index into ``text``, one per non-whitespace character."""
    boxes: dict[str, dict] = {}
    for page in geometry(text, sizes):
        index = page.offset
        for line_number, line in enumerate(page.lines, start=1):
            y0, y1 = page.line_box(line_number)
            # What every box of the line shares, computed once per line (keys in the real answer's order).
            row = _line_box(y0, y1, page, line_number)
            font = {"font_size": round(y1 - y0, 3), "font_name": "EmulatedMono"}
            for column, char in enumerate(line):
                if not char.isspace():
                    x0 = page.x(column)
                    boxes[str(index + column)] = {
                        "x0": round(x0, 3),
                        "x1": round(x0 + page.char_w, 3),
                        **row,
                        "text": char,
                        **font,
                    }
            index += len(line) + 1  # the newline
    return boxes


def span_box(pages: list[PageGeometry], start: int, end: int) -> dict:
    """Where ``text[start:end]`` (on one line) sits: page index, line, x0/x1/y0/y1, top/bottom."""
    for page in pages:
        page_end = page.offset + sum(len(line) + 1 for line in page.lines)
        if page.offset <= start < page_end:
            index = page.offset
            for line_number, line in enumerate(page.lines, start=1):
                if index <= start <= index + len(line):
                    if end > index + len(line):
                        raise ValueError(f"span {start}:{end} crosses a line end")
                    y0, y1 = page.line_box(line_number)
                    return {
                        "page_index": page.number - 1,
                        "line_index": line_number - 1,
                        "x0": round(page.x(start - index), 3),
                        "x1": round(page.x(end - index), 3),
                        "y0": round(y0, 3),
                        "y1": round(y1, 3),
                        "top": round(page.height - y1, 3),
                        "bottom": round(page.height - y0, 3),
                    }
                index += len(line) + 1
    raise ValueError(f"span {start}:{end} is outside the text")


def _line_box(y0: float, y1: float, page: PageGeometry, line: int) -> dict:
    return {
        "y0": round(y0, 3),
        "y1": round(y1, 3),
        "top": round(page.height - y1, 3),
        "bottom": round(page.height - y0, 3),
        "page_number": page.number,
        "line_number": line,
    }
