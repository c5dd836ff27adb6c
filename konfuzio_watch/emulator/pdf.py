"""The searchable PDF of ``GET /doc/show/<id>/``: one page per OCR page, the OCR text as its text layer.

Written by hand (no PDF library): each line is drawn in Courier at the same fixed-pitch positions
the bbox endpoint reports, so a text extractor (pdftotext, pypdf) reads back the OCR text, page by
page. Characters WinAnsiEncoding has are drawn with the standard Courier encoding; any others go
through extra fonts with custom encodings. Every font has a ToUnicode CMap, so extraction never
depends on guessing glyph names.
"""

from __future__ import annotations

from konfuzio_watch.emulator.content import PageGeometry, geometry
from konfuzio_watch.samples import pdf_file, pdf_stream

ADVANCE = 600  # Courier: every glyph is 600/1000 em wide
_WIN_ANSI_GAPS = {0x81, 0x8D, 0x8F, 0x90, 0x9D}  # bytes cp1252 leaves undefined


def searchable_pdf(text: str, sizes: list[tuple[int, int]], title: str = "") -> bytes:
    """A valid PDF whose text layer is ``text`` (pages split at form feeds)."""
    pages = geometry(text, sizes)
    fonts = _Fonts(text)
    objects: dict[int, bytes] = {1: b"", 2: b""}  # catalog and page tree, filled in below
    font_refs = {}
    for name, font in fonts.fonts.items():
        cmap_id = len(objects) + 1
        objects[cmap_id] = pdf_stream(_to_unicode(font.to_unicode))
        font_id = len(objects) + 1
        objects[font_id] = font.dictionary(cmap_id)
        font_refs[name] = font_id
    resources = b"<< /Font << " + b" ".join(b"/%s %d 0 R" % (n.encode(), i) for n, i in font_refs.items()) + b" >> >>"
    page_ids = []
    for page in pages:
        content_id = len(objects) + 1
        objects[content_id] = pdf_stream(_page_content(page, fonts))
        page_id = len(objects) + 1
        objects[page_id] = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources %s /Contents %d 0 R >>" % (
            page.width,
            page.height,
            resources,
            content_id,
        )
        page_ids.append(page_id)
    objects[1] = b"<< /Type /Catalog /Pages 2 0 R >>"
    kids = b" ".join(b"%d 0 R" % i for i in page_ids)
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(page_ids))
    info_id = len(objects) + 1
    objects[info_id] = b"<< /Title <%s> /Producer (konfuzio-emulator) >>" % _utf16_hex(title)
    return pdf_file(objects, root_id=1, info_id=info_id)


class _Font:
    def __init__(self, name: str, standard: bool) -> None:
        self.name = name
        self.standard = standard  # WinAnsiEncoding; else custom codes 1..255 via /Differences
        self.to_unicode: dict[int, str] = {}

    def dictionary(self, cmap_id: int) -> bytes:
        first, last = (min(self.to_unicode), max(self.to_unicode)) if self.to_unicode else (32, 32)
        widths = b" ".join(b"%d" % ADVANCE for _ in range(first, last + 1))
        if self.standard:
            encoding = b"/WinAnsiEncoding"
        else:
            names = b" ".join(b"/%s" % _glyph_name(self.to_unicode[c]).encode() for c in sorted(self.to_unicode))
            encoding = b"<< /Type /Encoding /Differences [%d %s] >>" % (min(self.to_unicode), names)
        return (
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier /Encoding %s /FirstChar %d /LastChar %d "
            b"/Widths [%s] /ToUnicode %d 0 R >>" % (encoding, first, last, widths, cmap_id)
        )


class _Fonts:
    """Assigns every character of the text a (font, code); F1 is Courier with WinAnsiEncoding."""

    def __init__(self, text: str) -> None:
        self.fonts: dict[str, _Font] = {"F1": _Font("F1", standard=True)}
        self.codes: dict[str, tuple[str, int]] = {}
        extra: _Font | None = None
        for char in sorted(set(text) - {"\n", "\f"}):
            code = _win_ansi(char)
            if code is not None:
                self.fonts["F1"].to_unicode[code] = char
                self.codes[char] = ("F1", code)
                continue
            if extra is None or len(extra.to_unicode) == 255:
                extra = _Font(f"F{len(self.fonts) + 1}", standard=False)
                self.fonts[extra.name] = extra
            code = len(extra.to_unicode) + 1  # consecutive, so /Differences needs one run
            extra.to_unicode[code] = char
            self.codes[char] = (extra.name, code)


def _win_ansi(char: str) -> int | None:
    try:
        code = char.encode("cp1252")[0]
    except UnicodeEncodeError:
        return None
    return code if code >= 32 and code not in _WIN_ANSI_GAPS else None


def _page_content(page: PageGeometry, fonts: _Fonts) -> bytes:
    size = page.line_h * 0.8
    scale = 100 * page.char_w / (size * ADVANCE / 1000)  # horizontal scaling: one glyph = one char_w
    out = [b"BT", b"%.3f Tz" % scale]
    for line_number, line in enumerate(page.lines, start=1):
        if not line:
            continue
        y0, _ = page.line_box(line_number)
        out.append(b"1 0 0 1 %.3f %.3f Tm" % (page.x(0), y0 + size * 0.2))
        current = None
        run = bytearray()
        for char in line:
            font, code = fonts.codes[char]
            if font != current:
                if run:
                    out.append(b"<%s> Tj" % run.hex().upper().encode())
                    run.clear()
                out.append(b"/%s %.3f Tf" % (font.encode(), size))
                current = font
            run.append(code)
        out.append(b"<%s> Tj" % run.hex().upper().encode())
    out.append(b"ET")
    return b"\n".join(out)


def _to_unicode(mapping: dict[int, str]) -> bytes:
    entries = sorted(mapping.items())
    blocks = []
    for start in range(0, len(entries), 100):  # at most 100 entries per bfchar block
        chunk = entries[start : start + 100]
        lines = b"\n".join(b"<%02X> <%s>" % (code, _utf16_hex(char, bom=False)) for code, char in chunk)
        blocks.append(b"%d beginbfchar\n%s\nendbfchar" % (len(chunk), lines))
    return (
        b"/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n"
        b"/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n"
        b"/CMapName /Adobe-Identity-UCS def\n/CMapType 2 def\n"
        b"1 begincodespacerange\n<00> <FF>\nendcodespacerange\n"
        + b"\n".join(blocks)
        + b"\nendcmap\nCMapName currentdict /CMap defineresource pop\nend\nend"
    )


def _glyph_name(char: str) -> str:
    point = ord(char)
    return f"uni{point:04X}" if point <= 0xFFFF else f"u{point:06X}"


def _utf16_hex(text: str, bom: bool = True) -> bytes:
    return ((b"\xfe\xff" if bom else b"") + text.encode("utf-16-be")).hex().upper().encode()
