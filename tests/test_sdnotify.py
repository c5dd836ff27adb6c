"""sd_notify against real unix datagram sockets, as systemd listens for them."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from konfuzio_watch.sdnotify import Notifier


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A socket bound in tmp_path, like systemd's /run/systemd/notify."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"konfuzio-watch-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        yield sock, "@" + name


def test_ready_status_stopping_watchdog_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    assert notifier.is_enabled
    assert notifier.ready()
    assert receive(sock) == "READY=1"
    assert notifier.status("3 pending, 10 done")
    assert receive(sock) == "STATUS=3 pending, 10 done"
    assert notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.stopping("stopping: 2 steps in hand")
    assert receive(sock) == "STOPPING=1\nSTATUS=stopping: 2 steps in hand"


def test_send_joins_fields_and_keeps_each_value_on_one_line(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    notifier = Notifier(address)

    assert notifier.send(READY=1, STATUS="line one\nline two", ERRNO=None)
    assert receive(sock) == "READY=1\nSTATUS=line one line two"
    assert notifier.send_raw("RELOADING=1\nMONOTONIC_USEC=123")
    assert receive(sock) == "RELOADING=1\nMONOTONIC_USEC=123"


def test_abstract_socket_address(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, address = abstract_listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    assert notifier.ready("watching /srv/scans/inbox")
    assert receive(sock) == "READY=1\nSTATUS=watching /srv/scans/inbox"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({})

    assert not notifier.is_enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval_s is None


def test_a_send_failure_is_logged_once_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))

    with caplog.at_level(logging.WARNING, logger="konfuzio_watch.sdnotify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False

    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


def test_watchdog_interval_is_half_the_period() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "60000000"})
    assert notifier.watchdog_interval_s == 30.0

    mine = Notifier.from_env({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval_s == 5.0


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"},  # meant for another process
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {},
    ],
)
def test_no_watchdog_interval_when_not_meant_for_us(env: dict[str, str]) -> None:
    assert Notifier.from_env(env).watchdog_interval_s is None
