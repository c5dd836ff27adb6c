"""``check``'s look at the network: the Konfuzio API with this token and project, whether
Konfuzio's callbacks can arrive, and whether the monitor's port is free (or the running daemon's)."""

from __future__ import annotations

import errno
from collections.abc import Callable

from . import reachability
from .config import Config, ConfigError
from .konfuzio import ApiError, KonfuzioClient
from .lock_file import Holder, hostname
from .locks import read_daemon_lock
from .policy import Cause
from .states import CallbackOutcome

Report = Callable[..., None]


def check_api(config: Config, report: Report) -> None:
    k = config.konfuzio
    try:
        token = config.api_token()
    except ConfigError as exc:
        report(False, "API token", str(exc), "set konfuzio.token_file to a readable file (or konfuzio.token)")
        return
    client = KonfuzioClient(k.host, token, timeout_s=min(30.0, k.timeout_seconds))
    try:
        project = client.project(k.project_id)
        report(True, "Konfuzio API", f"project {project.get('id')} ({project.get('name', '?')}) at {k.host}")
    except ApiError as exc:
        cause = exc.failure.cause
        if cause == Cause.NOT_FOUND:
            report(
                False,
                "Konfuzio API",
                f"project {k.project_id} not found or not visible to this token",
                "check konfuzio.project_id, and that the token's user is a member of the project",
            )
        elif cause == Cause.REJECTED:
            report(
                False,
                "Konfuzio API",
                f"Konfuzio rejected the API token (HTTP {exc.status})",
                "put a valid token into konfuzio.token_file (Konfuzio: profile -> API token)",
            )
        else:
            report(
                False,
                "Konfuzio API",
                f"project {k.project_id} at {k.host}: {exc.failure.message}",
                "check konfuzio.host and that this machine reaches it",
            )
    finally:
        client.close()


def check_callbacks(config: Config, report: Report, note: Callable[[str], None]) -> None:
    c = config.callback
    if not c.enabled:
        note(
            f"poll-only mode (callback.enabled: false): results are polled {config.results.first_poll_seconds:g} s "
            f"after the upload, then less and less often up to every {config.results.poll_interval:g} s"
        )
        return
    from .callback import create_app
    from .server import PUBLIC_ENDPOINT_SETTINGS, ServerThread

    tokens = reachability.ProbeTokens()
    app = create_app(
        lambda token, _claimed: CallbackOutcome.PROBE if tokens.arrived(token) else CallbackOutcome.UNKNOWN,
        path=c.path,
        max_body_bytes=c.max_body_kb * 1024,
    )
    try:
        server = ServerThread(
            app, c.host, c.port, name="check-callback-server", threads=1, **PUBLIC_ENDPOINT_SETTINGS
        ).start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            holder = _running_daemon_on(config, "callback.port", c.host, c.port)
            if holder is not None:
                report(True, "callback.port", f"{c.host}:{c.port} {_served_by(holder)}")
                _report_daemons_callbacks(holder, report, note)
            else:
                report(
                    False,
                    "callback.port",
                    f"{c.host}:{c.port} is in use",
                    f"stop what listens there (`ss -ltnp 'sport = :{c.port}'`), or choose another callback.port",
                )
        else:
            report(
                False,
                "callback.port",
                f"cannot listen on {c.host}:{c.port}: {exc.strerror or exc}",
                "choose another callback.host/port",
            )
        return
    try:
        report(True, "callback.port", f"{c.host}:{c.port} is free")
        public = c.public_url or server.url
        if config.ngrok.enabled:
            note("callbacks arrive through the ngrok tunnel; `run` checks that they do once the tunnel is open")
            return
        if reachability.callback_base_is_private(public) and not reachability.callback_base_is_private(
            config.konfuzio.host
        ):
            report(
                False,
                "callbacks",
                f"Konfuzio cannot reach {public} (a loopback address)",
                "set callback.public_url (your reverse proxy), enable ngrok, or set callback.enabled: false "
                "(poll-only)",
            )
            return
        found = reachability.probe(public, c.path, tokens)
        report(
            found.ok,
            "callbacks",
            f"a probe through {public} arrived" if found.ok else found.detail,
            f"make {public}/{c.path.strip('/')}/ reach {c.host}:{c.port}, or set callback.enabled: false",
        )
    finally:
        server.close(timeout_s=2)


def check_monitor_port(config: Config, report: Report) -> None:
    """Would ``run`` get its monitor port? (Port 0 takes any free one.)"""
    m = config.monitor
    if not m.enabled or m.port == 0:
        return
    from .server import try_bind

    try:
        try_bind(m.host, m.port)
    except OSError as exc:
        holder = _running_daemon_on(config, "monitor.port", m.host, m.port) if exc.errno == errno.EADDRINUSE else None
        if holder is not None:
            report(True, "monitor.port", f"{m.host}:{m.port} {_served_by(holder)}")
        elif exc.errno == errno.EADDRINUSE:
            report(
                False,
                "monitor.port",
                f"{m.host}:{m.port} is in use",
                f"stop what listens there (`ss -ltnp 'sport = :{m.port}'`), or choose another monitor.port (0: any "
                "free port, which the state folder's daemon.lock names)",
            )
        else:
            report(
                False,
                "monitor.port",
                f"cannot listen on {m.host}:{m.port}: {exc.strerror or exc}",
                "choose another monitor.host/port",
            )
        return
    report(True, "monitor.port", f"{m.host}:{m.port} is free")


def _running_daemon_on(config: Config, key: str, host: str, port: int) -> Holder | None:
    """The konfuzio-watch of this state folder, if it runs and its lock says it listens on ``host:port``
    for ``key``: its own port is in use by it, which is no problem."""
    try:
        holder = read_daemon_lock(config.folders.state)
    except OSError:
        return None
    if holder is None or not holder.is_running() or holder.host != hostname():
        return None
    return holder if (holder.listening or {}).get(key) == f"{host}:{port}" else None


def _served_by(holder: Holder) -> str:
    return f"is served by the running konfuzio-watch (pid {holder.pid})"


def _report_daemons_callbacks(holder: Holder, report: Report, note: Callable[[str], None]) -> None:
    """Whether callbacks reach the running daemon, as it says (its monitor's /status): this check cannot
    probe them itself while the daemon holds the port."""
    from .status import fetch_live_status

    if not holder.monitor_url:
        note(
            "whether callbacks reach the running konfuzio-watch is in its log (`callbacks arriving: ...`): its "
            "monitor is off"
        )
        return
    try:
        said = fetch_live_status(holder.monitor_url).get("callbacks")
    except (OSError, ValueError) as exc:
        note(
            f"whether callbacks reach the running konfuzio-watch is in its log: its monitor at "
            f"{holder.monitor_url} does not answer ({exc})"
        )
        return
    if not isinstance(said, dict) or not said.get("text"):
        note("the running konfuzio-watch does not say whether callbacks reach it (an older version)")
    elif said.get("arriving") is None:
        note(f"callbacks: {said['text']}")
    else:
        report(
            said["arriving"] is True,
            "callbacks",
            str(said["text"]),
            "make the public callback URL reach callback.host/port (callback.public_url, the reverse proxy or "
            "the tunnel), or set callback.enabled: false",
        )
