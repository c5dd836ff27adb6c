"""Handing a result on: one delivery of one placed file to the next system (issue 25).

A file that reaches done/ (or failed/, or a later revision of its result) gets a row in the
journal's outbox, written in the same transaction as the move that causes it. A ``Delivery`` is
what a transport is handed for that row: the idempotency key, the event, the placed paths and
the body (the result JSON's bytes exactly as written). A transport - the webhook, or the command
(``deliver_command.py``) - answers with a ``Sent``: delivered, worth trying again later, or
failed, with one line saying why. ``signature`` is the HMAC a receiver checks the body with.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Delivery:
    key: str
    event: str
    json_path: Path
    file_path: Path
    document_id: int | None
    revision: int | None
    body: bytes


@dataclass(frozen=True)
class Sent:
    ok: bool  # delivered (2xx / exit 0)
    retry: bool  # worth trying again later (5xx/408/429/timeout/refused; command: timeout, exit 75)
    detail: str  # one line for the log, status and the delivery's error
    retry_after_s: float | None = None


def signature(secret: bytes, body: bytes) -> str:
    """The X-Konfuzio-Watch-Signature of ``body``: "sha256=" + hex HMAC-SHA256 with ``secret``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
