"""The sample generators make files the real konfuzio-sdk accepts, distinct per label."""

import os
import struct
import zlib

os.environ.setdefault("LOG_TO_FILE", "False")

import pytest  # noqa: E402

from konfuzio_watch.emulator import count_pages, ocr_text_for, page_size  # noqa: E402
from konfuzio_watch.samples import make_pdf, make_png, make_tiff, write_samples  # noqa: E402


def file_type(data: bytes) -> tuple[int, str]:
    from konfuzio_sdk.utils import get_file_type_and_extension

    return get_file_type_and_extension(data)


@pytest.mark.parametrize("pages", [1, 2, 5])
def test_pdf_is_accepted_as_pdf_with_its_page_count(pages):
    data = make_pdf(pages, label=f"doc with {pages} pages")

    assert file_type(data) == (1, "pdf")  # konfuzio_sdk.settings_importer.PDF_FILE
    assert data.startswith(b"%PDF-1.4") and data.rstrip().endswith(b"%%EOF")
    assert count_pages(data) == pages
    assert ocr_text_for(data, "x.pdf").count("\f") == pages - 1


def test_pdf_xref_offsets_point_at_their_objects():
    data = make_pdf(3, label="xref")
    xref_at = int(data.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
    lines = data[xref_at:].split(b"\n")
    count = int(lines[1].split()[1])
    for obj_id in range(1, count):
        offset = int(lines[2 + obj_id].split()[0])
        assert data[offset:].startswith(b"%d 0 obj" % obj_id)


def test_png_is_accepted_as_image_with_its_pixel_size():
    data = make_png(width=120, height=80, label="photo")

    assert file_type(data) == (2, "png")
    assert page_size(data) == (120, 80)
    assert count_pages(data) == 1


def test_png_chunks_have_correct_crcs():
    data = make_png(label="crc")
    position = 8
    kinds = []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        payload = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + payload) & 0xFFFFFFFF == crc
        kinds.append(kind)
        position += 12 + length
    assert kinds == [b"IHDR", b"iTXt", b"IDAT", b"IEND"]


def test_tiff_is_accepted_as_image():
    assert file_type(make_tiff(label="fax")) == (2, "tif")


@pytest.mark.parametrize(
    "make", [lambda label: make_pdf(2, label=label), lambda label: make_png(label=label), make_tiff]
)
def test_distinct_labels_give_distinct_bytes(make):
    labels = ["a", "b", "scan_0001.pdf", "scän_0001.pdf", "日本"]
    assert len({make(label) for label in labels}) == len(labels)
    assert make("same") == make("same")


def test_write_samples_mixes_pdfs_and_pngs(tmp_path):
    paths = write_samples(tmp_path / "inbox", 6)

    assert [p.name for p in paths] == [
        "scan_0001.pdf",
        "photo_0002.png",
        "scan_0003.pdf",
        "photo_0004.png",
        "scan_0005.pdf",
        "photo_0006.png",
    ]
    page_counts = {count_pages(p.read_bytes()) for p in paths if p.suffix == ".pdf"}
    assert page_counts == {1, 2, 3}
    for path in paths:
        assert file_type(path.read_bytes())[1] == path.suffix[1:]
    assert len({p.read_bytes() for p in paths}) == 6
