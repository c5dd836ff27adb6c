"""The look through /proc for processes holding a file open for writing, against real descriptors of
this test process (and of a child)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from konfuzio_watch import writers

from .helpers import AS_NOBODY, FakeClock, can_drop_privileges


def file_id(path: Path) -> writers.FileId:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_a_descriptor_open_for_writing_is_found_with_its_process(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(b"%PDF-1.4 half")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND):
        fd = os.open(path, flags)
        try:
            look = writers.find_writers([file_id(path)])
        finally:
            os.close(fd)
        assert look.complete
        writer = look.writers[file_id(path)]
        assert writer.pid == os.getpid() and writer.command == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        assert str(writer) == f"{writer.command}, pid {os.getpid()}"
    assert writers.find_writers([file_id(path)]).writers == {}, "closed: nobody"


def test_a_reader_is_no_writer_and_a_writer_through_another_name_is_one(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(b"%PDF-1.4")
    other_name = tmp_path / "elsewhere.pdf"
    os.link(path, other_name)
    with open(path, "rb"):
        assert writers.find_writers([file_id(path)]).writers == {}
    with open(other_name, "ab"):
        assert list(writers.find_writers([file_id(path)]).writers) == [file_id(path)]


@pytest.mark.slow
def test_a_writer_in_another_process_is_found(tmp_path):
    path = tmp_path / "scan.png"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'wb'); print(flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"
        look = writers.find_writers([file_id(path), file_id(tmp_path)])
        assert {key: w.pid for key, w in look.writers.items()} == {file_id(path): child.pid}
    finally:
        child.communicate(b"")


def test_the_look_is_cut_short_by_its_budget_and_says_so(tmp_path):
    path = tmp_path / "nobody.pdf"
    path.write_bytes(b"x")
    clock = FakeClock()

    def monotonic() -> float:
        return clock.advance(0.1)  # every look at the clock: 0.1 s later

    look = writers.find_writers([file_id(path)], budget_s=0.25, monotonic=monotonic)
    assert not look.complete and look.writers == {}
    assert writers.find_writers([file_id(path)]).complete, "with the real clock it looks at everything"
    assert not writers.find_writers([file_id(path)], proc=str(tmp_path / "no-proc")).complete
    assert writers.find_writers([]) == writers.Look(), "nothing asked, nothing looked at"


@pytest.mark.slow
def test_processes_of_other_users_are_counted_not_looked_into(tmp_path):
    """As root: the look runs as nobody (root's processes are closed to it); otherwise as ourselves
    (init's are closed to us)."""
    if os.geteuid() == 0 and not can_drop_privileges():
        pytest.skip("needs setpriv and an interpreter nobody may run")
    prefix = AS_NOBODY if os.geteuid() == 0 else []
    code = (
        "from konfuzio_watch import writers; look = writers.find_writers([(0, 0)]); print(look.hidden, look.complete)"
    )
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[1],
        check=True,
    ).stdout.split()
    assert int(out[0]) >= 1 and out[1] == "True"
