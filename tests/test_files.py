"""Pure parts on real files: safe upload names, never-overwriting moves, result building."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from konfuzio_watch import export
from konfuzio_watch.files import (
    SHORT_NAME_MAX,
    NotRegularFile,
    free_target,
    ignore_reason,
    is_ignored,
    move_no_clobber,
    open_regular_file,
    safe_upload_name,
    shortened_name,
    sidecar_for,
    write_json_no_clobber,
)
from konfuzio_watch.journal import Row, State


@pytest.mark.parametrize(("raw", "expected"), [
    (b"invoice.pdf", "invoice.pdf"),
    ("Straße März.pdf".encode(), "Strasse Marz.pdf"),
    (b"scan\xff\n.pdf", "scan__.pdf"),
    (b"-rf --help.pdf", "rf --help.pdf"),
    (b"...hidden.png", "hidden.png"),
    (b"$(reboot).pdf", "_(reboot).pdf"),
    (b".pdf", "pdf"),
    (b"\xff\xfe", "__"),
    (b"", "document-7"),
    ("日本語.pdf".encode(), "___.pdf"),
])
def test_safe_upload_names(raw, expected):
    name = safe_upload_name(raw, fallback="document-7")
    assert name == expected
    assert name.isascii() and name.isprintable() and not name.startswith(("-", "."))


def test_a_safe_name_keeps_its_extension_and_a_bounded_length():
    name = safe_upload_name(b"x" * 400 + b".jpeg", fallback="d")
    assert name.endswith(".jpeg") and len(name) <= 120


def test_a_move_never_replaces_an_existing_file(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "out" / "a"
    src.write_bytes(b"new")
    dst.parent.mkdir()
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        move_no_clobber(src, dst)
    assert dst.read_bytes() == b"old" and src.read_bytes() == b"new"


def test_a_move_creates_folders_and_leaves_no_source(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "x" / "y" / "a"
    src.write_bytes(b"data")
    move_no_clobber(src, dst)
    assert dst.read_bytes() == b"data" and not src.exists()


def test_a_symlink_is_moved_as_a_link_never_followed(tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"secret")
    link = tmp_path / "link.pdf"
    os.symlink(target, link)
    move_no_clobber(link, tmp_path / "moved.pdf")
    assert os.path.islink(tmp_path / "moved.pdf") and target.read_bytes() == b"secret"
    with pytest.raises(NotRegularFile, match="symbolic link"):
        open_regular_file(tmp_path / "moved.pdf")


def test_free_names_skip_taken_files_and_their_sidecars(tmp_path):
    (tmp_path / "scan.pdf").write_bytes(b"")
    (tmp_path / "scan (2).pdf.json").write_bytes(b"")  # a sidecar without its file still takes the name
    assert free_target(tmp_path, "scan.pdf", ".json") == tmp_path / "scan (3).pdf"
    assert free_target(tmp_path, "other.pdf", ".json") == tmp_path / "other.pdf"
    assert sidecar_for(tmp_path / "scan.pdf", ".error.json").name == "scan.pdf.error.json"


def test_json_is_written_atomically_and_only_replaces_an_earlier_write_of_the_same_result(tmp_path):
    path = tmp_path / "r.json"
    write_json_no_clobber(path, {"document_id": 1}, is_ours=lambda old: old.get("document_id") == 1)
    write_json_no_clobber(path, {"document_id": 1, "v": 2}, is_ours=lambda old: old.get("document_id") == 1)
    assert '"v": 2' in path.read_text()
    with pytest.raises(FileExistsError):
        write_json_no_clobber(path, {"document_id": 2}, is_ours=lambda old: old.get("document_id") == 2)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "no temporary file left behind"


def row(**fields: object) -> Row:
    base: dict[str, object] = dict(
        id=3, rel_path=b"sub/scan\xff.pdf", state=State.EXPORTING, size=10, sha256="ab" * 32, upload_name="scan_.pdf",
        token_hash="t", document_id=42, attempts=1, next_at=None, callback_at=None, uploaded_at=1_700_000_000.0,
        final_path=None, error=None, stage="export", project_id=1, detected_at=1_699_999_990.0,
        updated_at=1_700_000_000.0, finished_at=None)
    base.update(fields)
    return Row(**base)  # type: ignore[arg-type]


def test_the_result_splits_the_text_into_its_pages_and_names_its_source():
    details = {"id": 42, "status_data": 2, "text": "page one\fpage two",
               "pages": [{"number": 1, "size": [595, 842], "original_size": [595, 842]},
                         {"number": 2, "size": [595, 842], "original_size": [595, 842]}]}
    result = export.build_result(row(), details, {"0": {"x0": 1}}, now=1_700_000_010.0)
    assert [p["text"] for p in result["pages"]] == ["page one", "page two"]
    assert result["status"] == "done" and result["document_id"] == 42
    assert result["source"] == {"path": "sub/scan\\xff.pdf", "sha256": "ab" * 32, "size": 10,
                                "uploaded_as": "scan_.pdf"}
    assert result["exported_at"] == "2023-11-14T22:13:30+00:00"
    assert export.result_is_for(row(), result)
    assert not export.result_is_for(row(document_id=43), result)


def test_the_error_report_says_why_and_how_to_retry():
    report = export.build_error(row(state=State.FAILING, error="HTTP 400: bad", stage="upload"), now=1_700_000_010.0)
    assert report["error"] == "HTTP 400: bad" and report["stage"] == "upload"
    assert "konfuzio-watch retry" in report["hint"]
    assert export.error_is_for(row(state=State.FAILING, error="x", stage="upload"), report)


def test_a_folder_in_the_way_of_a_move_is_not_replaced(tmp_path: Path):
    src = tmp_path / "a.pdf"
    src.write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.pdf").mkdir()
    with pytest.raises(FileExistsError):
        move_no_clobber(src, tmp_path / "out" / "a.pdf")
    assert src.exists()


DEEP = b"/".join([b"x" * 250] * 17)  # a relative path of 4266 bytes


@pytest.mark.parametrize("suffix", ["", ".error.json"])
def test_a_shortened_name_keeps_the_start_of_the_name_and_its_extension(suffix):
    rel = DEEP + "/Rechnung Mai 2026 – Müller GmbH ".encode() + "ü".encode() * 200 + b".pdf"
    name = shortened_name(rel, suffix)
    raw = os.fsencode(name)
    assert len(raw) + len(suffix) < SHORT_NAME_MAX
    assert name.startswith("Rechnung Mai 2026 – Müller GmbH üü") and name.endswith(".pdf")
    raw.decode("utf-8")  # not cut inside a character
    assert "/" not in name and not name.startswith(".")
    assert shortened_name(rel, suffix) == name, "the same path always gets the same name"


def test_shortened_names_of_files_with_the_same_name_in_other_folders_differ():
    a = shortened_name(DEEP + b"/a/scan.pdf")
    b = shortened_name(DEEP + b"/b/scan.pdf")
    assert a != b and a.startswith("scan~") and b.startswith("scan~") and a.endswith(".pdf")


def test_a_shortened_name_keeps_undecodable_bytes():
    name = shortened_name(DEEP + b"/scan\xff\xfe.tiff", ".json")
    assert os.fsencode(name).startswith(b"scan\xff\xfe~") and name.endswith(".tiff")


@pytest.mark.parametrize(("rel", "reason"), [
    ("invoice.pdf", None),
    ("2026/März/invoice.pdf", None),
    (".hidden.pdf", "hidden (its name starts with '.')"),
    (".sync/invoice.pdf", "hidden (its name starts with '.')"),
    ("scan.pdf.part", "a temporary or system file (built-in pattern '*.part')"),
    ("@eaDir/scan.pdf", "a temporary or system file (built-in pattern '@eaDir')"),
    ("old/scan.bak", "matches watch.ignore '*.bak'"),
    ("archive/2020/scan.pdf", "matches watch.ignore 'archive/*'"),
])
def test_why_a_path_is_ignored(rel, reason):
    parts = tuple(rel.split("/"))
    assert ignore_reason(parts, ("*.bak", "archive/*")) == reason
    assert is_ignored(parts, ("*.bak", "archive/*")) is (reason is not None)
