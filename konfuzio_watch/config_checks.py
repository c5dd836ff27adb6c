"""The config's checks across fields and ranges, after every value has its type; each message names
the keys it is about."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from . import layout
from .config_sections import (
    DELIVER_EVENTS,
    STOP_TIMEOUT_LIMIT_S,
    AlertsConfig,
    Config,
    ConfigError,
    DeliverConfig,
    JournalConfig,
    NodeConfig,
    ResultsConfig,
)


def check_config(config: Config, need_secrets: bool = True) -> None:
    k, f, w, c, u, r = (config.konfuzio, config.folders, config.watch, config.callback, config.upload, config.results)
    if need_secrets and not (k.token or k.token_file):
        raise ConfigError("konfuzio.token: required (or konfuzio.token_file)")
    if k.token and k.token_file:
        raise ConfigError("konfuzio.token and konfuzio.token_file may not both be set")
    _check_url("konfuzio.host", k.host)
    if c.public_url is not None:
        _check_url("callback.public_url", c.public_url)
    if k.project_id <= 0:
        raise ConfigError(f"konfuzio.project_id: must be a positive integer, got {k.project_id}")
    ranges = [  # (key, value, low, high): inclusive bounds; None = unbounded
        ("watch.settle_seconds", w.settle_seconds, 0, None),
        ("watch.poll_interval", w.poll_interval, 0.1, None),
        ("watch.rescan_interval", w.rescan_interval, 0.1, None),
        ("upload.concurrency", u.concurrency, 1, 64),
        ("upload.max_attempts", u.max_attempts, 1, None),
        ("upload.max_file_mb", u.max_file_mb, 0.001, None),
        ("upload.reconcile_window_seconds", u.reconcile_window_seconds, 0, None),
        ("upload.backoff_base_seconds", u.backoff_base_seconds, 0.01, None),
        ("upload.backoff_cap_seconds", u.backoff_cap_seconds, u.backoff_base_seconds, None),
        ("results.callback_timeout", r.callback_timeout, 0, None),
        ("results.poll_interval", r.poll_interval, 0.1, None),
        ("results.workers", r.workers, 1, 64),
        ("results.max_failures", r.max_failures, 1, None),
        ("results.first_poll_seconds", r.first_poll_seconds, 0.1, None),
        ("callback.port", c.port, 0, 65535),
        ("callback.max_body_kb", c.max_body_kb, 1, 10240),
    ]
    _check_ranges(ranges)
    if need_secrets and config.ngrok.enabled and not (config.ngrok.authtoken or config.ngrok.authtoken_file):
        raise ConfigError("ngrok.authtoken: required when ngrok.enabled (or ngrok.authtoken_file)")
    if u.on_duplicate not in ("process", "fail"):
        raise ConfigError(f"upload.on_duplicate: expected 'process' or 'fail', got {u.on_duplicate!r}")
    _check_alerts(config.alerts)
    _check_monitor_and_service(config)
    _check_results(r)
    _check_journal(config.journal, config.node)
    _check_deliver(config.deliver, need_secrets)
    if not re.fullmatch(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*", c.path.strip("/")):
        raise ConfigError(f"callback.path: must be a URL path like 'konfuzio-callback', got {c.path!r}")
    # done/ and failed/ may live inside the inbox (they are then ignored by the watcher), but
    # the inbox inside one of them would feed the daemon its own output.
    pairs = [
        ("folders.done", f.done, "folders.failed", f.failed),
        ("folders.inbox", f.inbox, "folders.done", f.done),
        ("folders.inbox", f.inbox, "folders.failed", f.failed),
    ]
    for key_a, a, key_b, b in pairs:
        if a == b or b in a.parents or (key_a != "folders.inbox" and a in b.parents):
            raise ConfigError(f"{key_a} and {key_b} must be separate folders ({key_a} may not be inside {key_b})")


OUTPUTS = ("json", "searchable_pdf")


def _check_results(r: ResultsConfig) -> None:
    for index, output in enumerate(r.outputs):
        if output not in OUTPUTS:
            raise ConfigError(f"results.outputs[{index}]: unknown output {output!r} (known: {', '.join(OUTPUTS)})")
    if "json" not in r.outputs:
        raise ConfigError("results.outputs: must include json (the result file; searchable_pdf comes with it)")
    if len(set(r.outputs)) != len(r.outputs):
        raise ConfigError("results.outputs: lists an output twice")
    try:
        layout.validate(r.layout)
    except ValueError as exc:
        raise ConfigError(f"results.layout: {exc}") from None


def _check_alerts(a: AlertsConfig) -> None:
    if a.urls and a.urls_file:
        raise ConfigError("alerts.urls and alerts.urls_file may not both be set")
    # An apprise URL carries passwords: the message names the entry, never shows it. Whether
    # apprise knows the scheme is checked by alerts.read_urls (apprise is slow to import).
    for index, url in enumerate(a.urls):
        if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://.", url):
            raise ConfigError(f"alerts.urls[{index}]: expected an apprise URL like mailtos://... or json://...")
    _check_ranges(
        [
            ("alerts.min_interval_seconds", a.min_interval_seconds, 0.1, 86400),
            ("alerts.oldest_pending_seconds", a.oldest_pending_seconds, 0, None),
        ]
    )


def _check_ranges(ranges: list[tuple[str, float | None, float, float | None]]) -> None:
    """(key, value, low, high), inclusive, None: unbounded; the message states the range."""
    for key, value, low, high in ranges:
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise ConfigError(f"{key}: must be {bounds}, got {value:g}")


def _check_monitor_and_service(config: Config) -> None:
    m, stop = config.monitor, config.service.stop_timeout_seconds
    if not 0 <= m.port <= 65535:
        raise ConfigError("monitor.port: out of range")
    if m.enabled and m.port and m.port == config.callback.port:
        raise ConfigError(f"monitor.port: must differ from callback.port ({m.port}): the monitor is not public")
    if not 0 < stop < STOP_TIMEOUT_LIMIT_S:
        raise ConfigError(
            f"service.stop_timeout_seconds: must be more than 0 and less than {STOP_TIMEOUT_LIMIT_S:g} "
            f"(systemd stops the service with TimeoutStopSec=90), got {stop:g}"
        )


def _check_journal(j: JournalConfig, node: NodeConfig) -> None:
    if j.url is None:
        if j.password_file is not None:
            raise ConfigError("journal.password_file: set journal.url too (without it the journal is SQLite)")
    else:
        parts = urlsplit(j.url)
        if parts.scheme not in ("postgresql", "postgres") or not (parts.path.strip("/") or parts.hostname):
            raise ConfigError("journal.url: expected postgresql://user@host:port/database")
        # The URL is shown in messages and kept in the config: a password has no place in it.
        if parts.password is not None or re.search(r"(^|&)password=", parts.query):
            raise ConfigError("journal.url: no password in the URL; use journal.password_file (or PGPASSWORD)")
    if node.id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", node.id):
        raise ConfigError(f"node.id: letters, digits, '.', '_' and '-', at most 63, got {node.id!r}")
    _check_ranges([("node.lease_seconds", node.lease_seconds, 2, 600)])


COMMAND_PLACEHOLDERS = ("json", "file", "event", "key")


def _check_deliver(d: DeliverConfig, need_secrets: bool) -> None:
    for index, event in enumerate(d.events):
        if event not in DELIVER_EVENTS:
            raise ConfigError(f"deliver.events[{index}]: unknown event {event!r} (known: {', '.join(DELIVER_EVENTS)})")
    if len(set(d.events)) != len(d.events):
        raise ConfigError("deliver.events: lists an event twice")
    if (d.webhook is not None or d.command) and not d.events:
        raise ConfigError("deliver.events: name at least one event (done, failed, revision)")
    if d.webhook is not None:
        if not d.webhook.url:
            raise ConfigError("deliver.webhook.url: required")
        _check_url("deliver.webhook.url", d.webhook.url)
        if need_secrets and d.webhook.secret_file is None:
            raise ConfigError("deliver.webhook.secret_file: required (the HMAC key the body is signed with)")
    for index, arg in enumerate(d.command):
        for name in re.findall(r"\{([^{}]*)\}", arg):
            if name not in COMMAND_PLACEHOLDERS:
                raise ConfigError(
                    f"deliver.command[{index}]: unknown placeholder {{{name}}} "
                    f"(known: {', '.join('{' + p + '}' for p in COMMAND_PLACEHOLDERS)})"
                )
    _check_ranges(
        [
            ("deliver.webhook.timeout_seconds", d.webhook.timeout_seconds if d.webhook else None, 0.1, 3600),
            ("deliver.command_timeout_seconds", d.command_timeout_seconds, 0.1, 86400),
        ]
    )


def _check_url(key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http(s) URL, got {url!r}")
