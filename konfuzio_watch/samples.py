"""Small, valid sample documents (PDF, PNG, TIFF) for tests, benchmarks and the demo.

Standard library only. Every generator takes a ``label`` that ends up in the bytes, so
distinct labels give distinct files (and distinct sha256 digests at the emulator).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

PDF_PAGE_SIZE = (595, 842)  # A4 in PDF points


def make_pdf(pages: int = 1, label: str = "") -> bytes:
    """A minimal valid PDF with ``pages`` pages, each showing ``label`` and its page number."""
    if pages < 1:
        raise ValueError(f"pages must be >= 1, got {pages}")
    font_id, info_id, first_page_id = 3, 4, 5
    page_ids = [first_page_id + 2 * i for i in range(pages)]
    kids = " ".join(f"{pid} 0 R" for pid in page_ids)
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
        font_id: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        info_id: b"<< /Title <" + pdf_utf16_hex(label) + b"> /Producer (konfuzio-watch samples) >>",
    }
    width, height = PDF_PAGE_SIZE
    for number, page_id in enumerate(page_ids, start=1):
        objects[page_id] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> /Contents {page_id + 1} 0 R >>"
        ).encode()
        objects[page_id + 1] = pdf_stream(_pdf_page_content(label, number, pages))
    return pdf_file(objects, root_id=1, info_id=info_id)


def _pdf_page_content(label: str, number: int, pages: int) -> bytes:
    text = _pdf_escape(f"{label} - page {number} of {pages}")
    return b"BT /F1 14 Tf 72 770 Td (" + text + b") Tj ET"


def _pdf_escape(text: str) -> bytes:
    raw = text.encode("latin-1", "replace")
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def pdf_utf16_hex(text: str) -> bytes:
    return (b"\xfe\xff" + text.encode("utf-16-be")).hex().upper().encode()


def pdf_stream(content: bytes) -> bytes:
    """A PDF stream object around ``content`` (shared with the emulator's searchable PDF)."""
    return b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"


def pdf_file(objects: dict[int, bytes], root_id: int, info_id: int) -> bytes:
    """A whole PDF from numbered objects: header, body, cross-reference table, trailer, %%EOF."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for obj_id in sorted(objects):
        offsets[obj_id] = len(out)
        out += b"%d 0 obj\n" % obj_id + objects[obj_id] + b"\nendobj\n"
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for obj_id in range(1, size):
        out += b"%010d 00000 n \n" % offsets[obj_id]
    out += b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R >>\n" % (size, root_id, info_id)
    out += b"startxref\n%d\n%%%%EOF\n" % xref_at
    return bytes(out)


def make_png(width: int = 64, height: int = 48, label: str = "") -> bytes:
    """A valid RGB PNG whose pixels and iTXt comment derive from ``label``."""
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")
    seed = hashlib.sha256(label.encode()).digest()
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type: None
        for x in range(width):
            rows += bytes(((seed[0] + x * 3) & 255, (seed[1] + y * 5) & 255, seed[2] ^ ((x + y) & 255)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    itxt = b"Comment\x00\x00\x00\x00\x00" + label.encode()
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"iTXt", itxt),
            _png_chunk(b"IDAT", zlib.compress(bytes(rows), 9)),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def make_tiff(label: str = "", width: int = 16, height: int = 16) -> bytes:
    """A valid uncompressed 8-bit greyscale TIFF (little-endian) with ``label`` as ImageDescription."""
    seed = hashlib.sha256(label.encode()).digest()
    pixels = bytes((seed[(x + y) % 32] + x * y) & 255 for y in range(height) for x in range(width))
    description = label.encode("utf-8") + b"\x00"
    entries = [  # (tag, type, count, value or offset placeholder)
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (270, 2, len(description), None),
        (273, 4, 1, None),
        (277, 3, 1, 1),
        (278, 3, 1, height),
        (279, 4, 1, len(pixels)),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    description_at = 8 + ifd_size
    pixels_at = description_at + len(description)
    ifd = bytearray(struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        if tag == 270:
            value = description_at if len(description) > 4 else int.from_bytes(description.ljust(4, b"\0"), "little")
        elif tag == 273:
            value = pixels_at
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + bytes(ifd) + description + pixels


def write_samples(folder: str | Path, count: int, start: int = 1) -> list[Path]:
    """Write ``count`` samples into ``folder``: PDFs of 1-3 pages (``scan_0001.pdf``) and PNGs
    (``photo_0002.png``), alternating. Numbering begins at ``start``; existing files are overwritten."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for number in range(start, start + count):
        if number % 2:
            path = folder / f"scan_{number:04d}.pdf"
            path.write_bytes(make_pdf(pages=1 + (number // 2) % 3, label=path.name))
        else:
            path = folder / f"photo_{number:04d}.png"
            path.write_bytes(make_png(64 + number % 32, 48, label=path.name))
        paths.append(path)
    return paths
