"""Waitress in a background thread, with the clean shutdown Waitress itself does not offer.

Waitress has no official programmatic stop: ``server.close()`` from another thread races the
event loop. We do every change to the socket map on the loop thread (``pull_trigger``), in this
order: stop accepting and close the listener; wait for in-flight requests to be answered; close
all channels, each with its buffers, so the loop exits; join the loop thread; shut down the worker
threads. A loop that can no longer be woken (its pipe closed under it) is stopped without it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import waitress
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
        self._started = self._closed = False

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ServerThread:
        self._started = True
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop accepting, let in-flight requests finish (up to ``timeout_s``), then stop.

        Returns False if something overran its deadline or the loop could not be woken (a warning
        is logged); the threads are stopped either way. A second call does nothing.
        """
        if self._closed:
            return True
        self._closed = True
        if not self._thread.is_alive():
            return self._close_ended(timeout_s)
        deadline = time.monotonic() + timeout_s
        stopped = threading.Event()

        def stop_listening() -> None:
            self._server.accepting = False
            self._server.del_channel()
            self._server.socket.close()
            stopped.set()

        woken = self._on_loop(stop_listening)
        if woken:
            stopped.wait(max(0.0, deadline - time.monotonic()))
            while self._has_work() and time.monotonic() < deadline:
                time.sleep(0.02)
            woken = self._on_loop(self._close_all)
        if not woken:
            # Its wake-up pipe is gone (a stray close of a reused descriptor number): with its map
            # emptied the loop ends after its current select (at most its timeout); the channels are
            # closed once it has (closed under a select, they would make it fail with EBADF).
            channels = list(self._map.values())
            self._map.clear()
            self._thread.join(max(deadline - time.monotonic(), self._server.adj.asyncore_loop_timeout + 1.0))
            self._close_all(channels)
        self._thread.join(max(0.1, deadline - time.monotonic()))
        clean = woken and not self._thread.is_alive()
        self._server.task_dispatcher.shutdown(timeout=max(0.1, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("the HTTP server did not stop within %.1f s", timeout_s)
        return clean

    def _close_ended(self, timeout_s: float) -> bool:
        """Close a server whose loop is not running: never started (True), or ended by itself (False)."""
        self._close_all()
        if self._server.socket is not None:  # the listener, if it had left the map already
            self._server.socket.close()
        self._server.task_dispatcher.shutdown(timeout=timeout_s)
        if self._started:
            log.warning("the HTTP server's loop had ended by itself before it was stopped")
        return not self._started

    def _close_all(self, channels: list[Any] | None = None) -> None:
        """Close every channel as Waitress does when its client leaves (``handle_close``: with its
        buffers, which may be temporary files; ``wasyncore.close_all`` leaves those to the garbage
        collector), the listener and the trigger, also a trigger that had left the map (one whose
        pipe was closed under it leaves without closing its read end)."""
        for channel in list(self._map.values()) if channels is None else channels:
            with contextlib.suppress(OSError):  # a descriptor closed under it: nothing more to close
                channel.handle_close()
        self._map.clear()
        wrapper = getattr(self._server.trigger, "socket", None)
        if wrapper is not None:
            wrapper.close()

    def _on_loop(self, thunk: Callable[[], None]) -> bool:
        """Run ``thunk`` on the loop thread; False if the loop cannot be woken (its pipe is gone)."""
        try:
            self._server.trigger.pull_trigger(thunk)
        except OSError as exc:
            log.warning("cannot wake the HTTP server's loop (%s); stopping it without", exc.strerror or exc)
            return False
        return True

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
