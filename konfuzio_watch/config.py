"""Load and validate the YAML config into frozen dataclasses.

Every user mistake becomes one ``ConfigError`` whose message names the key, e.g.
``upload.concurrency: expected an integer, got 'four'``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from . import layout


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
        assert path is not None  # guaranteed by _check
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"konfuzio.token_file: cannot read {path}: {exc.strerror}") from None


REQUIRED = {
    ("konfuzio", "project_id"),
    ("folders", "inbox"),
    ("folders", "done"),
    ("folders", "failed"),
    ("folders", "state"),
}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# Keys that hold secrets or point to them. ``status`` and ``retry`` only read the journal and
# move files: they load the config without them (their ${VARS}, e.g. ${CREDENTIALS_DIRECTORY},
# are set only inside the service).
SECRET_KEYS = {
    ("konfuzio", "token"),
    ("konfuzio", "token_file"),
    ("ngrok", "authtoken"),
    ("ngrok", "authtoken_file"),
    ("alerts", "urls"),
    ("alerts", "urls_file"),
}


def load_config(
    path: str | os.PathLike[str], environ: typing.Mapping[str, str] | None = None, *, need_secrets: bool = True
) -> Config:
    """Read a YAML file and return a validated ``Config``; raise ``ConfigError`` on any problem.
    ``need_secrets=False``: leave the secret keys out (for commands that never call the API)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {reason}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested more than Python can read; flatten it") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(
        raw if raw is not None else {}, base_dir=path.parent, environ=environ, need_secrets=need_secrets
    )


# Values a config may hold once its aliases are expanded. A real config has a few hundred; a few
# hundred bytes of nested aliases (the YAML "billion laughs") expand to billions, which every walk
# over the value (validation, an error message's repr) would pay for in time and memory.
MAX_EXPANDED_NODES = 100_000


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with duplicate keys refused, and aliases that expand beyond
    MAX_EXPANDED_NODES or into themselves refused before anything is built from them."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node) -> None:
    """Raise ``ConfigError`` naming the key whose value expands too far (or contains itself).
    Sizes are counted once per node (aliases share nodes), so this is linear in the text."""
    sizes: dict[int, int] = {}
    looped: list[yaml.Node] = []

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known == -1:  # an alias inside its own anchor's value: it expands without end
            looped.append(node)
            return MAX_EXPANDED_NODES + 1
        if known is not None:
            return known
        sizes[id(node)] = -1
        total = 1
        for child in _children(node):
            total = min(total + size(child), MAX_EXPANDED_NODES + 1)
        sizes[id(node)] = total
        return total

    def check(node: yaml.Node, key: str) -> None:
        if size(node) <= MAX_EXPANDED_NODES:
            return
        if isinstance(node, yaml.MappingNode):  # name the innermost key whose value is too large
            for key_node, value in node.value:
                name = f"{key}.{key_node.value}" if key else str(key_node.value)
                check(key_node, name)
                check(value, name)
        if looped:
            raise ConfigError(f"{key or 'config'}: a YAML alias refers to the value that contains it")
        raise ConfigError(
            f"{key or 'config'}: its YAML aliases expand to over {MAX_EXPANDED_NODES:,} values; write the value out"
        )

    check(root, "")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice (a second ``callback:`` section) is an
    error instead of silently replacing the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key] + 1}); merge the two",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line  # type: ignore[index]
        return super().construct_mapping(node, deep=deep)


def parse_config(
    raw: Any, base_dir: Path = Path(), environ: typing.Mapping[str, str] | None = None, *, need_secrets: bool = True
) -> Config:
    """Validate a parsed YAML mapping. Relative folder paths are relative to ``base_dir``."""
    env = os.environ if environ is None else environ
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping of sections at the top level")
    if not need_secrets:
        raw = {
            name: (
                {k: v for k, v in section.items() if (name, k) not in SECRET_KEYS}
                if isinstance(section, dict)
                else section
            )
            for name, section in raw.items()
        }
    sections: dict[str, Any] = {"routes": _build_routes(raw.get("routes"), base_dir, env)}
    for f in dataclasses.fields(Config):
        if f.name == "routes":
            continue
        section_raw = raw.get(f.name, {})
        if section_raw is None:
            section_raw = {}
        if not isinstance(section_raw, dict):
            raise ConfigError(f"{f.name}: expected a mapping, got {_show(section_raw)}")
        sections[f.name] = _build_section(f.name, f.default_factory, section_raw, base_dir, env)
    _reject_unknown("", raw, {f.name for f in dataclasses.fields(Config)})
    config = Config(**sections)
    _check(config, need_secrets)
    return config


def _build_routes(raw: Any, base_dir: Path, env: typing.Mapping[str, str]) -> tuple[Route, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"routes: expected a list of {{match, project_id, ...}}, got {_show(raw)}")
    routes = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"routes[{index}]: expected a mapping, got {_show(item)}")
        route = _build_section(f"routes[{index}]", Route, item, base_dir, env)
        if not route.match:
            raise ConfigError(f"routes[{index}].match: required")
        if route.project_id is None and route.category_id is None and route.dataset_status is None:
            raise ConfigError(f"routes[{index}]: set project_id, category_id or dataset_status")
        routes.append(route)
    return tuple(routes)


def _build_section(name: str, cls: Any, raw: dict, base_dir: Path, env: typing.Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    _reject_unknown(name, raw, fields)
    for key in fields:
        if (name, key) in REQUIRED and raw.get(key) is None:
            raise ConfigError(f"{name}.{key}: required")
    values = {
        key: _convert(f"{name}.{key}", hints[key], _expand(f"{name}.{key}", value, env), base_dir)
        for key, value in raw.items()
    }
    return cls(**values)


def _reject_unknown(section: str, raw: dict, known: set[str]) -> None:
    for key in raw:
        if key not in known:
            where = f"{section}.{key}" if section else str(key)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")


def _expand(key: str, value: Any, env: typing.Mapping[str, str]) -> Any:
    if isinstance(value, list):
        return [_expand(key, v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in env:
            raise ConfigError(f"{key}: environment variable {var} is not set")
        return env[var]

    return _ENV_REF.sub(sub, value)


def _convert(key: str, hint: Any, value: Any, base_dir: Path) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if any(type(value) is type(choice) and value == choice for choice in choices):
            return value
        shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
        raise ConfigError(f"{key}: expected one of {shown}, got {_show(value)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {_show(value)}")
    if hint is str:
        if isinstance(value, str) and value:
            return value
        raise ConfigError(f"{key}: expected a non-empty string, got {_show(value)}")
    if hint is Path:
        if isinstance(value, str) and value:
            return (base_dir / os.path.expanduser(value)).absolute()
        raise ConfigError(f"{key}: expected a path, got {_show(value)}")
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        raise ConfigError(f"{key}: expected a list of strings, got {_show(value)}")
    raise AssertionError(f"unsupported type {hint} for {key}")  # pragma: no cover


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check(config: Config, need_secrets: bool = True) -> None:
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


def _check_url(key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http(s) URL, got {url!r}")
