"""The status page's routes on the monitor: ``GET /`` (``page.py``'s document) and ``POST /retry``.

The retry button is a form POST; what keeps another web site from submitting it in an admin's
browser (cross-site request forgery) is checked by ``refusal``, before anything is done:

- the ``Host`` the request was sent to is this monitor's (an IP address, ``localhost`` or this
  machine's name): a DNS name of someone else's that resolves to this machine (DNS rebinding)
  neither gets the token in the page nor may POST;
- an ``Origin`` (or, without one, a ``Referer``) names the page's own origin;
- the form carries the daemon's random token, compared in constant time (``hmac.compare_digest``).

The answer is a redirect (303) back to the page, with a one-line message kept here (the page's URL
names it by a random id, so a link from elsewhere cannot put words on the page). Without
``retry_allowed`` (a monitor on a non-loopback address, unless ``monitor.allow_retry``) the page
has no token and ``/retry`` is 403.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import ipaddress
import logging
import secrets
import socket
import threading
import urllib.parse
from typing import Any, Protocol

from flask import Flask, Response, redirect, request

from .page import render_page

log = logging.getLogger(__name__)
MESSAGES_KEPT = 32


class PageSource(Protocol):
    retry_allowed: bool

    def view(self) -> dict[str, Any]: ...

    def retry(self, row_id: int) -> str: ...


def own_names() -> frozenset[str]:
    """The names this machine answers to besides IP addresses: ``localhost`` and its host names."""
    names = {"localhost", socket.gethostname().lower()}
    with contextlib.suppress(OSError):  # a resolver that fails: the short name is enough
        names.add(socket.getfqdn().lower())
    return frozenset(names)


def is_own_host(host_header: str | None, names: frozenset[str]) -> bool:
    """Whether a ``Host`` header names this machine: an IP literal or one of ``names`` (any port)."""
    if not host_header:
        return False
    host = urllib.parse.urlsplit("//" + host_header).hostname or ""
    if host in names:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def refusal(
    *,
    form_token: str | None,
    token: str,
    host_header: str | None,
    origin: str | None,
    referer: str | None,
    names: frozenset[str],
) -> str | None:
    """Why a POST to ``/retry`` is refused (None: it is not). Pure: the request's parts are passed in."""
    if not is_own_host(host_header, names):
        return f"sent to another host ({host_header!r})"
    own = f"http://{host_header}".lower()
    if origin is not None:
        if origin.lower().rstrip("/") != own:
            return f"from another site (Origin {origin!r})"
    elif referer:
        parts = urllib.parse.urlsplit(referer)
        if f"{parts.scheme}://{parts.netloc}".lower() != own:
            return "from another site (its Referer)"
    if not form_token or not hmac.compare_digest(form_token.encode(), token.encode()):
        return "without this page's token"
    return None


def add_page_routes(app: Flask, source: PageSource) -> None:
    token = secrets.token_urlsafe(32)  # per daemon: a page from an earlier run cannot retry
    names = own_names()
    messages: collections.OrderedDict[str, str] = collections.OrderedDict()
    lock = threading.Lock()

    @app.get("/")
    def page() -> Response:
        with lock:
            message = messages.get(request.args.get("m", ""))
        may_retry = source.retry_allowed and is_own_host(request.host, names)
        try:
            view = source.view()
        except Exception as exc:  # starting, stopping, a journal that does not answer: say so, in one line
            log.exception("the status page could not read the daemon's state")
            return Response(f"konfuzio-watch: cannot show the status now: {exc}\n", status=503, mimetype="text/plain")
        nonce = secrets.token_urlsafe(16)
        body = render_page(view, retry_token=token if may_retry else None, nonce=nonce, message=message)
        response = Response(body, mimetype="text/html")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self';"
            " img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.post("/retry")
    def retry() -> Response:
        if not source.retry_allowed:
            return _refused("the page is read-only (the monitor is not on loopback; see monitor.allow_retry)")
        why = refusal(
            form_token=request.form.get("token"),
            token=token,
            host_header=request.host,
            origin=request.headers.get("Origin"),
            referer=request.headers.get("Referer"),
            names=names,
        )
        if why is not None:
            log.warning("the status page refused a retry %s", why)
            return _refused(f"refused: a retry {why}")
        try:
            row_id = int(request.form.get("row", ""))
        except ValueError:
            return Response("no file named: the form's row is not a number\n", status=400, mimetype="text/plain")
        message = source.retry(row_id)
        log.info("status page: retry: %s", message)
        key = secrets.token_urlsafe(8)
        with lock:
            messages[key] = message
            while len(messages) > MESSAGES_KEPT:
                messages.popitem(last=False)
        return redirect(f"/?m={key}", code=303)  # type: ignore[return-value]


def _refused(text: str) -> Response:
    return Response(text + "\n", status=403, mimetype="text/plain")
