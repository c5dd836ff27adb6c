"""Waitress in a background thread, with the clean shutdown Waitress itself does not offer.

Waitress has no official programmatic stop: ``server.close()`` from another thread races the
event loop. We do every change to the socket map on the loop thread (``pull_trigger``), in this
order: stop accepting and close the listener; wait for in-flight requests to be answered; close
all channels so the loop exits; join the loop thread; shut down the worker threads.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import waitress
from waitress import wasyncore
from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger(__name__)

# Settings for an endpoint that faces the public internet (OPERATIONS.md): small bodies, short
# idle timeouts, no tracebacks to the caller.
PUBLIC_ENDPOINT_SETTINGS: dict[str, Any] = {
    "max_request_body_size": 64 * 1024,
    "max_request_header_size": 16 * 1024,
    "channel_timeout": 30,
    "connection_limit": 100,
    "expose_tracebacks": False,
    "ident": "konfuzio-watch",
}


class ServerThread:
    """A WSGI app served by Waitress on a thread; ``port`` is the bound port (``port=0`` works)."""

    def __init__(
        self, app: Callable, host: str, port: int, *, name: str = "waitress", threads: int = 4, **settings: Any
    ):
        # We bind the one listening socket ourselves (closing it if that fails; Waitress would
        # leak it, and would listen on several sockets for a name like "localhost"), and give
        # the dispatcher its threads only once bound (create_server starts them first).
        sock = _bind(host, port)
        dispatcher = ThreadedTaskDispatcher()
        try:
            self._server = waitress.create_server(app, sockets=[sock], _dispatcher=dispatcher, **settings)
        except BaseException:
            sock.close()
            raise
        dispatcher.set_thread_count(threads)
        self._map = self._server._map
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)
        self.host = host

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop accepting, let in-flight requests finish (up to ``timeout_s``), then stop.

        Returns False if something overran its deadline (a warning is logged).
        """
        if not self._thread.is_alive():
            self._server.task_dispatcher.shutdown(timeout=timeout_s)
            return True
        deadline = time.monotonic() + timeout_s
        stopped = threading.Event()

        def stop_listening() -> None:
            self._server.accepting = False
            self._server.del_channel()
            self._server.socket.close()
            stopped.set()

        self._server.trigger.pull_trigger(stop_listening)
        stopped.wait(max(0.0, deadline - time.monotonic()))
        while self._has_work() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._server.trigger.pull_trigger(lambda: wasyncore.close_all(self._map))
        self._thread.join(max(0.1, deadline - time.monotonic()))
        clean = not self._thread.is_alive()
        self._server.task_dispatcher.shutdown(timeout=max(0.1, deadline - time.monotonic()))
        if not clean:
            log.warning("the HTTP server did not stop within %.1f s", timeout_s)
        return clean

    def _has_work(self) -> bool:
        for channel in list(self._map.values()):
            if channel is self._server.trigger:
                continue
            if getattr(channel, "requests", None) or getattr(channel, "total_outbufs_len", 0):
                return True
        return False


def try_bind(host: str, port: int) -> None:
    """Bind as the servers do and let go at once; OSError (e.g. EADDRINUSE) if they could not."""
    _bind(host, port).close()


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock
