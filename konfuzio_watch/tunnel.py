"""An ngrok tunnel in front of the callback server, through pyngrok — which never downloads anything here.

pyngrok installs the agent from the internet whenever ``ngrok_path`` does not exist; we check the
path first and refuse instead. The authtoken goes into the ngrok config file (mode 0600), never on
the agent's command line where ``ps`` would show it: pyngrok puts ``PyngrokConfig.auth_token``
(which defaults to ``$NGROK_AUTHTOKEN``) into ``--authtoken``, so we always clear it. The agent
itself still honours ``$NGROK_AUTHTOKEN`` from its environment.

The agent runs in its own session (a Ctrl-C in a terminal does not kill it before the daemon's
ordered shutdown); under systemd it lives in the service's cgroup and is stopped with it.
pyngrok's monitor thread keeps reading the agent's log (an unread pipe would stall the agent).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pyngrok import conf, ngrok, process
from pyngrok.exception import PyngrokError
from pyngrok.log import NgrokLog
from pyngrok.ngrok import NgrokTunnel
from pyngrok.process import NgrokProcess

log = logging.getLogger(__name__)

ENDPOINT_NAME = "konfuzio-watch-callback"
REQUEST_TIMEOUT_S = 5.0


class TunnelError(Exception):
    """The tunnel cannot be opened; the message is one line meant for the user."""


@dataclass(frozen=True)
class TunnelSettings:
    ngrok_path: Path
    authtoken: str | None = field(default=None, repr=False)
    domain: str | None = None  # a reserved domain, e.g. "scans.example.com"
    region: str | None = None
    config_path: Path | None = None  # default: <state dir>/ngrok.yml, created if missing
    startup_timeout_s: float = 15.0


class Tunnel:
    """One https endpoint forwarding to ``local_host:local_port``, served by one ngrok agent process."""

    def __init__(
        self, settings: TunnelSettings, local_port: int, *, state_dir: Path | None = None, local_host: str = "127.0.0.1"
    ):
        if settings.config_path is not None:
            self.config_path = settings.config_path
        elif state_dir is not None:
            self.config_path = state_dir / "ngrok.yml"
        else:
            raise ValueError("TunnelSettings.config_path or state_dir is required")
        self.settings = settings
        self.upstream_url = f"http://{local_host}:{local_port}"
        self._lock = threading.Lock()
        self._agent: NgrokProcess | None = None
        self._starting = False
        self._public_url: str | None = None
        self._uri: str | None = None

    @property
    def public_url(self) -> str | None:
        return self._public_url

    @property
    def agent_pid(self) -> int | None:
        agent = self._agent
        return agent.proc.pid if agent else None

    def open(self) -> str:
        """Start the agent and open the endpoint; return its https URL. Raises ``TunnelError``."""
        with self._lock:
            if self._public_url and self.is_alive():
                return self._public_url
            self._discard_agent()
            self._check_agent_binary()
            self._write_config()
            return self._connect()

    def is_alive(self) -> bool:
        """True if the agent process runs and its API still lists our endpoint."""
        agent, url = self._agent, self._public_url
        if agent is None or url is None or agent.proc.poll() is not None or not agent.api_url:
            return False
        try:
            listing = ngrok.api_request(f"{agent.api_url}/api/endpoints", timeout=REQUEST_TIMEOUT_S)
        except (PyngrokError, OSError):
            return False
        items = listing.get("endpoints") or listing.get("tunnels") or []
        return any(item.get("public_url", item.get("url")) == url for item in items)

    def ensure_open(self) -> str:
        """The public URL, re-opening the tunnel (possibly under a new URL) if the agent died."""
        if self.is_alive():
            assert self._public_url
            return self._public_url
        if self._public_url:
            log.warning("the ngrok tunnel %s is gone; reopening it", self._public_url)
        return self.open()

    def close(self) -> None:
        """Remove the endpoint and stop the agent. Idempotent."""
        with self._lock:
            agent, uri = self._agent, self._uri
            if agent and uri and agent.api_url and agent.proc.poll() is None:
                try:
                    ngrok.api_request(f"{agent.api_url}{uri}", method="DELETE", timeout=REQUEST_TIMEOUT_S)
                except (PyngrokError, OSError) as exc:
                    log.warning("could not remove the ngrok endpoint %s: %s", self._public_url, exc)
            self._discard_agent()

    # -- opening ---------------------------------------------------------------------------------

    def _check_agent_binary(self) -> None:
        path = self.settings.ngrok_path
        if not path.is_file():
            raise TunnelError(
                f"ngrok agent not found at {path}; install it (https://ngrok.com/download) and "
                "set its path; konfuzio-watch never downloads it"
            )
        if not os.access(path, os.X_OK):
            raise TunnelError(f"ngrok agent at {path} is not executable")

    def _write_config(self) -> None:
        """Create the agent config if missing, with the authtoken in it; written 0600, atomically."""
        path = self.config_path
        try:
            existing = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
        except (OSError, yaml.YAMLError) as exc:
            raise TunnelError(f"cannot read the ngrok config {path}: {exc}") from None
        if existing is not None and not isinstance(existing, dict):
            raise TunnelError(f"{path}: not an ngrok config (expected a YAML mapping)")
        wanted = _with_authtoken(dict(existing or {"version": "3"}), self.settings.authtoken)
        if existing is not None and wanted == existing:
            if path.stat().st_mode & 0o077:
                log.warning("%s is readable by other users; it may hold the ngrok authtoken", path)
            return
        try:
            _write_private(path, yaml.safe_dump(wanted, sort_keys=False))
        except OSError as exc:
            raise TunnelError(f"cannot write the ngrok config {path}: {exc.strerror or exc}") from None

    def _pyngrok_config(self) -> conf.PyngrokConfig:
        config = conf.PyngrokConfig(
            ngrok_path=str(self.settings.ngrok_path),
            config_path=str(self.config_path),
            region=self.settings.region,
            monitor_thread=True,
            log_event_callback=self._on_agent_log,
            startup_timeout=self.settings.startup_timeout_s,  # type: ignore[arg-type]  # a float works
            request_timeout=REQUEST_TIMEOUT_S,
            start_new_session=True,
        )
        config.auth_token = None  # else pyngrok passes $NGROK_AUTHTOKEN as --authtoken on the command line
        config.api_key = None
        return config

    def _connect(self) -> str:
        try:
            endpoint = self._start_endpoint()
        except (PyngrokError, OSError) as exc:  # OSError: the agent could not be executed at all
            self._discard_agent()
            raise TunnelError(f"the ngrok agent did not open a tunnel: {exc}") from None
        self._agent = self._agent or _registered_agent(self.settings.ngrok_path)
        url = endpoint.public_url or ""
        if not url.startswith("https://"):
            self._discard_agent()
            raise TunnelError(f"the ngrok agent opened {url!r}, not an https URL")
        self._public_url, self._uri = url, endpoint.uri
        log.info("ngrok tunnel %s -> %s (agent pid %s)", url, self.upstream_url, self.agent_pid)
        return url

    def _start_endpoint(self) -> NgrokTunnel:
        """pyngrok starts the agent and POSTs the endpoint; a timer ends a start-up that hangs."""
        options: dict[str, Any] = {}
        if self.settings.domain:
            options["url"] = "https://" + self.settings.domain.split("://")[-1].strip("/")
        guard = threading.Timer(self.settings.startup_timeout_s + 2, self._kill_stuck_agent)
        guard.name = "ngrok-start-guard"
        self._starting = True
        guard.start()
        try:
            return ngrok.connect(
                self.upstream_url, "http", name=ENDPOINT_NAME, pyngrok_config=self._pyngrok_config(), **options
            )
        finally:
            self._starting = False
            guard.cancel()
            guard.join()

    def _on_agent_log(self, _line: NgrokLog) -> None:
        """Called for every agent log line; during start-up, remember the process pyngrok started."""
        if self._starting and self._agent is None:
            self._agent = _registered_agent(self.settings.ngrok_path)

    def _kill_stuck_agent(self) -> None:
        """pyngrok's start-up blocks on reading the agent's output; killing the agent ends that read."""
        agent = self._agent or _registered_agent(self.settings.ngrok_path)
        if agent is not None and agent.proc.poll() is None:
            log.warning("the ngrok agent did not start within %.0f s; killing it", self.settings.startup_timeout_s)
            self._agent = agent
            agent.proc.kill()

    # -- closing ---------------------------------------------------------------------------------

    def _discard_agent(self) -> None:
        """Kill the agent (if any), reap it, join pyngrok's monitor thread, close the pipe."""
        agent, self._agent = self._agent, None
        self._public_url = self._uri = None
        ngrok.kill(self._pyngrok_config())  # only kills what pyngrok has registered; never installs
        if agent is None:
            return
        monitor = agent._monitor_thread
        if agent.proc.poll() is None:
            agent.proc.kill()
        agent.proc.wait(timeout=10)
        if monitor is not None:
            monitor.join(timeout=5)  # the agent's end of the pipe is closed: its readline returns
        if (monitor is None or not monitor.is_alive()) and agent.proc.stdout:
            agent.proc.stdout.close()
        atexit.unregister(process._terminate_process)  # pyngrok's kill-at-exit hooks hold dead Popens


def _registered_agent(ngrok_path: Path) -> NgrokProcess | None:
    """The process pyngrok started for this path (pyngrok keeps it in a module dict; pinned <10)."""
    return process._current_processes.get(str(ngrok_path))


def _with_authtoken(config: dict, authtoken: str | None) -> dict:
    if not authtoken:
        return config
    if str(config.get("version", "3")) == "2":
        return {**config, "authtoken": authtoken}
    return {**config, "agent": {**(config.get("agent") or {}), "authtoken": authtoken}}


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def opener(name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    with open(tmp, "w", encoding="utf-8", opener=opener) as f:
        os.fchmod(f.fileno(), 0o600)  # also if a stale temp file was there
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
