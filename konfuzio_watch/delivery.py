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
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import DeliverConfig
from .journal import Row, State
from .journal.outbox import DeliveryRow, DeliveryState, NewDelivery, Outbox


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


# -- what a move causes: the outbox rows written in its transaction -------------------------------

DONE, REVISION, FAILED = "done", "revision", "failed"


def delivery_key(row: Row, event: str, revision: int | None) -> str:
    """The Idempotency-Key: ``<document_id>:<revision>``; a failed file's ``failed:<journal id>``."""
    return f"failed:{row.id}" if event == FAILED else f"{row.document_id}:{revision}"


class Deliveries:
    """The deliveries that a file's moves cause, by ``deliver.events`` (the steps ask, the journal
    writes them with the move). ``wake``: tell the sender that one was written (this node)."""

    def __init__(self, config: DeliverConfig, journal: Outbox, wake: Callable[[], None] = lambda: None):
        self.events = frozenset(config.events)
        self.journal = journal
        self.wake = wake

    def placed(self, row: Row, state: State, json_path: Path, file_path: Path, body: bytes) -> list[NewDelivery]:
        """A file placed in done/ (revision 1) or failed/ with its JSON ``body``."""
        event = DONE if state == State.DONE else FAILED
        if event not in self.events:
            return []
        revision = 1 if event == DONE else None
        return [self._new(row, event, revision, json_path, file_path, body)]

    def revised(self, row: Row, json_path: Path, file_path: Path, body: bytes, revision: int) -> list[NewDelivery]:
        """A done file's result replaced by ``revision``. Without the ``revision`` event, a file whose
        ``done`` delivery has not gone yet gets one for the new revision (the old one is superseded:
        its body is gone), so that every done file is delivered once, as it now is."""
        if REVISION in self.events:
            return [self._new(row, REVISION, revision, json_path, file_path, body)]
        if DONE in self.events and any(
            d.event == DONE for d in self.journal.deliveries([DeliveryState.PENDING], row_ids=[row.id])
        ):
            return [self._new(row, DONE, revision, json_path, file_path, body)]
        return []

    @staticmethod
    def _new(row: Row, event: str, revision: int | None, json_path: Path, file_path: Path, body: bytes) -> NewDelivery:
        return NewDelivery(
            event,
            delivery_key(row, event, revision),
            row.document_id,
            revision,
            os.fsencode(json_path),
            os.fsencode(file_path),
            hashlib.sha256(body).hexdigest(),
        )


def delivery_of(d: DeliveryRow, body: bytes) -> Delivery:
    """What a transport is handed for an outbox row."""
    return Delivery(
        d.key,
        d.event,
        Path(os.fsdecode(d.json_path)),
        Path(os.fsdecode(d.file_path)),
        d.document_id,
        d.revision,
        body,
    )
