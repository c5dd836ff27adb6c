"""Admin notifications: batching and thresholds on a fake clock, the message text as a table, and
end to end through apprise to a real SMTP server and a real HTTP receiver that fails for a while."""

from __future__ import annotations

import email
import email.policy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from konfuzio_watch.alert_messages import (
    MAX_LISTED,
    MAX_NOTES,
    Batch,
    FailedFile,
    Message,
    Note,
    NoteKind,
    build_message,
)
from konfuzio_watch.alert_sending import DeliveryError, check_urls
from konfuzio_watch.alerts import Alerts
from konfuzio_watch.config import AlertsConfig, ConfigError, parse_config
from konfuzio_watch.policy import Limits
from konfuzio_watch.samples import make_pdf

from .conftest import drop, wait_until
from .helpers import FakeClock

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
HOOK = "json://hooks.example.com/kw"
MAIL = "mailtos://user:s3cret-pass@smtp.example.com?to=admin@example.com"


@dataclass
class FakeSender:
    """Records what would be sent; raises for the URLs in ``down`` (with the given reason)."""

    sent: list[tuple[str, Message]] = field(default_factory=list)
    attempts: list[tuple[str, float]] = field(default_factory=list)
    down: dict[str, str] = field(default_factory=dict)
    clock: FakeClock | None = None

    def __call__(self, url: str, message: Message) -> None:
        self.attempts.append((url, self.clock.now() if self.clock else 0.0))
        if url in self.down:
            raise DeliveryError(self.down[url])
        self.sent.append((url, message))

    def to(self, url: str) -> list[Message]:
        return [m for u, m in self.sent if u == url]


def make(clock: FakeClock, sender: FakeSender, urls: tuple[str, ...] = (HOOK,), **settings: Any) -> Alerts:
    sender.clock = clock
    config = AlertsConfig(urls=urls, **settings)
    return Alerts(
        config, clock=clock, sender=sender, host="scan01", tz=UTC, gather_s=5, retry=Limits(base_s=10, cap_s=60)
    )


def run_until(alerts: Alerts, clock: FakeClock, until: float, step: float = 1.0) -> None:
    """Drive the worker's step on the test's thread, one fake second at a time."""
    while clock.t < until:
        clock.t = min(until, clock.t + step)
        alerts.pump(clock.t)


# -- batching, intervals, thresholds (fake clock, fake sender) -------------------------------------


def test_a_burst_of_10000_failures_is_one_message_naming_some_and_counting_the_rest():
    clock, sender = FakeClock(T0), FakeSender()
    alerts = make(clock, sender)
    for i in range(10_000):
        alerts.file_failed(f"in/{i:05}.pdf", "upload", "HTTP 413 Payload Too Large", T0)
    held = alerts._incoming
    assert len(held.files) == MAX_LISTED and held.more_files == 10_000 - MAX_LISTED  # bounded memory
    assert alerts.pump(T0) == T0 + 5  # waits for the rest of the burst
    assert sender.sent == []
    run_until(alerts, clock, T0 + 300)
    assert len(sender.sent) == 1
    message = sender.sent[0][1]
    assert message.title == "10,000 files failed — konfuzio-watch on scan01"
    assert message.body.count("\n- in/") == MAX_LISTED
    assert "- and 9,980 more (all 10,000 by stage: upload 10,000)" in message.body


def test_at_most_one_message_per_interval_and_what_comes_between_is_batched():
    clock, sender = FakeClock(T0), FakeSender()
    alerts = make(clock, sender, min_interval_seconds=60)
    alerts.file_failed("a.pdf", "upload", "boom", T0)
    run_until(alerts, clock, T0 + 5)
    assert [m.title for m in sender.to(HOOK)] == ["1 file failed — konfuzio-watch on scan01"]
    clock.t = T0 + 10
    alerts.file_failed("b.pdf", "results", "bad", clock.t)
    alerts.file_failed("c.pdf", "results", "bad", clock.t)
    assert alerts.pump(clock.t) == T0 + 65  # the interval counts from the last message
    run_until(alerts, clock, T0 + 64)
    assert len(sender.sent) == 1
    run_until(alerts, clock, T0 + 65)
    assert len(sender.sent) == 2
    body = sender.sent[1][1].body
    assert "- b.pdf (results, 2023-11-14 22:13:30 UTC): bad" in body and "c.pdf" in body and "a.pdf" not in body
    assert alerts.pump(clock.t) is None  # nothing left


def test_blocked_is_told_once_when_it_starts_and_once_when_it_ends():
    clock, sender = FakeClock(T0), FakeSender()
    alerts = make(clock, sender)
    alerts.blocked("Konfuzio rejected the API token (HTTP 401)")
    alerts.blocked("Konfuzio rejected the API token (HTTP 401)")
    alerts.blocked("disk full on /var/lib/konfuzio-watch")  # still the same outage: not news
    run_until(alerts, clock, T0 + 1000)
    alerts.blocked("again")
    run_until(alerts, clock, T0 + 2000)
    assert [m.title for m in sender.to(HOOK)] == [
        "stopped working: Konfuzio rejected the API token (HTTP 401) — konfuzio-watch on scan01"
    ]
    assert sender.sent[0][1].level == "failure"
    alerts.unblocked()
    alerts.unblocked()
    run_until(alerts, clock, T0 + 3000)
    assert len(sender.sent) == 2
    message = sender.sent[1][1]
    assert message.title == "working again — konfuzio-watch on scan01"
    assert message.level == "success"
    assert "was stopped for 33m: Konfuzio rejected the API token (HTTP 401)" in message.body


def test_a_short_outage_within_one_batch_is_one_message_saying_both():
    clock, sender = FakeClock(T0), FakeSender()
    alerts = make(clock, sender)
    alerts.blocked("disk full on /srv")
    clock.t += 2
    alerts.unblocked()
    run_until(alerts, clock, T0 + 100)
    assert len(sender.sent) == 1
    body = sender.sent[0][1].body
    assert "Stopped working at 2023-11-14 22:13:20 UTC: disk full on /srv" in body
    assert "Working again since 2023-11-14 22:13:22 UTC (was stopped for 2s: disk full on /srv)" in body
    assert "What to do" not in body  # nothing left to do


@pytest.mark.parametrize(
    ("limit", "ages", "alerted_at"),
    [
        (3600, [10, 3599, 3600, 5000, 7000], [3600]),
        (3600, [4000, 5000, 100, 200, 3700, None, 3800], [4000, 3700, 3800]),  # None: nothing pending
        (3600, [None, 0, 3599.9], []),
        (0, [10, 100_000, 10, 100_000], []),  # 0: never
    ],
)
def test_oldest_pending_alerts_when_crossing_and_again_only_after_dropping_below(limit, ages, alerted_at):
    clock, sender = FakeClock(T0), FakeSender()
    alerts = make(clock, sender, min_interval_seconds=1, oldest_pending_seconds=limit)
    for age in ages:
        alerts.oldest_pending(age, "scans/stuck.pdf")
        run_until(alerts, clock, clock.t + 10)
    told = [m for _, m in sender.sent]
    assert len(told) == len(alerted_at)
    for message, age in zip(told, alerted_at, strict=True):
        assert message.level == "warning"
        assert f"has waited {age // 60}m" in message.title and "scans/stuck.pdf" in message.body


def test_callbacks_not_arriving_is_told_once_per_condition():
    clock, sender = FakeClock(T0), FakeSender()
    alerts = make(clock, sender, min_interval_seconds=1)
    for _ in range(3):
        alerts.callbacks_not_arriving("https://scans.example.com/konfuzio-callback")
        run_until(alerts, clock, clock.t + 10)
    assert len(sender.sent) == 1
    alerts.callbacks_arriving()  # they came back: a later outage is news again
    alerts.callbacks_not_arriving("https://scans.example.com/konfuzio-callback")
    run_until(alerts, clock, clock.t + 10)
    alerts.callbacks_not_arriving("https://new-tunnel.example.com/konfuzio-callback")  # another URL
    run_until(alerts, clock, clock.t + 10)
    assert [m.title for _, m in sender.sent] == ["callbacks do not arrive — konfuzio-watch on scan01"] * 3
    assert "new-tunnel.example.com" in sender.sent[2][1].body


def test_a_failing_destination_backs_off_logs_once_and_loses_nothing(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="konfuzio_watch.alerts")
    clock, sender = FakeClock(T0), FakeSender()
    alerts = make(clock, sender, urls=(HOOK, MAIL), min_interval_seconds=30)
    sender.down[MAIL] = "Connection refused by smtp.example.com (password s3cret-pass)"
    alerts.file_failed("a.pdf", "upload", "boom", T0)
    run_until(alerts, clock, T0 + 100)
    alerts.blocked("disk full on /srv")
    run_until(alerts, clock, T0 + 200)
    tried = [round(t - T0) for url, t in sender.attempts if url == MAIL]
    assert tried == [5, 15, 35, 75, 135, 195]  # 10, 20, 40, then capped at 60
    assert len(sender.to(HOOK)) == 2  # the working destination is neither held up nor repeated
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "cannot send to mailtos://user:****@smtp.example.com" in text and "Connection refused" in text
    assert "s3cret" not in caplog.text

    del sender.down[MAIL]
    run_until(alerts, clock, T0 + 300)
    (delivered,) = sender.to(MAIL)
    assert delivered.title == "stopped working: disk full on /srv; 1 file failed — konfuzio-watch on scan01"
    assert "a.pdf" in delivered.body
    assert len(sender.to(HOOK)) == 2
    assert [r.levelno for r in caplog.records if "works again (after 6" in r.getMessage()] == [logging.INFO]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_what_a_down_destination_holds_stays_bounded_and_says_what_it_dropped():
    clock, sender = FakeClock(T0), FakeSender(down={HOOK: "HTTP 500"})
    alerts = make(clock, sender, min_interval_seconds=1)
    for i in range(500):
        alerts.file_failed(f"f{i}.pdf", "upload" if i % 2 else "results", "boom", clock.t)
        alerts.callbacks_not_arriving(f"https://t{i}.example.com/cb")
        run_until(alerts, clock, clock.t + 1)
    held = alerts._destinations[next(iter(alerts._destinations))].pending
    assert len(held.files) == MAX_LISTED and len(held.notes) == MAX_NOTES
    del sender.down[HOOK]
    run_until(alerts, clock, clock.t + 120)
    (message,) = sender.to(HOOK)
    assert "500 files failed" in message.title
    assert f"- and {500 - MAX_LISTED} more (all 500 by stage: results 250, upload 250)" in message.body
    assert f"({500 - MAX_NOTES} further changes of state are not shown.)" in message.body


def test_the_clock_going_back_does_not_hold_messages_back():
    clock, sender = FakeClock(T0), FakeSender()
    alerts = make(clock, sender, min_interval_seconds=600)
    alerts.file_failed("a.pdf", "upload", "boom")
    run_until(alerts, clock, T0 + 10)
    clock.t = T0 - 3600  # a clock set back by an hour
    alerts.file_failed("b.pdf", "upload", "boom")
    run_until(alerts, clock, clock.t + 700)  # at most one interval, not the hour it went back
    assert len(sender.sent) == 2


def test_without_urls_nothing_is_kept_and_no_thread_starts():
    alerts = Alerts(AlertsConfig(), sender=FakeSender())
    assert not alerts.enabled
    alerts.start()
    alerts.file_failed("a.pdf", "upload", "boom")
    alerts.blocked("x")
    alerts.oldest_pending(10**9, "a.pdf")
    assert not alerts._incoming
    assert alerts.close(1) is True
    assert not [t for t in threading.enumerate() if t.name == "alerts"]


def test_urls_file_is_read_when_sending_so_a_new_password_applies(tmp_path: Path):
    urls_file = tmp_path / "alert-urls"
    urls_file.write_text("# admin mail\nmailtos://user:old@smtp.example.com?to=a@example.com\n\n")
    clock, sender = FakeClock(T0), FakeSender()
    alerts = Alerts(
        AlertsConfig(urls_file=urls_file, min_interval_seconds=1), clock=clock, sender=sender, host="scan01", gather_s=0
    )
    alerts.file_failed("a.pdf", "upload", "boom")
    alerts.pump(clock.t)
    urls_file.write_text("mailtos://user:new@smtp.example.com?to=a@example.com\n")
    clock.t += 10
    alerts.file_failed("b.pdf", "upload", "boom")
    alerts.pump(clock.t)
    assert [u for u, _ in sender.sent] == [
        "mailtos://user:old@smtp.example.com?to=a@example.com",
        "mailtos://user:new@smtp.example.com?to=a@example.com",
    ]


# -- the message (pure) ---------------------------------------------------------------------------


def batch_of(*facts: FailedFile | Note) -> Batch:
    batch = Batch()
    for fact in facts:
        if isinstance(fact, FailedFile):
            batch.add_file(fact, fact.when)
        else:
            batch.add_note(fact, fact.when)
    return batch


@pytest.mark.parametrize(
    ("facts", "name", "title", "level", "in_body"),
    [
        (
            [FailedFile("in/a.pdf", "upload", "HTTP 413 Payload Too Large", T0)],
            None,
            "1 file failed — konfuzio-watch on scan01",
            "failure",
            [
                "1 file failed; each is in failed/ with a .error.json that says why:",
                "- in/a.pdf (upload, 2023-11-14 22:13:20 UTC): HTTP 413 Payload Too Large",
                "What to do: `konfuzio-watch status -c /etc/kw.yaml` lists them; once the cause is fixed, "
                "`konfuzio-watch retry -c /etc/kw.yaml --all-failed` puts them through again.",
            ],
        ),
        (
            [FailedFile("a.pdf", "upload", "x", T0), FailedFile("b.pdf", "results", "y", T0 + 1)],
            "Accounting",
            "2 files failed — konfuzio-watch on scan01 (Accounting)",
            "failure",
            ["- b.pdf (results, 2023-11-14 22:13:21 UTC): y", "-- konfuzio-watch on scan01 (Accounting), "],
        ),
        (
            [Note(NoteKind.BLOCKED, T0, "Konfuzio rejected the API token (HTTP 401)")],
            None,
            "stopped working: Konfuzio rejected the API token (HTTP 401) — konfuzio-watch on scan01",
            "failure",
            [
                "No file is lost: new files wait in the inbox",
                "`konfuzio-watch status -c /etc/kw.yaml` shows what waits",
            ],
        ),
        (
            [Note(NoteKind.UNBLOCKED, T0, "disk full on /srv", 5400)],
            None,
            "working again — konfuzio-watch on scan01",
            "success",
            ["Working again since 2023-11-14 22:13:20 UTC (was stopped for 90m: disk full on /srv)"],
        ),
        (
            [Note(NoteKind.OLDEST, T0, "scans/x.pdf", 7300)],
            None,
            "a file has waited 2h — konfuzio-watch on scan01",
            "warning",
            ["The oldest pending file has waited 2h (more than alerts.oldest_pending_seconds)", "scans/x.pdf"],
        ),
        (
            [Note(NoteKind.CALLBACKS, T0, "https://scans.example.com/cb")],
            None,
            "callbacks do not arrive — konfuzio-watch on scan01",
            "warning",
            ["Konfuzio's callbacks do not arrive at https://scans.example.com/cb", "callback.public_url"],
        ),
        (
            [
                Note(NoteKind.CALLBACKS, T0, "https://x/cb"),
                FailedFile("a.pdf", "upload", "x", T0),
                Note(NoteKind.BLOCKED, T0, "disk full"),
            ],
            None,
            "stopped working: disk full; 1 file failed; callbacks do not arrive — konfuzio-watch on scan01",
            "failure",
            ["Stopped working at", "a.pdf", "https://x/cb"],
        ),
    ],
)
def test_message_text(facts, name, title, level, in_body):
    message = build_message(batch_of(*facts), host="scan01", name=name, now=T0 + 60, config_path="/etc/kw.yaml", tz=UTC)
    assert message.title == title
    assert message.level == level
    for text in in_body:
        assert text in message.body
    assert message.body.endswith("2023-11-14 22:14:20 UTC")


def test_long_and_multiline_errors_become_one_short_line():
    alerts = make(FakeClock(T0), FakeSender())
    alerts.file_failed("a.pdf", "upload", "Traceback:\n  line 1\n" + "x" * 1000)
    (failed,) = alerts._incoming.files
    assert "\n" not in failed.error and len(failed.error) == 300 and failed.error.endswith("…")


# -- config --------------------------------------------------------------------------------------

BASE = {
    "konfuzio": {"host": "http://127.0.0.1:1", "token": "t", "project_id": 1},
    "folders": {"inbox": "in", "done": "done", "failed": "failed", "state": "state"},
}


def test_alerts_config_defaults_and_env_expansion(tmp_path: Path):
    assert parse_config(BASE, base_dir=tmp_path).alerts == AlertsConfig()
    assert not AlertsConfig().enabled
    raw = {
        **BASE,
        "alerts": {
            "urls": ["json://hooks.example.com/kw", "mailtos://u:${SMTP_PW}@smtp.example.com"],
            "name": "Accounting",
            "min_interval_seconds": 30,
            "oldest_pending_seconds": 0,
        },
    }
    alerts = parse_config(raw, base_dir=tmp_path, environ={"SMTP_PW": "pw"}).alerts
    assert alerts.urls == ("json://hooks.example.com/kw", "mailtos://u:pw@smtp.example.com")
    assert alerts.min_interval_seconds == 30.0 and alerts.oldest_pending_seconds == 0 and alerts.enabled
    raw = {**BASE, "alerts": {"urls_file": "secrets/alert-urls"}}
    assert parse_config(raw, base_dir=tmp_path).alerts.urls_file == tmp_path / "secrets" / "alert-urls"


@pytest.mark.parametrize(
    ("alerts", "message"),
    [
        ({"urls": "json://a/b", "urls_file": "f"}, "alerts.urls and alerts.urls_file may not both be set"),
        ({"urls": [1]}, "alerts.urls: expected a list of strings, got [1]"),
        (
            {"urls": ["smtp.example.com:s3cret"]},
            "alerts.urls[0]: expected an apprise URL like mailtos://... or json://...",
        ),
        ({"min_interval_seconds": 0}, "alerts.min_interval_seconds: must be between 0.1 and 86400, got 0"),
        ({"min_interval_seconds": "1m"}, "alerts.min_interval_seconds: expected a number, got '1m'"),
        ({"oldest_pending_seconds": -1}, "alerts.oldest_pending_seconds: must be at least 0, got -1"),
        ({"name": ""}, "alerts.name: expected a non-empty string, got ''"),
        (
            {"url": "json://a/b"},
            "alerts.url: unknown key (known: min_interval_seconds, name, oldest_pending_seconds, urls, urls_file)",
        ),
    ],
)
def test_alerts_config_errors_are_one_line_naming_the_key(alerts, message):
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "alerts": alerts})
    assert str(info.value) == message


def test_urls_apprise_cannot_use_are_refused_naming_the_entry_never_the_secret(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        check_urls(AlertsConfig(urls=(HOOK, "nosuchservice://user:s3cret@host/x")))
    assert str(info.value) == "alerts.urls[1]: not a URL apprise can send to (nosuchservice://...)"
    urls_file = tmp_path / "alert-urls"
    with pytest.raises(ConfigError, match=r"^alerts.urls_file: cannot read .*alert-urls: No such file"):
        check_urls(AlertsConfig(urls_file=urls_file))
    urls_file.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match=r"^alerts.urls_file: no URL in "):
        check_urls(AlertsConfig(urls_file=urls_file))
    urls_file.write_text(f"{HOOK}\n\nbogus://s3cret\n")
    with pytest.raises(ConfigError, match=r"^alerts.urls_file line 3: not a URL apprise can send to"):
        Alerts(AlertsConfig(urls_file=urls_file)).start()
    assert check_urls(AlertsConfig(urls=(HOOK, MAIL))) == [
        "json://hooks.example.com/kw",
        "mailtos://user:****@smtp.example.com/admin%40example.com",
    ]


# -- end to end: apprise to a real SMTP server and a real HTTP receiver -----------------------------


class _SMTPController(Controller):
    """aiosmtpd's Controller, on port 0: it checks the server by connecting to ``self.port``."""

    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@pytest.fixture
def smtp_server() -> Iterator[tuple[_SMTPController, list[Any]]]:
    received: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received.append(envelope)
            return "250 OK"

    controller = _SMTPController(Handler(), hostname="127.0.0.1", port=0)
    controller.start()
    yield controller, received
    controller.stop()


@pytest.fixture
def started() -> Iterator[Callable[..., Alerts]]:
    running: list[Alerts] = []

    def start(*urls: str, **kwargs: Any) -> Alerts:
        settings = {"min_interval_seconds": 0.3, **kwargs.pop("settings", {})}
        alerts = Alerts(
            AlertsConfig(urls=urls, name="Accounting", **settings),
            host="scan01",
            **{"gather_s": 0.2, "retry": Limits(base_s=0.1, cap_s=0.4), **kwargs},
        )
        running.append(alerts.start())
        return alerts

    yield start
    for alerts in running:
        assert alerts.close(10)


@pytest.mark.slow
def test_a_mail_arrives_listing_the_failed_files(smtp_server, started):
    controller, received = smtp_server
    alerts = started(f"mailto://127.0.0.1:{controller.port}?from=kw@example.com&to=admin@example.com")
    alerts.file_failed("invoices/2025-11/a.pdf", "upload", "HTTP 413 Payload Too Large")
    alerts.file_failed("invoices/2025-11/b.pdf", "results", "Konfuzio could not read the document")
    wait_until(lambda: received, 10, "a mail at the SMTP server")
    (envelope,) = received
    assert envelope.mail_from == "kw@example.com" and envelope.rcpt_tos == ["admin@example.com"]
    mail = email.message_from_bytes(envelope.content, policy=email.policy.default)
    assert mail["Subject"] == "2 files failed — konfuzio-watch on scan01 (Accounting)"
    text = mail.get_content()
    assert "- invoices/2025-11/a.pdf (upload, " in text and "): HTTP 413 Payload Too Large" in text
    assert "- invoices/2025-11/b.pdf (results, " in text
    assert "`konfuzio-watch status` lists them" in text


@pytest.fixture
def daemon_log() -> Iterator[list[logging.LogRecord]]:
    """What reaches the root logger, i.e. the daemon's log (pytest's caplog also listens to
    loggers that do not propagate, such as apprise's once alerts has quieted it)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.slow
def test_a_webhook_that_fails_for_a_while_gets_everything_once_it_recovers(receiver, started, daemon_log):
    rec, server = receiver
    url = f"json://hook-user:s3cret@127.0.0.1:{server.port}/kw"
    alerts = started(url)
    alerts.file_failed("a.pdf", "upload", "boom")
    wait_until(lambda: rec.accepted(), 10, "the first POST")
    (first,) = rec.accepted()
    assert first["title"] == "1 file failed — konfuzio-watch on scan01 (Accounting)"
    assert first["type"] == "failure" and "- a.pdf (upload, " in first["message"]

    rec.status = 500
    alerts.blocked("disk full on /var/lib/konfuzio-watch")
    alerts.file_failed("late.pdf", "export", "No space left on device")
    wait_until(lambda: len(rec.posts) >= 4, 10, lambda: f"3 answers of 500 (posts: {len(rec.posts)})")
    rec.status = 200
    wait_until(lambda: len(rec.accepted()) >= 2, 10, "the held message after recovery")
    held = rec.accepted()[1]
    assert held["title"] == (
        "stopped working: disk full on /var/lib/konfuzio-watch; 1 file failed — konfuzio-watch on scan01 (Accounting)"
    )
    assert "- late.pdf (export, " in held["message"]
    assert alerts.close(5)
    assert len(rec.accepted()) == 2  # nothing sent twice
    assert {p["title"] for status, p in rec.posts[1:] if status == 500} == {held["title"]}  # held, retried

    warnings = [r.getMessage() for r in daemon_log if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # not one per attempt, and none of apprise's own
    assert "cannot send to json://hook-user:****@127.0.0.1" in warnings[0] and "error=500" in warnings[0]
    assert any("works again (after" in r.getMessage() for r in daemon_log if r.levelno == logging.INFO)
    assert not [r for r in daemon_log if "s3cret" in r.getMessage()]


@pytest.mark.slow
def test_callers_never_wait_for_a_hanging_destination_and_close_is_bounded(receiver, started, caplog):
    rec, server = receiver
    rec.hold = threading.Event()
    alerts = started(f"json://127.0.0.1:{server.port}/kw")
    alerts.blocked("Konfuzio rejected the API token (HTTP 401)")
    wait_until(lambda: server._has_work(), 10, "the worker's POST to be in flight")
    began = time.monotonic()
    for i in range(10_000):
        alerts.file_failed(f"f{i}.pdf", "upload", "boom")
        alerts.oldest_pending(float(i), f"f{i}.pdf")
    assert time.monotonic() - began < 2.0  # 20,000 calls while a send hangs (they only take a lock)
    began = time.monotonic()
    assert alerts.close(0.5) is False
    assert time.monotonic() - began < 1.5
    assert "alerts: still sending after 0.5 s" in caplog.text
    rec.hold.set()
    assert alerts.close(10) is True  # given time, the last flush sends what was held meanwhile
    assert [p["title"].split(" — ")[0] for p in rec.accepted()] == [
        "stopped working: Konfuzio rejected the API token (HTTP 401)",
        "10,000 files failed; a file has waited 60m",
    ]


def test_close_says_what_could_not_be_sent(caplog: pytest.LogCaptureFixture):
    sender = FakeSender(down={HOOK: "connection refused"})
    alerts = Alerts(AlertsConfig(urls=(HOOK,)), sender=sender, host="scan01").start()
    alerts.file_failed("a.pdf", "upload", "boom")
    alerts.blocked("disk full")
    assert alerts.close(5) is True
    assert len(sender.attempts) == 1  # one last try at once, without waiting for the interval
    assert (
        "alerts: stopped with notifications not sent (json://hooks.example.com/kw: 1 failed file and 1 change of state)"
    ) in caplog.text


@pytest.mark.slow
def test_the_mails_what_to_do_names_the_config_the_daemon_was_started_with(daemon_process, receiver, tmp_path):
    """`run -c config.yaml` in the config's folder: the mail is read elsewhere, so it names the whole path."""
    rec, server = receiver
    daemon = daemon_process(
        alerts={"urls": [f"json://127.0.0.1:{server.port}/kw"], "min_interval_seconds": 0.5},
        upload={"max_file_mb": 0.001},
    )
    daemon.config = Path("config.yaml")  # as the admin typed it, in tmp_path (the daemon's working folder)
    daemon.start()
    drop(tmp_path / "inbox" / "big.pdf", make_pdf(4, label="over 1 kB"))  # refused before any upload: failed/

    wait_until(rec.accepted, 20, lambda: f"an alert (log: {daemon.log.read_text()[-1500:]})")

    (message,) = rec.accepted()
    assert "- big.pdf (" in message["message"]
    config = tmp_path / "config.yaml"
    assert (
        f"What to do: `konfuzio-watch status -c {config}` lists them; once the cause is fixed, "
        f"`konfuzio-watch retry -c {config} --all-failed` puts them through again."
    ) in message["message"]
    assert daemon.terminate() == 0
