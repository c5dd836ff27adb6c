"""Nodes of a cluster whose wall clocks disagree: every time another node compares is the database's.

A node runs with its wall clock moved by ``tests/clockshift.c`` (an ``LD_PRELOAD`` shim that shifts
``CLOCK_REALTIME`` only, as on a machine whose clock is set wrong), compiled here with gcc. The
PostgreSQL server, the emulator and the other node keep the true time.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from konfuzio_watch.clock import ClockOffset, DatabaseClock, describe_offset, is_off, measure_offset
from konfuzio_watch.emulator import Emulator, Knobs
from konfuzio_watch.server import ServerThread

from .conftest import TOKEN, drop, wait_until
from .helpers import (
    KONFUZIO_WATCH,
    CallbackBalancer,
    DaemonProcess,
    FakeClock,
    cluster_node,
    documents_per_sha,
    install_move_audit,
    pg_rows,
    sample_files,
)

SHIM_SOURCE = Path(__file__).with_name("clockshift.c")
AHEAD_S = 600.0  # the case: one node ten minutes ahead


@pytest.fixture
def clockshift(tmp_path: Path) -> Path:
    """The shim, built for this test (skipped, saying why, where no C compiler is installed)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the clock-shift shim tests/clockshift.c cannot be built")
    library = tmp_path / "clockshift.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", str(library), str(SHIM_SOURCE), "-ldl"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return library


def shifted(library: Path, seconds: float) -> list[str]:
    """The command prefix that runs a program with its wall clock ``seconds`` off."""
    return ["env", f"LD_PRELOAD={library}", f"CLOCKSHIFT_S={seconds:g}"]


def konfuzio_watch(*args: str, prefix: list[str] | tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, *KONFUZIO_WATCH, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOG_TO_FILE": "False"},
    )


@pytest.mark.slow
def test_the_shim_moves_the_wall_clock_only(clockshift: Path):
    probe = "import time; print(time.time(), time.monotonic(), flush=True); time.sleep(0.2); print(time.monotonic())"
    wall0, mono0 = time.time(), time.monotonic()
    out = subprocess.run(
        [*shifted(clockshift, AHEAD_S), sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    wall, mono, mono_after = (float(x) for x in out)
    assert AHEAD_S - 5 < wall - wall0 < AHEAD_S + 5, "the wall clock is not moved"
    assert 0 <= mono - mono0 < 5, "the monotonic clock is moved too"
    assert 0.15 < mono_after - mono < 5, "sleeping is broken"


# -- the offset to the database's clock ----------------------------------------------------------------


def test_the_offset_is_read_at_the_midpoint_of_the_quickest_round_trip():
    clock = FakeClock(1000.0)
    trips = iter([(0.5, 0.25), (0.0625, 0.0625), (0.375, 0.0)])  # seconds to the database and back, per reading

    def database() -> float:  # 42 s ahead of the local clock
        there, back = next(trips)
        read = clock.advance(there) + 42.0
        clock.advance(back)
        return read

    assert measure_offset(clock.now, database) == ClockOffset(42.0, 0.0625)
    clock_again = FakeClock(0.0)
    assert measure_offset(clock_again.now, lambda: -600.0, samples=1) == ClockOffset(-600.0, 0.0)


def test_a_node_clock_is_the_database_time_and_ignores_noise_in_the_measurements():
    base = FakeClock(1000.0)
    clock = DatabaseClock(base)
    assert clock.now() == 1000.0  # nothing measured yet
    assert clock.adjust(ClockOffset(-600.0, 0.002))
    assert clock.now() == 400.0
    base.advance(5)
    assert clock.now() == 405.0
    assert not clock.adjust(ClockOffset(-600.04, 0.002)), "a heartbeat's round trip moved the clock"
    assert not clock.adjust(ClockOffset(-600.3, 0.3))
    assert clock.now() == 405.0
    assert clock.adjust(ClockOffset(-599.0, 0.01)), "the database's clock was set: the node follows it"
    assert clock.now() == 406.0


def test_a_clock_more_than_five_seconds_off_is_said_to_be_off():
    assert [is_off(s) for s in (0.0, 5.0, -5.0, 5.1, -600.0)] == [False, False, False, True, True]
    assert describe_offset(-600.0) == "600.0 s ahead of the database's"
    assert describe_offset(7.25) == "7.2 s behind the database's"


@pytest.mark.slow
@pytest.mark.postgres
def test_the_journal_measures_the_database_clock_and_keeps_each_node_offset(pg_url: str):
    from konfuzio_watch.journal.pg import PgJournal

    with PgJournal(pg_url, node_id="a", wait_s=5.0) as journal:
        same = journal.clock_offset()  # the server runs on this machine: one clock
        assert abs(same.offset_s) < 0.5 and 0 <= same.error_s < 0.5
        ahead = journal.clock_offset(lambda: time.time() + AHEAD_S)
        assert abs(ahead.offset_s + AHEAD_S) < 0.5
        journal.join(clock_offset_s=ahead.offset_s)
        journal.heartbeat()  # nothing measured this time: the last measurement stays
        assert [round(n.clock_offset_s or 0) for n in journal.nodes()] == [-600]
        journal.heartbeat(clock_offset_s=0.01)
        assert [n.clock_offset_s for n in journal.nodes()] == [0.01]


# -- two node processes, one of them ten minutes ahead --------------------------------------------


class Nodes:
    """Node processes on one shared folder and journal, behind one callback balancer (test_cluster's set-up)."""

    def __init__(self, shared: Path, emulator: Any, pg_url: str, balancer_url: str, balancer: CallbackBalancer):
        self.shared, self.emulator, self.pg_url = shared, emulator, pg_url
        self.balancer, self.balancer_url = balancer, balancer_url
        self.made: dict[str, DaemonProcess] = {}

    def node(self, node_id: str, **overrides: dict) -> DaemonProcess:
        sections: dict[str, dict] = {"callback": {"public_url": self.balancer_url}}
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        self.made[node_id] = cluster_node(self.shared, node_id, self.emulator, self.pg_url, **sections)
        return self.made[node_id]

    def start(self, node: DaemonProcess, prefix: list[str] | None = None) -> None:
        self.balancer.backends = sorted({*self.balancer.backends, f"http://127.0.0.1:{node.port}"})
        node.start(prefix)

    def finished(self) -> int:
        return sum(1 for _ in (self.shared / "done").rglob("*.json")) + sum(
            1 for p in (self.shared / "failed").rglob("*") if p.is_file() and not p.name.endswith(".json")
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{n.log.read_text()[-3000:]}" for name, n in self.made.items() if n.log.exists()
        )


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """The emulator with threads enough for every upload in flight to stall in it at once."""
    emu = Emulator(token=TOKEN, project_ids=(1, 2), knobs=Knobs(processing_s=0.2)).start(threads=64)
    yield emu
    emu.stop()


@pytest.fixture
def nodes(tmp_path: Path, emulator: Any, pg_url: str) -> Iterator[Nodes]:
    install_move_audit(pg_url)
    balancer = CallbackBalancer()
    server = ServerThread(balancer.app, "127.0.0.1", 0, name="balancer", threads=8).start()
    (tmp_path / "inbox").mkdir()
    made = Nodes(tmp_path, emulator, pg_url, server.url, balancer)
    yield made
    for node in made.made.values():
        node.cleanup()
    server.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_a_node_ten_minutes_ahead_uploads_no_file_twice(nodes: Nodes, clockshift: Path):
    """Every upload times out (the server stores it 5 s after it arrived; the client waits 1 s), so every
    file goes through reconcile, which looks for it on the server for 6 s from when the upload timed out
    before uploading it again: that time written by one node's clock, and compared by the clock of
    whichever node takes the file next."""
    nodes.emulator.knobs.upload_latency_s = 5.0
    slow = {"konfuzio": {"timeout_seconds": 1}, "upload": {"reconcile_window_seconds": 6, "concurrency": 8}}
    ahead, right = nodes.node("ahead", **slow), nodes.node("right", **slow)
    nodes.start(right)
    nodes.start(ahead, shifted(clockshift, AHEAD_S))
    files = sample_files(60, "skew")
    for rel, data in files.items():
        drop(nodes.shared / "inbox" / rel, data)
    wait_until(
        lambda: nodes.finished() >= len(files),
        60,
        lambda: f"all {len(files)} finished (have {nodes.finished()})\n{nodes.logs()}",
    )
    status_lines = konfuzio_watch("status", "--config", str(right.config)).stdout.splitlines()
    assert ahead.terminate() == 0 and right.terminate() == 0
    uploaders = collections.Counter(
        w for (w,) in pg_rows(nodes.pg_url, "SELECT writer FROM test_moves WHERE new_state = 'uploading'")
    )
    # Every upload POST is stored in the end, the last ones after the files finished: count them all.
    wait_until(
        lambda: len(nodes.emulator.uploads) >= uploaders.total(),
        10,
        lambda: f"{uploaders.total()} uploads stored (have {len(nodes.emulator.uploads)})",
    )
    per_sha = documents_per_sha(nodes.emulator)
    twice = sum(1 for n in per_sha.values() if n > 1)
    print(
        f"\n{len(files)} files, {nodes.finished()} finished, {sum(per_sha.values())} documents, {twice} files "
        f"uploaded more than once; uploads by node: {dict(uploaders)}"
    )
    assert len(uploaders) == 2, f"one node did every upload: {uploaders}"
    assert len(per_sha) == len(files)
    assert twice == 0, f"{twice} of {len(files)} files uploaded more than once"
    assert len(list((nodes.shared / "done").rglob("*.json"))) == len(files)
    warned = [line for line in ahead.log.read_text().splitlines() if "clock" in line and "WARNING" in line]
    assert len(warned) == 1 and "600.0 s ahead of the database's" in warned[0], warned
    assert "WARNING" not in "".join(line for line in right.log.read_text().splitlines() if "clock" in line)
    listed = {line.split()[0]: line for line in status_lines if line.startswith(("  ahead ", "  right "))}
    assert "CLOCK 600.0 s ahead of the database's" in listed["ahead"], status_lines
    assert "CLOCK" not in listed["right"], status_lines


@pytest.mark.slow
@pytest.mark.postgres
def test_the_files_of_a_dead_node_whose_clock_is_ahead_are_taken_over_at_once(nodes: Nodes, clockshift: Path):
    """The node ahead claims every file (the other's settle time keeps it from claiming), cannot upload
    them (the API is down), and is killed. Its files are due when it said: the other node goes on with
    them as soon as the API is back, not when its own clock has caught up with the dead node's."""
    nodes.emulator.knobs.outage = True
    right = nodes.node("right", watch={"settle_seconds": 60})
    ahead = nodes.node("ahead")
    nodes.start(right)
    nodes.start(ahead, shifted(clockshift, AHEAD_S))
    files = sample_files(10, "stranded")
    for rel, data in files.items():
        drop(nodes.shared / "inbox" / rel, data)
    # Each of them tried in turn, as the probe of the paused uploads: ``uploading`` (a 503 on a POST may hide
    # a stored upload: it is looked for before the next try), the others ``claimed``.
    claimed = "SELECT COUNT(*) FROM files WHERE state IN ('claimed', 'uploading')"
    wait_until(
        lambda: pg_rows(nodes.pg_url, claimed)[0][0] == len(files),
        30,
        lambda: f"the node ahead claimed all {len(files)}\n{nodes.logs()}",
    )
    ahead.kill9()
    nodes.emulator.knobs.outage = False
    killed_at = time.monotonic()
    wait_until(
        lambda: nodes.finished() >= len(files),
        20,
        lambda: f"all {len(files)} finished by the other node (have {nodes.finished()})\n{nodes.logs()}",
    )
    print(
        f"\nthe other node finished the dead node's {len(files)} files {time.monotonic() - killed_at:.1f} s "
        "after it died"
    )
    assert right.terminate() == 0
    assert all(n == 1 for n in documents_per_sha(nodes.emulator).values())


@pytest.mark.slow
@pytest.mark.postgres
def test_check_says_that_this_machine_clock_is_off(tmp_path: Path, emulator: Any, pg_url: str, clockshift: Path):
    from konfuzio_watch.journal.pg import PgJournal

    PgJournal(pg_url, node_id="a", wait_s=5.0).close()  # the journal's schema, as the first node creates it
    node = cluster_node(tmp_path, "a", emulator, pg_url)
    (tmp_path / "inbox").mkdir()
    for prefix, expected in (
        (
            shifted(clockshift, AHEAD_S),
            "FAIL  clock: this machine's clock is 600.0 s ahead of the database's -> set the clocks right (NTP)",
        ),
        ([], "ok    clock: this machine's clock is 0.0 s"),
    ):
        checked = konfuzio_watch("check", "--config", str(node.config), prefix=prefix)
        assert any(line.startswith(expected) for line in checked.stdout.splitlines()), checked.stdout


@pytest.mark.slow
@pytest.mark.postgres
def test_retry_on_a_machine_whose_clock_is_ahead_makes_a_file_due_by_the_database_clock(
    tmp_path: Path, emulator: Any, pg_url: str, clockshift: Path
):
    from konfuzio_watch.journal import State
    from konfuzio_watch.journal.pg import PgJournal

    node = cluster_node(tmp_path, "a", emulator, pg_url)
    with PgJournal(pg_url, node_id="a", wait_s=5.0) as journal:
        now = time.time()
        [row] = journal.add_claims([b"waiting.pdf"], now)
        journal.transition(row, State.CLAIMED, now, next_at=now + 3600)  # waiting out a long backoff
        journal.release_leases([row.id])
    done = konfuzio_watch("retry", "waiting.pdf", "--config", str(node.config), prefix=shifted(clockshift, AHEAD_S))
    assert done.returncode == 0 and "will be retried at once" in done.stdout, done.stdout + done.stderr
    [(late_s,)] = pg_rows(pg_url, "SELECT next_at - EXTRACT(EPOCH FROM clock_timestamp()) FROM files")
    assert late_s < 5, f"due {late_s:.0f} s from now by the database's clock"
