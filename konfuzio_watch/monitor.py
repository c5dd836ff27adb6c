"""The monitor: ``/healthz``, ``/metrics`` and ``/status`` on a listener of their own.

The public callback port can be exhausted by anyone on the internet (slow clients hold
Waitress' connections), so what systemd, Kubernetes, Prometheus and ``konfuzio-watch status``
rely on is served here instead: a small Flask app on its own Waitress (``ServerThread``), bound
to ``monitor.host:monitor.port`` (loopback by default; port 0 takes any free port, and the
daemon's lock file names the URL).

- ``GET /healthz``: 200 ``{"status": "ok", "line": ..., "blocked": [...]}`` once ready; 503 with
  ``"status": "starting"`` or ``"stopping"``. A daemon whose work is *blocked* (Konfuzio down,
  a full disk) still answers 200, with the reasons in ``"blocked"``: a restart would not fix
  that, and a liveness probe that failed would only restart it in a loop. Alert on
  ``konfuzio_watch_blocked`` or on ``"blocked"`` instead. ``"callbacks"``: are Konfuzio's callbacks
  arriving (``{"arriving": true | false | null, "text", "since", "url"}``, ``reachability.CallbackVerdict``),
  the same answer as ``/status``, ``konfuzio_watch_callbacks_arriving`` and ``konfuzio-watch status``.
- ``GET /metrics``: the Prometheus text format.
- ``GET /``: the status page for a browser, and ``POST /retry``, its retry button (``monitor_page.py``).
- ``GET /status``: what only the running daemon knows (``Snapshot``): its state, the status
  line, what is blocked since when, the steps in hand, and ``extra`` (facts other parts of the
  daemon publish, e.g. files seen but not yet settled).

Everything else is a JSON 404.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response

from .metrics import CONTENT_TYPE
from .monitor_page import PageSource, add_page_routes
from .server import ServerThread

log = logging.getLogger(__name__)

# Only GETs from loopback tools: small requests, a few connections, short idle timeouts.
MONITOR_SETTINGS: dict[str, Any] = {
    "max_request_body_size": 1024,
    "max_request_header_size": 8 * 1024,
    "channel_timeout": 10,
    "connection_limit": 32,
    "expose_tracebacks": False,
    "ident": "konfuzio-watch",
}

STARTING, OK, STOPPING = "starting", "ok", "stopping"

# snapshot() -> the /status document: {"status": "ok" | "starting" | "stopping", "line": str,
# "blocked": [{"scope", "reason", "since", "for_seconds"}], ..., "extra": {...}}
Snapshot = Callable[[], dict[str, Any]]


def create_app(snapshot: Snapshot, metrics: Callable[[], bytes], page: PageSource | None = None) -> Flask:
    app = Flask("konfuzio_watch.monitor")
    if page is not None:
        add_page_routes(app, page)

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            s = snapshot()
        except Exception as exc:  # the daemon cannot say how it is: that is not healthy
            log.exception("the monitor could not take a snapshot")
            return _json({"status": "error", "line": f"cannot take a snapshot: {exc}", "blocked": []}, 503)
        body = {"status": s["status"], "line": s["line"], "blocked": s["blocked"]}
        if "callbacks" in s:
            body["callbacks"] = s["callbacks"]
        return _json(body, 200 if s["status"] == OK else 503)

    @app.get("/status")
    def status() -> Response:
        return _json(snapshot(), 200)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics(), content_type=CONTENT_TYPE)

    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    @app.errorhandler(400)
    @app.errorhandler(500)
    def http_error(exc) -> Response:  # type: ignore[no-untyped-def]
        return _json({"detail": exc.name}, exc.code)

    return app


def start_monitor(
    snapshot: Snapshot, metrics: Callable[[], bytes], host: str, port: int, page: PageSource | None = None
) -> ServerThread:
    """Bind and start the monitor. A port that is taken is an OSError naming the setting."""
    try:
        server = ServerThread(
            create_app(snapshot, metrics, page), host, port, name="monitor-server", threads=2, **MONITOR_SETTINGS
        )
    except OSError as exc:
        raise OSError(f"monitor.port: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return server.start()


def local_url(server: ServerThread) -> str:
    """The monitor's URL for a client on this host (a wildcard bind is reached through loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{server.port}"


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json(data: dict[str, Any], status: int) -> Response:
    return Response(json.dumps(data, default=str), status=status, mimetype="application/json")
