"""Shared fixtures: a real emulator on loopback, a real daemon on tmp folders, wait_until."""

from __future__ import annotations

import os

os.environ.setdefault("LOG_TO_FILE", "False")  # before anything imports konfuzio_sdk

import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from konfuzio_watch.config import Config, parse_config
from konfuzio_watch.daemon import Daemon, run_in_thread
from konfuzio_watch.emulator import Emulator, Knobs
from konfuzio_watch.journal import FINISHED, State

TOKEN = "test-api-token-0123456789"
FAKE_NGROK = Path(__file__).with_name("fake_ngrok.py")


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str | Callable[[], str], interval_s: float = 0.02
) -> Any:
    """Poll ``predicate`` until it is truthy; fail with ``what`` (or what it returns) if it never is."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for: {what() if callable(what) else what}")
        time.sleep(interval_s)


# Fixtures that start a server or a process: a test that takes one is marked slow, so that
# ``pytest -m "not slow"`` stays a quick loop of the unit tests. (A test that starts one by itself,
# a subprocess or an observer, is marked by hand; so is a test that asks for pg_url at run time.)
SLOW_FIXTURES = frozenset(
    {
        "emulator",
        "emu",
        "session",
        "callback_receiver",
        "start_daemon",
        "daemon_process",
        "receiver",
        "agent_path",
        "pg_cluster",
        "pg_url",
        "samba",
        "smb_mount",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("slow") is None and SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests start a server or a process (a fixture of conftest.SLOW_FIXTURES) but are not marked slow: "
            + ", ".join(unmarked)
        )


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield

    def leaked() -> list[str]:
        return [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]

    deadline = time.monotonic() + 5
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not leaked(), f"threads left running: {leaked()}"


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(token=TOKEN, project_ids=(1, 2), knobs=Knobs(processing_s=0.2)).start()
    yield emu
    emu.stop()


@pytest.fixture
def emu() -> Iterator[Emulator]:
    """The emulator with a fixed seed, for the tests that drive it through the SDK (test_emulator*.py)."""
    with Emulator(token=TOKEN, project_ids=(1, 2), knobs=Knobs(processing_s=0.2), seed=0).start() as emulator:
        yield emulator


@pytest.fixture
def session(emu: Emulator) -> Any:
    """A konfuzio-sdk session with ``emu``; no retries: a test sees every answer."""
    from konfuzio_sdk.api import konfuzio_session

    return konfuzio_session(TOKEN, host=emu.url, num_retries=0)


@pytest.fixture
def callback_receiver() -> Iterator[Any]:
    """Where ``emu`` posts its callbacks (helpers.CallbackReceiver), served by Waitress on port 0."""
    from .helpers import CallbackReceiver

    rec = CallbackReceiver()
    rec.server.start()
    yield rec
    rec.server.close()


def make_config(tmp_path: Path, emu: Emulator, **sections: dict[str, Any]) -> Config:
    raw: dict[str, dict[str, Any]] = {
        "konfuzio": {"host": emu.url, "token": TOKEN, "project_id": 1, "timeout_seconds": 10},
        "folders": {
            "inbox": str(tmp_path / "inbox"),
            "done": str(tmp_path / "done"),
            "failed": str(tmp_path / "failed"),
            "state": str(tmp_path / "state"),
        },
        "watch": {"settle_seconds": 0.3},
        "callback": {"host": "127.0.0.1", "port": 0},
        "monitor": {"port": 0},
        # the emulator's errors never hide a stored upload, unless a test says so: a short window
        "upload": {"backoff_base_seconds": 0.1, "backoff_cap_seconds": 1.0, "reconcile_window_seconds": 0.5},
        "results": {"callback_timeout": 30, "poll_interval": 0.5},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw)


@dataclass
class Running:
    daemon: Daemon
    config: Config
    thread: threading.Thread

    @property
    def inbox(self) -> Path:
        return self.config.folders.inbox

    @property
    def done(self) -> Path:
        return self.config.folders.done

    @property
    def failed(self) -> Path:
        return self.config.folders.failed

    def counts(self) -> dict[State, int]:
        assert self.daemon.journal
        return self.daemon.journal.counts()

    def finished(self) -> int:
        counts = self.counts()
        return sum(counts[s] for s in FINISHED)

    def wait_finished(self, n: int, timeout_s: float = 30) -> None:
        wait_until(
            lambda: self.finished() >= n,
            timeout_s,
            lambda: f"{n} files finished (have { ({s.value: c for s, c in self.counts().items() if c}) })",
        )

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the daemon's /metrics registry, e.g. ``upload_retries_total`` (0 when never set)."""
        return self.daemon.metrics.registry.get_sample_value("konfuzio_watch_" + name, labels) or 0.0

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "daemon did not stop"


@pytest.fixture
def start_daemon(tmp_path: Path, emulator: Emulator) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(
        config: Config | None = None, daemon_kwargs: dict[str, Any] | None = None, **sections: dict[str, Any]
    ) -> Running:
        config = config or make_config(tmp_path, emulator, **sections)
        daemon = Daemon(config, **(daemon_kwargs or {}))
        running = Running(daemon, config, run_in_thread(daemon))
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


@pytest.fixture
def agent_path(tmp_path: Path) -> Path:
    """An ``ngrok`` executable that runs the fake agent with this interpreter."""
    path = tmp_path / "bin" / "ngrok"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_NGROK))} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "records"
    directory.mkdir()
    monkeypatch.setenv("FAKE_NGROK_RECORD_DIR", str(directory))
    monkeypatch.delenv("NGROK_AUTHTOKEN", raising=False)
    return directory


def drop(path: Path, data: bytes) -> Path:
    """Drop a finished file the way a user does: write elsewhere, then move in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.dropping"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


@pytest.fixture
def daemon_process(tmp_path: Path, emulator: Emulator) -> Iterator[Callable[..., Any]]:
    """``konfuzio-watch run`` as a real process on tmp_path's folders (see helpers.DaemonProcess)."""
    from .helpers import DaemonProcess

    made: list[DaemonProcess] = []

    def make(**overrides: dict[str, Any]) -> DaemonProcess:
        made.append(DaemonProcess(tmp_path, emulator, **overrides))
        return made[-1]

    yield make
    for daemon in made:
        daemon.cleanup()


@pytest.fixture
def receiver() -> Iterator[tuple[Any, Any]]:
    """A local webhook endpoint (helpers.Receiver) served by Waitress on port 0."""
    from konfuzio_watch.server import ServerThread

    from .helpers import Receiver

    rec = Receiver()
    server = ServerThread(rec.app, "127.0.0.1", 0, name="webhook").start()
    yield rec, server
    if rec.hold is not None:
        rec.hold.set()
    server.close()


# -- PostgreSQL: one throwaway server per test session (per xdist worker), one database per test ----


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A PostgreSQL server of this session (tests/pg.py). Missing PostgreSQL: a skip with a loud
    reason on a developer's machine, a failure where it is required (CI)."""
    from .pg import SKIP_REASON, PgCluster, PgUnavailable, required

    try:
        import psycopg  # noqa: F401

        cluster = PgCluster.start_new()
    except (PgUnavailable, ImportError) as exc:
        if required():
            pytest.fail(
                f"PostgreSQL is required here (CI / KONFUZIO_WATCH_REQUIRE_POSTGRES) but cannot be started: {exc}",
                pytrace=False,
            )
        pytest.skip(f"{SKIP_REASON}: {exc}")
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: Any) -> Iterator[str]:
    """The URL of a new, empty database of its own for this test."""
    name = pg_cluster.create_database()
    yield pg_cluster.url(name)
    if pg_cluster.running():
        pg_cluster.drop_database(name)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from .pg import SKIP_REASON

    reasons = {
        str(report.longrepr[2])
        for report in terminalreporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple) and SKIP_REASON in str(report.longrepr[2])
    }
    for reason in sorted(reasons):
        terminalreporter.write_sep("!", "PostgreSQL journal tests SKIPPED", red=True, bold=True)
        terminalreporter.write_line(reason.removeprefix("Skipped: "), red=True, bold=True)


# -- Samba: a share on loopback, served by smbd and mounted through FUSE (tests/smb.py) ------------


@pytest.fixture
def samba(tmp_path: Path) -> Iterator[Any]:
    """A Samba server of this test with an empty share; missing Samba: a skip, a failure in CI."""
    from .smb import SambaUnavailable, skip_or_fail, start_share

    try:
        server = start_share(tmp_path / "smb")
    except SambaUnavailable as exc:
        skip_or_fail(exc)
    yield server
    server.close()


@pytest.fixture
def smb_mount(samba: Any, tmp_path: Path) -> Iterator[Any]:
    """The share mounted through smbnetfs as the daemon's user would mount it."""
    from .smb import SmbMount

    mount = SmbMount(samba, tmp_path / "smb-home", tmp_path / "smb-mnt").mount()
    yield mount
    mount.unmount(lazy=True)
