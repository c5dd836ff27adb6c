"""Deliveries (issue 25), the parts without a server: the policy's answers, the webhook's headers, what a
move causes, and the sender's turn against a real journal with a scripted transport and a fake clock
(the real receiver is in test_delivery_e2e.py)."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import Any

import pytest

from konfuzio_watch import policy
from konfuzio_watch.config import parse_config
from konfuzio_watch.deliver_webhook import placed_path_header, retry_after_s
from konfuzio_watch.deliver_worker import Deliverer
from konfuzio_watch.delivery import Deliveries, Delivery, Sent, signature
from konfuzio_watch.gates import Gate
from konfuzio_watch.journal import Row, SqliteJournal, State
from konfuzio_watch.journal.outbox import DeliveryState
from konfuzio_watch.metrics import Metrics
from konfuzio_watch.policy import Blocked, Cause, Fail, Failure, Scope, Step

from .helpers import FakeClock

LIMITS = policy.Limits(base_s=1.0, cap_s=30.0)


@pytest.mark.parametrize(
    ("cause", "retry_after", "expected"),
    [
        (Cause.TRANSIENT, None, Blocked(Scope.RECEIVER, "the receiver does not take deliveries: x", None)),
        (Cause.UNAVAILABLE, 5.0, Blocked(Scope.RECEIVER, "the receiver does not take deliveries: x", 5.0)),
        (
            Cause.THROTTLED,
            600.0,
            Blocked(
                Scope.RECEIVER,
                "the receiver does not take deliveries: x",
                30.0,
                "Retry-After of 600 s cut to the backoff cap of 30 s",
            ),
        ),
        (Cause.INVALID, None, Fail("x")),
    ],
)
def test_the_policy_blocks_the_receiver_or_fails_the_delivery(cause: Cause, retry_after: float | None, expected: Any):
    failure = Failure(cause, "x", retry_after_s=retry_after)
    assert policy.decide(Step.DELIVER, failure, failures=99, now=0.0, limits=LIMITS) == expected


def test_signature_path_header_and_retry_after():
    assert signature(b"k", b"{}") == "sha256=" + hmac.new(b"k", b"{}", hashlib.sha256).hexdigest()
    done = Path("/srv/done")
    name = Path(os.fsdecode(b"/srv/done/sub/caf\xe9 \xff.pdf"))
    assert placed_path_header(name, (done, Path("/srv/failed"))) == "sub/caf%E9%20%FF.pdf"
    assert retry_after_s({"Retry-After": "7"}) == 7.0 and retry_after_s({}) is None
    assert retry_after_s({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert retry_after_s({"Retry-After": "soon"}) is None


# -- the sender's turn, against a real journal -------------------------------------------------------


class Scripted:
    """A transport that answers what the test says, and keeps what it was handed."""

    def __init__(self, name: str, *answers: Sent):
        self.name = name
        self.answers = list(answers)
        self.handed: list[Delivery] = []

    def send(self, delivery: Delivery) -> Sent:
        self.handed.append(delivery)
        return self.answers.pop(0) if self.answers else Sent(True, False, f"{self.name}: ok")


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    config = parse_config(
        {
            "konfuzio": {"token": "t", "project_id": 1},
            "folders": {n: str(tmp_path / n) for n in ("inbox", "done", "failed", "state")},
            "deliver": {"command": ["true"], "events": ["done", "revision", "failed"]},
        }
    )
    (tmp_path / "done").mkdir()
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    yield config, journal
    journal.close()


def placed(config: Any, journal: SqliteJournal, name: str, body: bytes, document_id: int = 7) -> tuple[Row, Path]:
    """A file moved to done with its JSON ``body`` and the delivery the move causes."""
    (row,) = journal.add_claims([name.encode()], 1.0)
    row = journal.transition(row, State.CLAIMED, 1.0)
    row = journal.start_upload(row, f"t-{name}", 1.0)
    row = journal.mark_uploaded(row, document_id, 1.0, poll_at=2.0)
    row = journal.transition(row, State.EXPORTING, 2.0)
    target = config.folders.done / name
    (target.parent / (name + ".json")).write_bytes(body)
    target.write_bytes(b"%PDF")
    caused = Deliveries(config.deliver, journal).placed(row, State.DONE, target.with_name(name + ".json"), target, body)
    assert [d.key for d in caused] == [f"{document_id}:1"]
    return journal.transition(row, State.DONE, 3.0, final_path=os.fsencode(target), deliveries=caused), target


def sender(config: Any, journal: SqliteJournal, clock: FakeClock, *transports: Scripted) -> Deliverer:
    gate = Gate(Scope.RECEIVER, LIMITS)
    return Deliverer(config, journal, gate, clock, Metrics(deliveries=True), list(transports))


def test_the_webhook_then_the_command_and_a_retry_runs_only_what_has_not_succeeded(setup: Any):
    config, journal = setup
    clock = FakeClock(10.0)
    placed(config, journal, "a.pdf", b'{"revision": 1}\n')
    webhook = Scripted("webhook", Sent(True, False, "HTTP 200"))
    command = Scripted("command", Sent(False, True, "exit 75"))
    deliverer = sender(config, journal, clock, webhook, command)
    assert deliverer.turn(clock.now()) == 0.0
    (d,) = journal.deliveries()
    assert (d.state, d.sent_by, d.attempts) == (DeliveryState.PENDING, {"webhook"}, 1)
    assert deliverer.gate.is_blocked and deliverer.turn(clock.now()) > 0, "the receiver's gate waits"
    clock.advance(5.0)
    assert deliverer.turn(clock.now()) == 0.0  # the probe: the oldest due delivery
    (d,) = journal.deliveries()
    assert d.state == DeliveryState.DELIVERED and len(webhook.handed) == 1 and len(command.handed) == 2
    assert webhook.handed[0].body == b'{"revision": 1}\n' and webhook.handed[0].key == "7:1"
    assert not deliverer.gate.is_blocked


def test_a_later_revision_supersedes_a_pending_one_and_a_changed_json_fails(setup: Any):
    config, journal = setup
    clock = FakeClock(10.0)
    row, target = placed(config, journal, "a.pdf", b'{"revision": 1}\n')
    json_path = target.with_name("a.pdf.json")
    json_path.write_bytes(b'{"revision": 2}\n')
    caused = Deliveries(config.deliver, journal).revised(row, json_path, target, b'{"revision": 2}\n', 2)
    journal.finish_refresh(row, 3.0, 4.0, revision=2, deliveries=caused)
    webhook = Scripted("webhook")
    deliverer = sender(config, journal, clock, webhook)
    deliverer.turn(clock.now())
    deliverer.turn(clock.now())
    first, second = journal.deliveries()
    assert (first.state, second.state) == (DeliveryState.SUPERSEDED, DeliveryState.DELIVERED)
    assert [(d.key, d.event, d.body) for d in webhook.handed] == [("7:2", "revision", b'{"revision": 2}\n')]
    # Someone edits a result before it went: the delivery fails and says why (never another body).
    _, other = placed(config, journal, "b.pdf", b'{"revision": 1}\n', document_id=8)
    other.with_name("b.pdf.json").write_bytes(b'{"edited": true}\n')
    deliverer.turn(clock.now())
    failed = journal.deliveries([DeliveryState.FAILED])
    assert [d.key for d in failed] == ["8:1"] and "changed by someone else" in (failed[0].error or "")
    assert len(webhook.handed) == 1


def test_a_refused_delivery_fails_with_the_receivers_answer(setup: Any):
    config, journal = setup
    clock = FakeClock(10.0)
    placed(config, journal, "a.pdf", b"{}\n")
    said: list[str] = []
    deliverer = sender(config, journal, clock, Scripted("webhook", Sent(False, False, "HTTP 410: gone")))
    deliverer.on_failed = lambda d, error: said.append(f"{d.key}: {error}")
    deliverer.turn(clock.now())
    (d,) = journal.deliveries()
    assert d.state == DeliveryState.FAILED and said == ["7:1: HTTP 410: gone"] and not deliverer.gate.is_blocked


def test_without_the_revision_event_a_pending_done_goes_with_the_new_revision(setup: Any):
    config, journal = setup
    config = parse_config(
        {
            "konfuzio": {"token": "t", "project_id": 1},
            "folders": {n: str(config.folders.state.parent / n) for n in ("inbox", "done", "failed", "state")},
            "deliver": {"command": ["true"]},
        }
    )
    row, target = placed(config, journal, "a.pdf", b"{}\n")
    deliveries = Deliveries(config.deliver, journal)
    assert [(d.event, d.key) for d in deliveries.revised(row, target, target, b"{2}", 2)] == [("done", "7:2")]
    (d,) = journal.deliveries()
    journal.delivery_done(d, 5.0)
    assert deliveries.revised(row, target, target, b"{3}", 3) == [], "delivered: a revision is not asked for"


def test_the_metrics_of_deliveries_only_with_a_deliver_section():
    from konfuzio_watch.metrics import Sample

    sample = Sample(deliveries={"pending": 3, "failed": 1, "delivered": 9})
    metrics = Metrics(lambda: sample, deliveries=True)
    metrics.delivery_outcome("delivered", 1.5)
    text = metrics.render().decode()
    for line in (
        "konfuzio_watch_deliveries_pending 3.0",
        "konfuzio_watch_deliveries_failed 1.0",
        'konfuzio_watch_deliveries_total{outcome="delivered"} 1.0',
        "konfuzio_watch_delivery_latency_seconds_count 1.0",
        'konfuzio_watch_blocked{scope="receiver"} 0.0',
    ):
        assert line in text, line
    plain = Metrics().render().decode()
    assert "deliver" not in plain and "receiver" not in plain


BASE = {
    "konfuzio": {"token": "t", "project_id": 1},
    "folders": {n: f"/srv/{n}" for n in ("inbox", "done", "failed", "state")},
}


@pytest.mark.parametrize(
    ("deliver", "message"),
    [
        ({"webhook": {"url": "https://erp.example.com/h"}}, "deliver.webhook.secret_file: required"),
        ({"webhook": {"secret_file": "s"}}, "deliver.webhook.url: required"),
        ({"webhook": {"url": "ftp://x", "secret_file": "s"}}, "deliver.webhook.url: expected an http(s) URL"),
        ({"webhook": {"url": "http://x", "secret_file": "s", "timeout": 3}}, "deliver.webhook.timeout: unknown key"),
        ({"webhook": "http://x"}, "deliver.webhook: expected a mapping"),
        ({"command": ["imp", "{json}", "{path}"]}, "deliver.command[2]: unknown placeholder {path}"),
        ({"command": ["imp"], "events": ["done", "moved"]}, "deliver.events[1]: unknown event 'moved'"),
        ({"command": ["imp"], "events": ["done", "done"]}, "deliver.events: lists an event twice"),
        ({"command": ["imp"], "command_timeout_seconds": 0}, "deliver.command_timeout_seconds: must be between"),
        ({"hook": {}}, "deliver.hook: unknown key"),
    ],
)
def test_a_deliver_mistake_is_one_line_naming_the_key(deliver: dict, message: str):
    from konfuzio_watch.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({**BASE, "deliver": deliver})


def test_the_deliver_section_as_the_issue_writes_it_and_check_reads_the_secret(tmp_path: Path):
    from konfuzio_watch.checks import _check_deliver

    raw = {
        "webhook": {"url": "https://erp.example.com/hooks/konfuzio", "secret_file": str(tmp_path / "secret")},
        "command": ["/bin/true", "{json}", "{file}"],
        "events": ["done", "failed", "revision"],
    }
    config = parse_config({**BASE, "deliver": raw})
    assert config.deliver.enabled and config.deliver.webhook.timeout_seconds == 30.0
    assert not parse_config(BASE).deliver.enabled
    assert parse_config({**BASE, "deliver": raw}, need_secrets=False).deliver.webhook.secret_file is None
    lines: list[tuple[bool, str, str]] = []
    _check_deliver(config, lambda ok, what, detail="", fix="": lines.append((ok, what, detail)))
    assert lines[0][:2] == (False, "deliver.webhook.secret_file") and "cannot read" in lines[0][2]
    assert lines[1] == (True, "deliver.command", "/bin/true")
    (tmp_path / "secret").write_bytes(b"s3cret\n")
    lines.clear()
    _check_deliver(config, lambda ok, what, detail="", fix="": lines.append((ok, what, detail)))
    assert lines[0] == (True, "deliver.webhook.secret_file", "6 bytes read (never shown)")
    assert config.deliver.secret() == b"s3cret"


def test_a_failed_file_put_back_by_retry_supersedes_its_pending_delivery(setup: Any):
    config, journal = setup
    clock = FakeClock(10.0)
    (config.folders.failed).mkdir()
    (row,) = journal.add_claims([b"bad.pdf"], 1.0)
    row = journal.transition(row, State.CLAIMED, 1.0)
    row = journal.transition(row, State.FAILING, 1.0, error="too big", stage="validate")
    target = config.folders.failed / "bad.pdf"
    caused = Deliveries(config.deliver, journal).placed(
        row, State.FAILED, target.with_name("bad.pdf.error.json"), target, b"{}\n"
    )
    assert [d.key for d in caused] == [f"failed:{row.id}"]
    row = journal.transition(row, State.FAILED, 2.0, final_path=os.fsencode(target), deliveries=caused)
    journal.transition(row, State.RETRIED, 3.0)  # `konfuzio-watch retry`: the .error.json is gone
    webhook = Scripted("webhook")
    sender(config, journal, clock, webhook).turn(clock.now())
    (d,) = journal.deliveries()
    assert d.state == DeliveryState.SUPERSEDED and "konfuzio-watch retry" in (d.error or "") and not webhook.handed
