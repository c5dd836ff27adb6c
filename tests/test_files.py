"""Pure parts on real files: safe upload names, never-overwriting moves, result building."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from konfuzio_watch import export
from konfuzio_watch.dirfd import FolderInTheWay, remove_stale_temps
from konfuzio_watch.file_names import ignore_reason, is_ignored, safe_upload_name
from konfuzio_watch.files import (
    NotRegularFile,
    free_target,
    move_no_clobber,
    open_regular_file,
    replace_file,
    sidecar_for,
    write_json_no_clobber,
    write_temp,
)
from konfuzio_watch.journal import Row, State
from konfuzio_watch.long_paths import SHORT_NAME_MAX, shortened_name

from .helpers import injecting, predictable_temp


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
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
    ],
)
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
    move_no_clobber(src, dst, dst_root=tmp_path)
    assert dst.read_bytes() == b"data" and not src.exists()


def test_a_missing_root_is_never_made(tmp_path):
    """A configured folder missing at run time is a share that went away: its bare mountpoint stays
    empty (on main the write made the folder with its parents there)."""
    src, mountpoint = tmp_path / "a", tmp_path / "mnt"
    src.write_bytes(b"data")
    mountpoint.mkdir()
    done = mountpoint / "share" / "done"
    with pytest.raises(FileNotFoundError):
        move_no_clobber(src, done / "sub" / "a", dst_root=done)
    with pytest.raises(FileNotFoundError):
        write_json_no_clobber(done / "a.json", {}, lambda _old: False, root=done)
    assert list(mountpoint.iterdir()) == [] and src.read_bytes() == b"data"


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
        id=3,
        rel_path=b"sub/scan\xff.pdf",
        state=State.EXPORTING,
        size=10,
        sha256="ab" * 32,
        upload_name="scan_.pdf",
        token_hash="t",
        document_id=42,
        attempts=1,
        next_at=None,
        callback_at=None,
        uploaded_at=1_700_000_000.0,
        final_path=None,
        error=None,
        stage="export",
        project_id=1,
        detected_at=1_699_999_990.0,
        updated_at=1_700_000_000.0,
        finished_at=None,
    )
    base.update(fields)
    return Row(**base)  # type: ignore[arg-type]


def test_the_result_splits_the_text_into_its_pages_and_names_its_source():
    details = {
        "id": 42,
        "status_data": 2,
        "text": "page one\fpage two",
        "pages": [
            {"number": 1, "size": [595, 842], "original_size": [595, 842]},
            {"number": 2, "size": [595, 842], "original_size": [595, 842]},
        ],
    }
    result = export.build_result(row(), details, {"0": {"x0": 1}}, now=1_700_000_010.0)
    assert [p["text"] for p in result["pages"]] == ["page one", "page two"]
    assert result["status"] == "done" and result["document_id"] == 42
    assert result["source"] == {
        "path": "sub/scan\\xff.pdf",
        "sha256": "ab" * 32,
        "size": 10,
        "uploaded_as": "scan_.pdf",
    }
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


@pytest.mark.parametrize(
    ("rel", "reason"),
    [
        ("invoice.pdf", None),
        ("2026/März/invoice.pdf", None),
        (".hidden.pdf", "hidden (its name starts with '.')"),
        (".sync/invoice.pdf", "hidden (its name starts with '.')"),
        ("scan.pdf.part", "a temporary or system file (built-in pattern '*.part')"),
        ("@eaDir/scan.pdf", "a temporary or system file (built-in pattern '@eaDir')"),
        ("old/scan.bak", "matches watch.ignore '*.bak'"),
        ("archive/2020/scan.pdf", "matches watch.ignore 'archive/*'"),
    ],
)
def test_why_a_path_is_ignored(rel, reason):
    parts = tuple(rel.split("/"))
    assert ignore_reason(parts, ("*.bak", "archive/*")) == reason
    assert is_ignored(parts, ("*.bak", "archive/*")) is (reason is not None)


# -- links someone put into the output folders (done/, failed/) ---------------------------------------


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """done/ and a victim file outside it."""
    (tmp_path / "done").mkdir()
    (tmp_path / "outside").mkdir()
    victim = tmp_path / "outside" / "victim"
    victim.write_bytes(b"victim")
    return tmp_path / "done", victim


def entries(folder: Path) -> dict[str, str]:
    return {p.name: f"-> {os.readlink(p)}" if p.is_symlink() else p.read_text() for p in folder.iterdir()}


def test_a_link_at_a_temporary_name_is_never_written_through_nor_removed(planted):
    done, victim = planted
    link = predictable_temp(done / "r.json")
    os.symlink(victim, link)
    write_json_no_clobber(done / "r.json", {"document_id": 1}, is_ours=lambda old: False, root=done)
    assert entries(done) == {link.name: f"-> {victim}", "r.json": '{\n  "document_id": 1\n}\n'}
    assert victim.read_bytes() == b"victim"


def test_temporary_names_are_new_for_each_write(planted, monkeypatch):
    done, _ = planted
    seen = []
    original = os.open

    def recording_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_CREAT:
            seen.append(path)
            assert flags & os.O_EXCL and flags & os.O_NOFOLLOW, "an existing entry must never be opened"
        return original(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    for _ in range(3):
        write_json_no_clobber(done / "r.json", {"document_id": 1}, is_ours=lambda old: True, root=done)
    assert len(set(seen)) == 3 and all(name.startswith(".konfuzio-watch-") for name in seen)


@pytest.mark.parametrize("in_the_way", ["link", "dangling link", "file"])
def test_a_link_or_a_file_in_place_of_a_folder_is_never_written_into(planted, tmp_path, in_the_way):
    done, victim = planted
    elsewhere = tmp_path / "outside" / "elsewhere"
    elsewhere.mkdir()
    if in_the_way == "file":
        (done / "sub").write_bytes(b"a file")
    else:
        os.symlink(elsewhere if in_the_way == "link" else tmp_path / "nowhere", done / "sub")
    source = tmp_path / "x.pdf"
    source.write_bytes(b"original")
    for rel in ("sub/x.pdf", "sub/deeper/x.pdf"):
        with pytest.raises(FolderInTheWay, match="not followed"):
            write_json_no_clobber(done / (rel + ".json"), {"document_id": 1}, is_ours=lambda old: False, root=done)
        with pytest.raises(FileExistsError):
            move_no_clobber(source, done / rel, dst_root=done)
    assert source.read_bytes() == b"original" and list(elsewhere.iterdir()) == []
    assert not (tmp_path / "nowhere").exists() and victim.read_bytes() == b"victim"


def test_a_file_is_never_moved_out_of_a_linked_folder(tmp_path):
    """``konfuzio-watch retry`` reads from failed/: a folder there that became a link is not followed."""
    failed, inbox, outside = tmp_path / "failed", tmp_path / "inbox", tmp_path / "outside"
    for folder in (failed, inbox, outside):
        folder.mkdir()
    (outside / "secret.pdf").write_bytes(b"not ours")
    os.symlink(outside, failed / "sub")
    with pytest.raises(FolderInTheWay):
        move_no_clobber(failed / "sub" / "secret.pdf", inbox / "secret.pdf", src_root=failed, dst_root=inbox)
    assert (outside / "secret.pdf").read_bytes() == b"not ours" and list(inbox.iterdir()) == []
    with pytest.raises(FolderInTheWay):
        open_regular_file(failed / "sub" / "secret.pdf", root=failed)


def test_free_names_go_around_what_is_not_a_folder(planted, tmp_path):
    done, victim = planted
    os.symlink(tmp_path / "outside", done / "sub")
    (done / "sub (2)").write_bytes(b"a file where a folder is wanted")
    (done / "a").mkdir()
    os.symlink(tmp_path / "outside", done / "a" / "b")
    (done / "real").mkdir()
    os.symlink(victim, done / "real" / "x.pdf")  # a link with the file's own name takes that name
    assert free_target(done, "sub/x.pdf", ".json") == done / "sub (3)" / "x.pdf"
    assert free_target(done, "a/b/c/x.pdf", ".json") == done / "a" / "b (2)" / "c" / "x.pdf"
    assert free_target(done, "real/x.pdf", ".json") == done / "real" / "x (2).pdf"
    assert free_target(done, "new/x.pdf", ".json") == done / "new" / "x.pdf"
    assert free_target(tmp_path / "not yet", "sub/x.pdf", ".json") == tmp_path / "not yet" / "sub" / "x.pdf"


def test_a_copy_across_file_systems_never_writes_through_a_link(planted, tmp_path):
    done, victim = planted
    other = Path(tempfile.mkdtemp(prefix="kw-files-", dir="/dev/shm"))
    try:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same file system as the test's folder")
        source = other / "x.pdf"
        source.write_bytes(b"original")
        link = predictable_temp(done / "x.pdf")
        os.symlink(victim, link)
        move_no_clobber(source, done / "x.pdf", dst_root=done)
        assert entries(done) == {link.name: f"-> {victim}", "x.pdf": "original"}
        assert victim.read_bytes() == b"victim" and not source.exists()
    finally:
        shutil.rmtree(other)


def test_our_own_file_replaces_a_link_put_in_its_place_never_its_target(planted):
    done, victim = planted
    os.symlink(victim, done / "x.pdf.ocr.pdf")
    staged = write_temp(done, lambda out: out.write(b"%PDF- revision 2"))
    replace_file(staged, done / "x.pdf.ocr.pdf", root=done, sync_dir=True)
    assert entries(done) == {"x.pdf.ocr.pdf": "%PDF- revision 2"} and victim.read_bytes() == b"victim"


def test_a_json_that_is_a_link_is_never_taken_for_ours(planted):
    done, victim = planted
    victim.write_text('{"document_id": 1}')
    os.symlink(victim, done / "r.json")
    with pytest.raises(FileExistsError):
        write_json_no_clobber(done / "r.json", {"document_id": 1, "v": 2}, is_ours=lambda old: True, root=done)
    assert victim.read_text() == '{"document_id": 1}' and (done / "r.json").is_symlink()


def test_only_our_stale_temporary_files_are_removed(planted, tmp_path):
    done, victim = planted
    hour_ago = time.time() - 3700
    stale, fresh = done / ".konfuzio-watch-0123456789abcdef.tmp", done / ".konfuzio-watch-fresh.tmp"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"being written")
    os.utime(stale, (hour_ago, hour_ago))
    link = done / ".konfuzio-watch-link.tmp"
    os.symlink(victim, link)
    os.utime(link, (hour_ago, hour_ago), follow_symlinks=False)
    (done / ".konfuzio-watch-folder.tmp").mkdir()
    os.utime(done / ".konfuzio-watch-folder.tmp", (hour_ago, hour_ago))
    other_users = done / ".konfuzio-watch-other.tmp"
    if os.geteuid() == 0:
        other_users.write_bytes(b"not ours")
        os.chown(other_users, 65534, 65534)
        os.utime(other_users, (hour_ago, hour_ago))
    fd = os.open(done, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert remove_stale_temps(fd, time.time()) == [stale.name]
    finally:
        os.close(fd)
    assert not stale.exists() and fresh.exists() and link.is_symlink() and victim.read_bytes() == b"victim"
    assert (done / ".konfuzio-watch-folder.tmp").is_dir() and other_users.exists() == (os.geteuid() == 0)


def test_a_write_sweeps_the_folders_stale_temporary_files(planted):
    done, _ = planted
    stale = done / ".konfuzio-watch-0123456789abcdef.tmp"
    stale.write_bytes(b"left by a crash")
    os.utime(stale, (time.time() - 3700,) * 2)
    write_json_no_clobber(done / "r.json", {"document_id": 1}, is_ours=lambda old: False, root=done)
    assert sorted(p.name for p in done.iterdir()) == ["r.json"]


NO_LINKS = """
import sys
from pathlib import Path
from konfuzio_watch.files import move_no_clobber, write_json_no_clobber
root = Path(sys.argv[1])
done = root / "done"
done.mkdir()
write_json_no_clobber(done / "sub" / "r.json", {"document_id": 1}, is_ours=lambda old: False, root=done)
write_json_no_clobber(done / "sub" / "r.json", {"document_id": 1, "v": 2}, is_ours=lambda old: True, root=done)
try:
    write_json_no_clobber(done / "sub" / "r.json", {"document_id": 2}, is_ours=lambda old: False, root=done)
except FileExistsError:
    print("json kept")
move_no_clobber(root / "a.pdf", done / "sub" / "a.pdf", dst_root=done)
try:
    move_no_clobber(root / "b.pdf", done / "sub" / "a.pdf", dst_root=done)
except FileExistsError:
    print("file kept")
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs Debian's strace for fault injection")
def test_without_hard_links_a_write_or_move_checks_then_renames(tmp_path):
    """A file system without hard links (vfat, exFAT, some SMB): every link(2) fails with EPERM."""
    (tmp_path / "a.pdf").write_bytes(b"a")
    (tmp_path / "b.pdf").write_bytes(b"b")
    strace = injecting("link,linkat", "EPERM")
    command = [*strace, sys.executable, "-c", NO_LINKS, str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:2] == ["json kept", "file kept"]
    assert entries(tmp_path / "done" / "sub") == {"a.pdf": "a", "r.json": '{\n  "document_id": 1,\n  "v": 2\n}\n'}
    assert (tmp_path / "b.pdf").read_bytes() == b"b" and not (tmp_path / "a.pdf").exists()
