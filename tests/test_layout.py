"""The done/ layout templates: every placeholder, unsafe values, names that are not UTF-8, bad templates."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from konfuzio_watch.layout import DEFAULT_TEMPLATE, render, split_ext, validate

UPLOADED = dt.datetime(2026, 3, 5, 23, 30, 15, tzinfo=dt.UTC).timestamp()
FILE = {"path": b"2026/Rechnungen/scan 01.pdf", "category": "Invoice", "document_id": 4711, "uploaded_at": UPLOADED}


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{path}", "2026/Rechnungen/scan 01.pdf"),
        ("{dir}/{name}", "2026/Rechnungen/scan 01.pdf"),
        ("{name}", "scan 01.pdf"),
        ("{stem}{ext}", "scan 01.pdf"),
        ("{stem}-{document_id}{ext}", "scan 01-4711.pdf"),
        ("{document_id:08d}{ext}", "00004711.pdf"),
        ("{category}/{date:%Y-%m}/{name}", "Invoice/2026-03/scan 01.pdf"),
        ("{category}/{date}/{name}", "Invoice/2026-03-05/scan 01.pdf"),
        ("{date:%Y/%m}/{name}", "2026/03/scan 01.pdf"),  # a / in the date format makes folders, by design
        ("{date:%H%M%S}-{name}", "233015-scan 01.pdf"),  # UTC, whatever the local zone
        ("archive/{category}/{path}", "archive/Invoice/2026/Rechnungen/scan 01.pdf"),
        ("{category}//{name}", "Invoice/scan 01.pdf"),  # empty components vanish
        ("{{{category}}}/{name}", "{Invoice}/scan 01.pdf"),
    ],
)
def test_every_placeholder(template, expected):
    validate(template)
    assert render(template, **FILE) == expected


def test_the_default_is_todays_layout_byte_for_byte():
    """docs/results.md promises names kept byte for byte in done/: newlines, undecodable bytes, dashes."""
    for raw in (
        b"scan.pdf",
        b"a/b/c.pdf",
        b"-rf.pdf",
        b"scan\xff\n.pdf",
        b"sub/\xe4\x00x".replace(b"\x00", b""),
        b"x" * 251 + b".pdf",
        "Straße März.pdf".encode(),
    ):
        rendered = render(DEFAULT_TEMPLATE, path=raw)
        assert os.fsencode(rendered) == raw and rendered == os.fsdecode(raw)


@pytest.mark.parametrize(
    "category, expected",
    [
        (None, "uncategorized"),
        ("", "uncategorized"),
        ("   ", "uncategorized"),
        ("Rechnung/Gutschrift", "Rechnung_Gutschrift"),
        ("..", "_."),
        (".hidden", "_hidden"),
        ("-rf", "_rf"),
        ("a\x00b\nc\x1bd\x85e", "a_b_c_d_e"),
        ('Kosten: "Q1" <*?|\\>', "Kosten_ _Q1_ ______"),  # an SMB share refuses these
        ("Straße März", "Straße März"),
        ("..\u202e..", "_.\u202e.."),
    ],
)
def test_what_a_category_can_not_add(category, expected):
    assert render("{category}/{name}", path=b"scan.pdf", category=category) == f"{expected}/scan.pdf"


def test_the_result_never_leaves_done():
    hostile = ["../../etc/passwd", "/etc/passwd", "..", ".", "a/../../b"]
    for value in hostile:
        for template in ("{category}/{name}", "{path}", "{dir}/{name}", "{name}"):
            rendered = render(template, path=value.encode(), category=value)
            parts = rendered.split("/")
            stays_in = not rendered.startswith("/") and ".." not in parts and "." not in parts and "" not in parts
            assert stays_in, (template, value, rendered)


def test_missing_values_render_as_words_not_as_gaps():
    rendered = render("{category}/{date:%Y}/{document_id}-{name}", path=b"scan.pdf")
    assert rendered == "uncategorized/undated/unknown-scan.pdf"
    assert render("{date:%Y}/{name}", path=b"x.pdf", uploaded_at=dt.datetime(2025, 12, 31, 23, 0)) == "2025/x.pdf"


def test_a_name_that_is_not_utf8_keeps_its_bytes_in_every_placeholder():
    raw = b"scans/R\xe9chnung\n01.pdf"  # latin-1 bytes and a newline
    rendered = render("{category}/{dir}/{stem}-{document_id}{ext}", path=raw, category="Invoice", document_id=7)
    assert os.fsencode(rendered) == b"Invoice/scans/R\xe9chnung\n01-7.pdf"


@pytest.mark.parametrize(
    "name",
    [
        "x" * 250 + ".pdf",
        "ä" * 126 + ".pdf",  # 2 bytes each: the cut must not split one
        "€" * 90 + ".pdf",
        b"\xff" * 251 + b".pdf",
        "x" * 300,  # no extension
    ],
)
def test_a_component_grown_too_long_is_shortened_keeping_its_extension(name):
    raw = name if isinstance(name, bytes) else name.encode()
    rendered = render("{category}/{document_id}-{name}", path=raw, category="Invoice", document_id=123456)
    category, last = rendered.split("/")
    assert category == "Invoice" and len(os.fsencode(last)) <= 255
    assert last.startswith("123456-") and (last.endswith(".pdf") or "." not in name)
    os.fsencode(last).decode("utf-8", errors="surrogateescape")  # whole characters, or the name's own bytes
    if not isinstance(name, bytes):
        os.fsencode(last).decode("utf-8")  # a cut never makes a UTF-8 name invalid
    other = render("{category}/{document_id}-{name}", path=raw[:-5] + b"y.pdf", category="Invoice", document_id=123456)
    assert other != rendered  # the hash of the whole name tells two long names apart


@pytest.mark.parametrize(
    "name, stem, ext",
    [
        ("scan.pdf", "scan", ".pdf"),
        ("archive.tar.gz", "archive.tar", ".gz"),
        ("README", "README", ""),
        ("scan.", "scan", "."),
        ("x." + "y" * 17, "x." + "y" * 17, ""),
    ],
)
def test_stem_and_ext(name, stem, ext):
    assert split_ext(name) == (stem, ext)
    assert render("{stem}{ext}", path=name.encode()) == name


@pytest.mark.parametrize(
    "template, names",
    [
        ("{categroy}/{name}", "{categroy}"),
        ("{category}/{Name}", "{Name}"),
        ("{}/{name}", "{}"),
        ("{0}/{name}", "{0}"),
        ("{path.parent}/{name}", "{path.parent}"),
        ("{name[0]}/{name}", "{name[0]}"),
        ("{name!r}", "{name!r}"),
        ("{name:>20}", "{name:>20}"),
        ("{category:.3}/{name}", "{category:.3}"),
        ("{document_id:x y}{ext}", "{document_id:x y}"),
        ("{date:{fmt}}/{name}", "{date:{fmt}}"),
        ("{category/{name}", "'{'"),
        ("{name}}", "'}'"),
        ("/{name}", "leading /"),
        ("{category}/", "file name"),
        ("../{name}", "'..'"),
        ("a/./{name}", "'.'"),
        ("{category}/{date:%Y}", "{path}, {name}, {stem} or {document_id}"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_a_bad_template_is_named_in_one_line(template, names):
    with pytest.raises(ValueError) as raised:
        validate(template)
    message = str(raised.value)
    assert names in message and "\n" not in message, message
    with pytest.raises(ValueError):
        render(template, path=b"scan.pdf")
