"""Shutdown is bounded: SIGTERM waits for the steps in hand up to service.stop_timeout_seconds, then exits."""

from __future__ import annotations

import signal
import time

import pytest
import yaml

from konfuzio_watch.cli import main
from konfuzio_watch.samples import make_pdf

from .conftest import TOKEN, drop, wait_until
from .helpers import DaemonProcess

pytestmark = pytest.mark.slow  # every test starts the daemon against the emulator

STOP_TIMEOUT_S = 2


def test_sigterm_with_the_api_hanging_exits_within_the_stop_timeout(tmp_path, emulator):
    emulator.knobs.upload_latency_s = 30  # the upload POST hangs far longer than the stop timeout
    daemon = DaemonProcess(
        tmp_path, emulator, service={"stop_timeout_seconds": STOP_TIMEOUT_S}, konfuzio={"timeout_seconds": 60}
    )
    daemon.start()
    assert daemon.proc
    drop(tmp_path / "inbox" / "stuck.pdf", make_pdf(label="stuck"))
    wait_until(lambda: daemon.journal("SELECT state FROM files") == [("uploading",)], 30, "stuck.pdf uploading")

    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = daemon.proc.wait(STOP_TIMEOUT_S + 10)
    took = time.monotonic() - started

    log = daemon.log.read_text()
    assert code == 0, log[-2000:]
    assert STOP_TIMEOUT_S - 0.5 <= took < STOP_TIMEOUT_S + 4, f"stopped after {took:.1f} s"
    assert (
        f"stopping: cut off after {STOP_TIMEOUT_S} s: 1 upload(s) in flight (stuck.pdf); start-up will reconcile them"
    ) in log
    assert "Traceback" not in log
    assert daemon.journal("SELECT state FROM files") == [("uploading",)], "the journal row is what start-up reconciles"
    assert emulator.uploads == [], "the upload was still in flight when the daemon exited"


def test_a_drain_within_the_stop_timeout_is_clean(tmp_path, emulator):
    emulator.knobs.upload_latency_s = 1.0
    daemon = DaemonProcess(tmp_path, emulator, service={"stop_timeout_seconds": 10})
    daemon.start()
    assert daemon.proc
    drop(tmp_path / "inbox" / "slow.pdf", make_pdf(label="slow"))
    wait_until(lambda: daemon.journal("SELECT state FROM files") == [("uploading",)], 30, "slow.pdf uploading")
    assert daemon.terminate() == 0
    log = daemon.log.read_text()
    assert "cut off" not in log and log.rstrip().endswith("stopped")
    assert daemon.journal("SELECT state FROM files") == [("uploaded",)], "the step in hand was finished"


@pytest.mark.parametrize("value", [0, -1, 85, 90])
def test_stop_timeout_out_of_range_is_one_line(tmp_path, emulator, capsys, value):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "konfuzio": {"host": emulator.url, "token": TOKEN, "project_id": 1},
                "folders": {name: str(tmp_path / name) for name in ("inbox", "done", "failed", "state")},
                "service": {"stop_timeout_seconds": value},
            }
        )
    )
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "konfuzio-watch: service.stop_timeout_seconds: must be more than 0 and less than 85 (systemd "
        f"stops the service with TimeoutStopSec=90), got {value}\n"
    )
