"""ServerThread's stop: Waitress on port 0, stopped from another thread."""

from __future__ import annotations

import gc
import logging
import os
import urllib.request
import warnings

import pytest
import requests

from konfuzio_watch.server import ServerThread, try_bind


def hello(environ, start_response):  # type: ignore[no-untyped-def]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.mark.slow
def test_a_server_whose_wake_up_pipe_was_closed_under_it_still_stops(caplog: pytest.LogCaptureFixture) -> None:
    """The loop thread is woken through a pipe (Waitress's trigger). If that pipe's descriptor is
    closed by someone else, the loop can no longer be woken; stopping must still end the loop and
    the worker threads and say so, not raise (a daemon's shutdown would stop half-way)."""
    server = ServerThread(hello, "127.0.0.1", 0, name="test-http").start()
    assert urllib.request.urlopen(server.url, timeout=5).read() == b"hello"
    os.close(server._server.trigger.trigger)  # what a stray close of a reused descriptor number does

    with caplog.at_level(logging.WARNING, logger="konfuzio_watch.server"):
        assert server.close() is False
    assert "cannot wake the HTTP server's loop" in caplog.text
    assert not server._thread.is_alive()
    try_bind("127.0.0.1", server.port)  # the listener is closed
    assert server.close() is True  # a second call does nothing


@pytest.mark.slow
def test_a_server_never_started_lets_go_of_its_port_and_pipe() -> None:
    """A daemon that fails half-way through its start closes servers it never started."""
    server = ServerThread(hello, "127.0.0.1", 0, name="test-http")
    port, wrapper = server.port, server._server.trigger.socket
    assert server.close() is True
    try_bind("127.0.0.1", port)
    assert wrapper.fd == -1  # Waitress's own descriptor of the pipe, closed (else a ResourceWarning later)


def big(environ, start_response):  # type: ignore[no-untyped-def]
    body = b"x" * (4 * 1024 * 1024)  # over Waitress's outbuf_overflow: the answer goes through a temporary file
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.mark.slow
def test_stopping_closes_the_buffers_of_connections_still_open() -> None:
    """A client that keeps its connection open after a large answer: the channel's buffer (a
    temporary file) is closed with it, not left to the garbage collector (a ResourceWarning then)."""
    server = ServerThread(big, "127.0.0.1", 0, name="test-http").start()
    with requests.Session() as client:
        assert len(client.get(server.url, timeout=10).content) == 4 * 1024 * 1024
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert server.close() is True
            gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
