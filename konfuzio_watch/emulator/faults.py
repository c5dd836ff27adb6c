"""Per-endpoint fault rules: "answer GET .../bbox with 401 three times", "the project endpoint is
404 until t", "the gateway answers 504 at once but still forwards the upload".

A rule is matched against every request to the API (``/api/`` and ``/doc/``, never the
emulator's own ``/emulator/`` control paths), in list order; the first that matches answers.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flask import Response

GATEWAY_PAGES = {
    502: "<html><body><h1>502 Bad Gateway</h1></body></html>\n",
    503: "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>\n",
    504: "<html><body><h1>504 Gateway Time-out</h1></body></html>\n",
}
UPLOAD_PATH = r"^/api/v3/documents/?$"


@dataclass
class FaultRule:
    """Answer matching requests with ``status`` (and ``body``/``headers``) instead of the real thing.

    ``method``: "GET", "POST", ... or "*". ``path``: a regex searched in the request path (no query
    string), e.g. ``r"/bbox/?$"``. ``count``: how many requests it answers (None: no limit);
    ``until``: ``time.time()`` after which it stops matching (None: never). ``body``: a dict/list is
    sent as JSON, a str as text (HTML if it starts with "<"); None: a DRF-style ``{"detail": ...}``
    for 4xx, a gateway page for 502/503/504. ``forward_after_s``: only for the upload POST: the
    client gets the error at once, yet the upload is stored this many seconds later, with the
    callback URL it carried (a gateway that gave up while the app went on).
    """

    method: str = "*"
    path: str = ".*"
    status: int = 503
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    count: int | None = None
    until: float | None = None
    forward_after_s: float | None = None
    hits: int = field(default=0, compare=False)

    @classmethod
    def gateway(
        cls, status: int = 504, store_after_s: float = 1.0, count: int | None = 1, until: float | None = None
    ) -> FaultRule:
        """The upload POST answers ``status`` at once; the server stores it ``store_after_s`` later."""
        return cls("POST", UPLOAD_PATH, status, count=count, until=until, forward_after_s=store_after_s)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FaultRule:
        """From JSON (the command line's ``--fault-rule``); unknown keys are an error."""
        return cls(**raw)

    def response(self) -> Response:
        body = self.body
        if body is None:
            if self.status in GATEWAY_PAGES:
                body = GATEWAY_PAGES[self.status]
            else:
                body = {"detail": _DETAILS.get(self.status, "Injected fault.")}
        if isinstance(body, (dict, list)):
            response = Response(json.dumps(body), self.status, mimetype="application/json")
        else:
            mimetype = "text/html" if str(body).lstrip().startswith("<") else "text/plain"
            response = Response(str(body), self.status, mimetype=mimetype)
        for key, value in self.headers.items():
            response.headers[key] = value
        return response


_DETAILS = {
    400: "Bad request.",
    401: "Invalid token.",
    403: "You do not have permission to perform this action.",
    404: "Not found.",
    429: "Request was throttled.",
    500: "A server error occurred.",
}
_lock = threading.Lock()


def take(rules: list[FaultRule], method: str, path: str, *, forwarding: bool | None = None) -> FaultRule | None:
    """The first rule matching the request, its count consumed; None if none matches.

    ``forwarding``: True -> only rules with ``forward_after_s``; False -> only rules without; None -> any.
    """
    now = time.time()
    with _lock:
        for rule in list(rules):
            if forwarding is not None and (rule.forward_after_s is not None) != forwarding:
                continue
            if rule.method not in ("*", method.upper()) or not re.search(rule.path, path):
                continue
            if (rule.count is not None and rule.hits >= rule.count) or (rule.until is not None and now >= rule.until):
                continue
            rule.hits += 1
            return rule
    return None
