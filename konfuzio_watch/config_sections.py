"""What the config holds: one frozen dataclass per section, and the ``Config`` that bundles them
(with the few values derived from them, and the secrets read on demand)."""

from __future__ import annotations

import fnmatch
import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(Exception):
    """A problem with the configuration; the message is one line meant for the user."""


@dataclass(frozen=True)
class KonfuzioConfig:
    host: str = "https://app.konfuzio.com"
    token: str | None = None
    token_file: Path | None = None
    project_id: int = 0
    category_id: int | None = None
    dataset_status: int = 0
    timeout_seconds: float = 120.0


@dataclass(frozen=True)
class FoldersConfig:
    inbox: Path = Path()
    done: Path = Path()
    failed: Path = Path()
    state: Path = Path()
    processing: Path | None = None


@dataclass(frozen=True)
class WatchConfig:
    settle_seconds: float = 2.0
    ignore: tuple[str, ...] = ()
    # auto: polling where other hosts' writes make no inotify event (a network or FUSE mount), else
    # inotify (checked at start with a probe file); true: always polling; false: never (watcher.py).
    polling: typing.Literal["auto", True, False] = "auto"
    poll_interval: float = 5.0
    rescan_interval: float = 300.0
    incomplete_grace_seconds: float = 60.0


@dataclass(frozen=True)
class CallbackConfig:
    enabled: bool = True  # false: poll-only mode, no inbound port (an office behind NAT)
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    path: str = "konfuzio-callback"
    max_body_kb: int = 64


@dataclass(frozen=True)
class UploadConfig:
    concurrency: int = 4
    max_attempts: int = 8
    max_file_mb: float = 100.0
    backoff_base_seconds: float = 2.0
    backoff_cap_seconds: float = 300.0
    on_duplicate: str = "process"
    # After an upload whose answer never came (timeout, reset, 5xx, a crash), look for it on the
    # server this long before uploading again (default: konfuzio.timeout_seconds).
    reconcile_window_seconds: float | None = None


@dataclass(frozen=True)
class ResultsConfig:
    callback_timeout: float = 600.0
    poll_interval: float = 30.0
    workers: int = 2
    max_failures: int = 30  # consecutive failed fetches/exports of one file before it goes to failed/
    first_poll_seconds: float = 5.0  # poll-only mode: the first look after the upload, doubling to poll_interval
    outputs: tuple[str, ...] = ("json",)  # what goes into done/ next to the file: json, searchable_pdf
    bbox: bool = True  # the character boxes in the JSON (false: left out, and never fetched)
    require_review: bool = False  # export only once a person marked the document reviewed in Konfuzio
    layout: str = "{path}"  # where in done/ a file goes (layout.render); failed/ keeps the inbox's layout


@dataclass(frozen=True)
class Route:
    """Files whose path relative to the inbox matches ``match`` (a glob; ``*`` crosses ``/``)
    go to this project/category instead of the ``konfuzio`` section's."""

    match: str = ""
    project_id: int | None = None
    category_id: int | None = None
    dataset_status: int | None = None


@dataclass(frozen=True)
class NgrokConfig:
    enabled: bool = False
    path: Path = Path("/usr/local/bin/ngrok")
    authtoken: str | None = None
    authtoken_file: Path | None = None
    domain: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class AlertsConfig:
    """Admin notifications through apprise (``alerts.py``). No URLs: no notifications."""

    urls: tuple[str, ...] = ()
    # One URL per line, read on demand, so the passwords URLs carry stay out of the config.
    urls_file: Path | None = None
    name: str | None = None
    min_interval_seconds: float = 60.0
    oldest_pending_seconds: float = 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.urls or self.urls_file)


@dataclass(frozen=True)
class MonitorConfig:
    """/healthz, /metrics and /status on a listener of their own (``monitor.py``), never the public port."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9321  # 0: any free port (the lock file names the one taken)
    # The status page's retry button also when the monitor listens on a non-loopback address (on
    # loopback it is always there); without it such a page is read-only.
    allow_retry: bool = False


@dataclass(frozen=True)
class ServiceConfig:
    # How long SIGTERM waits for the steps in hand; below systemd's TimeoutStopSec=90 with room to close.
    stop_timeout_seconds: float = 20.0


STOP_TIMEOUT_LIMIT_S = 85.0


@dataclass(frozen=True)
class JournalConfig:
    """Where the journal lives. No ``url``: SQLite in ``folders.state`` (one daemon). A PostgreSQL
    ``url`` (``postgresql://user@host:5432/db``): one journal for several daemons on one inbox. The
    password never comes from the config: ``password_file``, else libpq's own ``PGPASSWORD`` or
    ``~/.pgpass``."""

    url: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class NodeConfig:
    """This daemon among the nodes that share a PostgreSQL journal (default id: the host name).
    ``lease_seconds``: a row a node works on is its own for this long unless it renews the lease (it
    does every quarter of it while it works); a node that died loses its rows to the others this long
    after its last renewal."""

    id: str | None = None
    lease_seconds: float = 20.0


@dataclass(frozen=True)
class WebhookConfig:
    """``deliver.webhook``: one POST per delivery, the body signed with the secret (``delivery.py``)."""

    url: str = ""
    secret_file: Path | None = None  # the HMAC key, read on demand (never in the config, never logged)
    timeout_seconds: float = 30.0


DELIVER_EVENTS = ("done", "failed", "revision")


@dataclass(frozen=True)
class DeliverConfig:
    """``deliver``: each placed result handed on to the next system (``delivery.py``). Neither a
    ``webhook`` nor a ``command``: nothing is delivered (and nothing costs anything)."""

    webhook: WebhookConfig | None = None
    command: tuple[str, ...] = ()  # argv, no shell; placeholders {json} {file} {event} {key}
    command_timeout_seconds: float = 60.0
    events: tuple[str, ...] = ("done",)

    @property
    def enabled(self) -> bool:
        return self.webhook is not None or bool(self.command)

    def secret(self) -> bytes:
        """The webhook's HMAC key from ``secret_file`` (read on demand, never logged)."""
        path = self.webhook.secret_file if self.webhook else None
        assert path is not None  # guaranteed by config_checks
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"deliver.webhook.secret_file: cannot read {path}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"deliver.webhook.secret_file: {path} is empty")
        return secret


@dataclass(frozen=True)
class Config:
    konfuzio: KonfuzioConfig = field(default_factory=KonfuzioConfig)
    folders: FoldersConfig = field(default_factory=FoldersConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    callback: CallbackConfig = field(default_factory=CallbackConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    ngrok: NgrokConfig = field(default_factory=NgrokConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    deliver: DeliverConfig = field(default_factory=DeliverConfig)
    routes: tuple[Route, ...] = ()

    def route_for(self, rel_path: str) -> tuple[int, int | None, int]:
        """(project_id, category_id, dataset_status) for a file, from the first matching route."""
        k = self.konfuzio
        for route in self.routes:
            if fnmatch.fnmatchcase(rel_path, route.match):
                return (
                    route.project_id or k.project_id,
                    route.category_id if route.category_id is not None else k.category_id,
                    route.dataset_status if route.dataset_status is not None else k.dataset_status,
                )
        return k.project_id, k.category_id, k.dataset_status

    def ngrok_authtoken(self) -> str | None:
        n = self.ngrok
        if n.authtoken_file is None:
            return n.authtoken
        try:
            return n.authtoken_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"ngrok.authtoken_file: cannot read {n.authtoken_file}: {exc.strerror}") from None

    @property
    def reconcile_window_s(self) -> float:
        u = self.upload
        return self.konfuzio.timeout_seconds if u.reconcile_window_seconds is None else u.reconcile_window_seconds

    @property
    def journal_path(self) -> Path:
        return self.folders.state / "journal.sqlite3"

    @property
    def node_id(self) -> str:
        return self.node.id or socket.gethostname() or "localhost"

    def journal_password(self) -> str | None:
        """The PostgreSQL password from ``journal.password_file`` (read on demand, never logged); None:
        libpq looks for one itself (``PGPASSWORD``, ``~/.pgpass``) or the server needs none."""
        path = self.journal.password_file
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"journal.password_file: cannot read {path}: {exc.strerror}") from None

    def api_token(self) -> str:
        """The API token, from ``token`` or ``token_file`` (read on demand, never logged)."""
        if self.konfuzio.token:
            return self.konfuzio.token
        path = self.konfuzio.token_file
        assert path is not None  # guaranteed by config_checks.check_config
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"konfuzio.token_file: cannot read {path}: {exc.strerror}") from None
