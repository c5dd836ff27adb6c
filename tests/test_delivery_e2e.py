"""Deliveries end to end (issue 25): the daemon, the emulator and the next system's webhook as a real
Waitress server (helpers.DeliveryReceiver) that checks every signature and that the file is placed when
it is called, and counts what it took per idempotency key.

Each test prints its figures (requests, 2xx per key, repeats): ``pytest -s`` shows them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
import requests

from konfuzio_watch.journal import State
from konfuzio_watch.journal.outbox import DeliveryState
from konfuzio_watch.policy import Scope
from konfuzio_watch.redeliver import redeliver
from konfuzio_watch.samples import make_pdf
from konfuzio_watch.status import print_status

from .conftest import drop, wait_until
from .helpers import KONFUZIO_WATCH, DeliveryReceiver, drop_batch

pytestmark = pytest.mark.slow  # every test starts the emulator, a receiver and a daemon

SECRET = b"webhook-secret-0123456789"


@pytest.fixture
def receiver_for(tmp_path: Path) -> Iterator[Callable[..., tuple[DeliveryReceiver, dict[str, Any]]]]:
    """A receiver on done/ and failed/ of tmp_path, and the ``deliver`` section that points at it."""
    made: list[DeliveryReceiver] = []
    (tmp_path / "secret").write_bytes(SECRET + b"\n")

    def make(**deliver: Any) -> tuple[DeliveryReceiver, dict[str, Any]]:
        rec = DeliveryReceiver(SECRET, tmp_path / "done", tmp_path / "failed").open()
        made.append(rec)
        webhook = {"url": rec.url, "secret_file": str(tmp_path / "secret"), "timeout_seconds": 1}
        return rec, {"webhook": {**webhook, **deliver.pop("webhook", {})}, **deliver}

    yield make
    for rec in made:
        rec.close()


def deliveries_of(journal: Any, state: DeliveryState | None = None) -> list[Any]:
    return journal.deliveries([state] if state else [])


def all_delivered(journal: Any, n: int) -> bool:
    found = deliveries_of(journal)
    return len(found) >= n and all(d.state == DeliveryState.DELIVERED for d in found)


def assert_bodies_as_placed(rec: DeliveryReceiver, done: Path, failed: Path) -> None:
    """Each body taken is the placed JSON's bytes as written: a failed file's .error.json; a done file's
    result of the revision its key names (compared byte for byte where done/ still holds that one)."""
    for d in rec.taken():
        placed = (failed if d.event == "failed" else done) / os.fsdecode(unquote_to_bytes(d.path))
        sidecar = placed.with_name(placed.name + (".error.json" if d.event == "failed" else ".json"))
        if d.event == "failed":
            assert d.body == sidecar.read_bytes()
            continue
        revision = int(d.key.split(":")[1])
        assert json.loads(d.body)["revision"] == revision, "a body of another revision"
        if json.loads(sidecar.read_bytes())["revision"] == revision:
            assert d.body == sidecar.read_bytes()


def test_every_file_is_delivered_through_500s_a_closed_port_and_a_slow_receiver(
    start_daemon: Callable[..., Any], receiver_for: Callable[..., Any]
):
    rec, deliver = receiver_for(webhook={"timeout_seconds": 0.5})
    rec.status = 500
    running = start_daemon(deliver=deliver)
    journal = running.daemon.journal
    files = drop_batch(running, 6, "first")
    running.wait_finished(6)
    wait_until(lambda: len(rec.got) >= 3, 20, "the receiver answered 500 a few times")
    assert running.daemon.gates[Scope.RECEIVER].is_blocked
    assert not rec.taken() and all(d.state == DeliveryState.PENDING for d in deliveries_of(journal))
    assert all(d.failures == 0 for d in deliveries_of(journal)), "a receiver that is down charges no delivery"

    rec.close()  # down: the port is closed
    tried = sum(d.attempts for d in deliveries_of(journal))
    wait_until(
        lambda: (
            sum(d.attempts for d in deliveries_of(journal)) >= tried + 2
            and any("cannot connect" in (d.error or "") for d in deliveries_of(journal))
        ),
        20,
        "tries against the closed port",
    )
    rec.status, rec.delay_s = 200, 1.5  # back, but slower than timeout_seconds: it takes what it answers late
    rec.open()
    wait_until(lambda: len(rec.taken()) >= 2, 20, "the slow receiver took deliveries the daemon gave up on")
    rec.delay_s = 0.0
    wait_until(lambda: all_delivered(journal, 6), 30, lambda: f"6 delivered: {deliveries_of(journal)}")
    files.update(drop_batch(running, 4, "second"))  # the receiver works now: each at once
    running.wait_finished(10)
    wait_until(lambda: all_delivered(journal, 10), 30, "10 delivered")

    keys = {f"{r.document_id}:1" for r in journal.rows([State.DONE])}
    assert len(keys) == 10
    rec.assert_each_once_signed_and_placed(keys, slow=True)
    assert_bodies_as_placed(rec, running.done, running.failed)
    repeats = sum(n - 1 for n in rec.per_key().values())
    slow_ones = sum(1 for d in rec.got if d.status == 200) - len(keys)
    assert repeats == slow_ones, "a repeat only where the daemon did not see the 2xx (the slow answers)"
    assert running.metric("deliveries_total", outcome="delivered") == 10
    assert running.metric("delivery_latency_seconds_count") == 10
    assert running.metric("deliveries_total", outcome="retried") >= 4
    assert not running.daemon.gates[Scope.RECEIVER].is_blocked
    print(f"\n500 / closed port / slow receiver: {rec.figures()}")


def test_kill_9_between_done_and_the_delivery_and_during_it_loses_nothing(
    daemon_process: Callable[..., Any], receiver_for: Callable[..., Any], tmp_path: Path
):
    rec, deliver = receiver_for()
    rec.close()  # down while the files reach done/
    daemon = daemon_process(deliver=deliver)
    daemon.start()
    for i in range(4):
        drop(tmp_path / "inbox" / f"k{i}.pdf", make_pdf(label=f"kill-{i}"))
    wait_until(
        lambda: daemon.journal("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'") == [(4,)],
        30,
        "4 files done, their deliveries pending",
    )
    daemon.kill9()  # between done and the delivery
    rec.open()
    daemon.start()
    wait_until(
        lambda: daemon.journal("SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'") == [(4,)],
        30,
        lambda: f"4 delivered after the restart: {daemon.log.read_text()[-2000:]}",
    )
    assert len(rec.taken()) == 4 and set(rec.per_key().values()) == {1}

    rec.hold = threading.Event()  # the next request is held until the daemon is killed
    drop(tmp_path / "inbox" / "held.pdf", make_pdf(label="held"))
    wait_until(rec.holding.is_set, 30, "a delivery in the receiver's hands")
    # A receiver that hangs holds no upload or result: the next file goes through to done/ meanwhile.
    drop(tmp_path / "inbox" / "meanwhile.pdf", make_pdf(label="meanwhile"))
    wait_until(lambda: (tmp_path / "done" / "meanwhile.pdf.json").is_file(), 30, "a file done while one is held")
    daemon.kill9()  # during the delivery: the receiver answers 200 to a daemon that is gone
    rec.hold.set()
    wait_until(lambda: len(rec.taken()) == 5, 10, "the held delivery answered")
    rec.hold = None
    daemon.start()
    wait_until(
        lambda: daemon.journal("SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'") == [(6,)],
        30,
        "the held delivery sent again after the restart (and the one behind it)",
    )
    ((held_key,),) = daemon.journal("SELECT key FROM deliveries WHERE CAST(file_path AS TEXT) LIKE '%/held.pdf'")
    assert rec.per_key()[held_key] == 2, "sent again with the same key: the receiver's guard"
    keys = {k for (k,) in daemon.journal("SELECT key FROM deliveries")}
    rec.assert_each_once_signed_and_placed(keys)
    assert sum(n - 1 for n in rec.per_key().values()) == 1, "the one repeat: the delivery cut by the kill"
    # `konfuzio-watch redeliver`, as an admin types it, while the daemon runs.
    cli = [*KONFUZIO_WATCH, "redeliver", "--config", str(daemon.config)]
    nothing = subprocess.run([*cli, "--all-failed"], capture_output=True, text=True, timeout=30)
    assert (nothing.returncode, nothing.stdout) == (0, "nothing to redeliver: no delivery has failed\n")
    again = subprocess.run([*cli, "k0.pdf"], capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "k0.pdf: delivery" in again.stdout and "sent again" in again.stdout
    wait_until(lambda: len(rec.taken()) == 8, 20, "k0.pdf sent again")
    assert subprocess.run(cli, capture_output=True, timeout=30).returncode == 2
    assert daemon.terminate() == 0
    print(f"\nkill -9 before and during a delivery, then one redeliver: {rec.figures()}")


def test_revisions_are_delivered_in_order_and_an_older_never_carries_a_newer_body(
    start_daemon: Callable[..., Any], receiver_for: Callable[..., Any], emulator: Any
):
    rec, deliver = receiver_for(events=["done", "revision"])
    running = start_daemon(deliver=deliver)
    journal = running.daemon.journal
    drop(running.inbox / "invoice.pdf", make_pdf(label="invoice"))
    running.wait_finished(1)
    wait_until(lambda: all_delivered(journal, 1), 20, "revision 1 delivered")
    (row,) = journal.rows([State.DONE])
    emu = emulator.url

    def review(value: str, revision: int) -> None:
        answer = requests.post(
            f"{emu}/emulator/documents/{row.document_id}/review",
            json={"changes": {"Invoice Number": value}, "reviewer": "anna@example.com"},
            timeout=5,
        )
        assert answer.status_code == 200, answer.text
        wait_until(lambda: journal.get(row.id).revision >= revision, 20, f"revision {revision} in done/")

    review("INV-2", 2)
    wait_until(lambda: all_delivered(journal, 2), 20, "revision 2 delivered")
    rec.status = 500  # the receiver is down while two more revisions come
    review("INV-3", 3)
    review("INV-4", 4)
    wait_until(lambda: len(deliveries_of(journal)) == 4, 10, "revisions 3 and 4 in the outbox")
    rec.status = 200
    wait_until(lambda: all(d.state != DeliveryState.PENDING for d in deliveries_of(journal)), 20, "the outbox empties")
    states = {d.key: d.state for d in deliveries_of(journal)}
    doc = row.document_id
    assert states == {
        f"{doc}:1": "delivered",
        f"{doc}:2": "delivered",
        f"{doc}:3": "superseded",  # its body was replaced by revision 4's before it could go
        f"{doc}:4": "delivered",
    }
    taken = [d.key for d in rec.taken()]
    assert taken == [f"{doc}:1", f"{doc}:2", f"{doc}:4"], "in order, each once"
    assert [d.event for d in rec.taken()] == ["done", "revision", "revision"]
    assert_bodies_as_placed(rec, running.done, running.failed)
    rec.assert_each_once_signed_and_placed({f"{doc}:1", f"{doc}:2", f"{doc}:4"})
    assert running.metric("deliveries_total", outcome="superseded") == 1
    print(f"\nrevisions: {rec.figures()}; superseded 1")


def test_failed_files_are_delivered_and_a_refused_delivery_is_sent_again_by_redeliver(
    start_daemon: Callable[..., Any], receiver_for: Callable[..., Any], receiver: Any
):
    rec, deliver = receiver_for(events=["done", "failed"])
    rec.status = 410  # the receiver refuses: the deliveries fail (no retry)
    admin, server = receiver  # the admin's notifications (apprise json://)
    alerts = {"urls": [f"json://127.0.0.1:{server.port}/kw"], "min_interval_seconds": 0.5}
    running = start_daemon(deliver=deliver, upload={"max_file_mb": 0.01}, alerts=alerts)
    journal = running.daemon.journal
    drop(running.inbox / "big.pdf", make_pdf(label="big", pages=60))  # over the size cap: failed/
    drop(running.inbox / "small.pdf", make_pdf(label="small"))
    running.wait_finished(2)
    wait_until(lambda: len(deliveries_of(journal, DeliveryState.FAILED)) == 2, 20, "both deliveries failed")
    (failed_row,) = journal.rows([State.FAILED])
    keys = {d.key for d in deliveries_of(journal)}
    assert f"failed:{failed_row.id}" in keys and len(keys) == 2
    out = StringIO()
    print_status(running.config, show_all=False, now=time.time(), out=out)
    assert "failed 2" in out.getvalue() and "HTTP 410" in out.getvalue(), out.getvalue()
    told = lambda: " ".join(m["message"] for m in admin.accepted())  # noqa: E731
    wait_until(lambda: "small.pdf (deliver, " in told(), 20, lambda: f"the admin told: {told()}")

    rec.status = 200
    messages, unmatched = redeliver(running.config, [], True, now=time.time())
    assert unmatched == 0 and len(messages) == 2
    wait_until(lambda: all_delivered(journal, 2), 20, "both sent again and delivered")
    failed = [d for d in rec.taken() if d.event == "failed"]
    assert [d.key for d in failed] == [f"failed:{failed_row.id}"]
    assert json.loads(failed[0].body)["stage"] == failed_row.stage
    # A delivered file named by its path in done/: sent again, with its key.
    messages, unmatched = redeliver(running.config, ["small.pdf"], False, now=time.time())
    assert unmatched == 0 and "will be sent again" in messages[0]
    wait_until(lambda: len(rec.taken()) == 3 and all_delivered(journal, 2), 20, "sent again")
    rec.assert_each_once_signed_and_placed(keys)
    assert_bodies_as_placed(rec, running.done, running.failed)
    assert sorted(rec.per_key().values()) == [1, 2]
    print(f"\nfailed files and redeliver: {rec.figures()}")


COMMAND = """
import os, sys
json_path, file_path, key = sys.argv[1:4]
log = os.path.join(os.path.dirname(sys.argv[0]), "command.log")
with open(log, "a") as f:
    f.write(f"{key} {os.environ['KONFUZIO_WATCH_EVENT']} {os.path.isfile(json_path)} {os.path.isfile(file_path)}\\n")
marker = os.path.join(os.path.dirname(sys.argv[0]), "tried-" + key.replace(":", "-"))
if not os.path.exists(marker):
    open(marker, "w").close()
    print("the ERP is busy", file=sys.stderr)
    sys.exit(75)
"""


def test_the_webhook_then_the_command_and_a_retry_runs_only_the_command(
    start_daemon: Callable[..., Any], receiver_for: Callable[..., Any], tmp_path: Path
):
    script = tmp_path / "bin" / "import-result.py"
    script.parent.mkdir()
    script.write_text(COMMAND)
    rec, deliver = receiver_for(command=[sys.executable, str(script), "{json}", "{file}", "{key}"])
    running = start_daemon(deliver=deliver)
    journal = running.daemon.journal
    files = drop_batch(running, 3, "both")
    running.wait_finished(3)
    wait_until(lambda: all_delivered(journal, 3), 30, lambda: f"3 delivered: {deliveries_of(journal)}")
    keys = {d.key for d in deliveries_of(journal)}
    assert {d.sent for d in deliveries_of(journal)} == {"command,webhook"}
    rec.assert_each_once_signed_and_placed(keys)
    assert set(rec.per_key().values()) == {1}, "the command's retry did not post again"
    runs = (script.parent / "command.log").read_text().split("\n")[:-1]
    assert sorted(runs) == sorted(f"{k} done True True" for k in keys for _ in range(2)), runs
    assert len(files) == 3
    print(f"\nwebhook + command (exit 75 once each): {rec.figures()}; command runs {len(runs)}")


def test_without_a_deliver_section_no_statement_touches_the_outbox(start_daemon: Callable[..., Any]):
    """Nothing configured, nothing paid: a file's whole life writes not one statement more (the move to
    done stays one UPDATE of its own), and nothing reads or writes the outbox."""
    running = start_daemon()
    journal = running.daemon.journal
    written: list[str] = []
    journal._db.set_trace_callback(written.append)
    read: list[str] = []
    journal._reader.set_trace_callback(read.append)
    try:
        drop_batch(running, 2, "plain")
        running.wait_finished(2)
    finally:
        journal._db.set_trace_callback(None)
        journal._reader.set_trace_callback(None)
    assert running.daemon.deliverer is None
    assert not [s for s in written + read if "deliveries" in s]
    to_done = [i for i, s in enumerate(written) if s.startswith("UPDATE files SET") and "'done'" in s]
    assert len(to_done) == 2 and all(not written[i - 1].startswith("BEGIN") for i in to_done), "one statement"
