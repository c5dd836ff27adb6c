"""The public HTTP endpoint: Konfuzio's callback, and nothing else (every other path is a 404).

/healthz, /metrics and /status are the monitor's (``monitor.py``), on a port of its own: this
one faces the internet, and slow clients can exhaust its connections.

The callback is untrusted input from the internet. The token in the URL says *which* file it
is about; the body is never believed (at most it can contradict the token and be refused). The
handler only records the fact and wakes the pipeline, which confirms the outcome with the API.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import orjson
from flask import Flask, Response, request

from .states import CallbackOutcome

log = logging.getLogger(__name__)

TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{20,100}")


class TryLater(Exception):
    """``record`` cannot store the fact now for a reason the daemon already handles: answer 503."""


# record(token, document id named by the body or None) -> what the callback came to
RecordCallback = Callable[[str, "int | None"], CallbackOutcome]


def create_app(record: RecordCallback, *, path: str = "konfuzio-callback", max_body_bytes: int = 64 * 1024) -> Flask:
    app = Flask("konfuzio_watch")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    prefix = "/" + path.strip("/")

    @app.post(f"{prefix}/<token>")
    @app.post(f"{prefix}/<token>/")
    def callback(token: str) -> Response:
        if not TOKEN_SHAPE.fullmatch(token):
            return _json({"detail": "Not found."}, 404)
        if request.content_length is not None and request.content_length > max_body_bytes:
            return _json({"detail": "Request body too large."}, 413)
        body = request.get_data(cache=False)
        try:
            payload = _loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _json({"detail": "Body must be a JSON object."}, 400)
        if not isinstance(payload, dict):
            return _json({"detail": "Body must be a JSON object."}, 400)
        claimed_id = payload.get("id")
        if claimed_id is not None and (not isinstance(claimed_id, int) or isinstance(claimed_id, bool)):
            return _json({"detail": "Field 'id' must be an integer."}, 400)
        try:
            outcome = record(token, claimed_id)
        except TryLater:  # known, already reported trouble (e.g. the journal's disk is full)
            return _json({"detail": "Try again later."}, 503)
        except Exception:  # our own trouble: ask the sender to come back, say nothing more
            log.exception("could not record a callback")
            return _json({"detail": "Try again later."}, 503)
        if outcome == CallbackOutcome.UNKNOWN:
            return _json({"detail": "Not found."}, 404)
        if outcome == CallbackOutcome.MISMATCH:
            log.warning("refused a callback naming document %s on another document's token", claimed_id)
            return _json({"detail": "This token was not issued for that document."}, 403)
        return _json({"status": outcome}, 202 if outcome == CallbackOutcome.RECORDED else 200)

    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    @app.errorhandler(400)
    def http_error(exc) -> Response:  # type: ignore[no-untyped-def]
        return _json({"detail": exc.name}, exc.code)

    return app


def _json(data: dict, status: int) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _loads(body: bytes) -> Any:
    """orjson (the body is Konfuzio's document details, up to 64 KiB); json for what orjson
    refuses (``NaN``, UTF-16, an integer beyond 64 bits), so every body reads as it did with json alone."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)
