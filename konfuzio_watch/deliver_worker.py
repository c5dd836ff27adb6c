"""The delivery step: the outbox's due deliveries sent, one at a time, on a thread of their own.

Its own thread (a pool of one), so a receiver that hangs or a command that takes its time never holds
an upload or a result. Each turn takes the oldest due delivery (each file's first pending one: a later
revision never goes before an earlier one), leased to this node in a cluster, and:

- reads the body from the placed JSON and checks it against the sha256 stored when it was written. A
  newer revision of the same file replaced it: the delivery is ``superseded`` (the newer one goes; an
  earlier one never carries a later body). Changed or removed by someone else: it fails, saying so.
- hands it to the webhook, then the command (both configured: the command runs after the webhook's
  2xx; a retry runs only what has not succeeded yet, ``sent``).
- asks the retry policy (``Step.DELIVER``) about what the receiver did not take: down, busy or slow
  blocks the receiver's gate (``Scope.RECEIVER``: one ERROR, one WARNING when it is back, no delivery
  charged; probed by trying the oldest due delivery again); anything else fails the delivery
  (``status``, an alert, ``konfuzio-watch redeliver``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from . import policy
from .clock import Clock
from .config import Config
from .deliver_command import run_command
from .delivery import FAILED, Delivery, Sent, delivery_of
from .dirfd import FolderInTheWay
from .files import NotRegularFile, open_regular_file
from .gates import Gate
from .journal import BaseJournal, JournalWriteError, State, display_name
from .journal.outbox import DeliveryRow
from .metrics import Metrics
from .policy import Blocked, Cause, Failure, Step

log = logging.getLogger("konfuzio_watch")

POLL_S = 2.0  # how often the outbox is looked at without a wake-up (another node's, a `redeliver`)
ERROR_PAUSE_S = 5.0  # after a journal that cannot be written, or a bug


class Transport(Protocol):
    name: str

    def send(self, delivery: Delivery) -> Sent: ...


class CommandTransport:
    """``deliver.command`` (``deliver_command.run_command``) as a transport."""

    name = "command"

    def __init__(self, argv: Sequence[str], timeout_s: float):
        self.argv, self.timeout_s = tuple(argv), timeout_s

    def send(self, delivery: Delivery) -> Sent:
        return run_command(self.argv, delivery, timeout_s=self.timeout_s)


class Deliverer:
    """Sends the outbox's deliveries on its own thread until ``stop``."""

    def __init__(
        self,
        config: Config,
        journal: BaseJournal,
        gate: Gate,
        clock: Clock,
        metrics: Metrics,
        transports: Sequence[Transport],
        *,
        on_failed: Callable[[DeliveryRow, str], None] = lambda _d, _error: None,
    ):
        self.journal = journal
        self.gate = gate
        self.clock = clock
        self.metrics = metrics
        self.transports = list(transports)
        self.on_failed = on_failed
        self.roots = {FAILED: config.folders.failed}
        self.done_root = config.folders.done
        self.limits = policy.Limits(config.upload.backoff_base_seconds, config.upload.backoff_cap_seconds)
        d = config.deliver
        longest = (d.webhook.timeout_seconds if d.webhook else 0) + (d.command_timeout_seconds if d.command else 0)
        # A delivery is this node's while it is being sent: for the longest a send can take, and then some.
        self.lease_s = max(config.node.lease_seconds, longest + 5.0)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.in_hand: DeliveryRow | None = None

    @classmethod
    def build(cls, config: Config, journal: BaseJournal, gate: Gate, clock: Clock, metrics: Metrics, **kw) -> Deliverer:  # type: ignore[no-untyped-def]
        """With the transports ``deliver`` names (the webhook's secret read now: a problem stops the start)."""
        from .deliver_webhook import Webhook

        d = config.deliver
        transports: list[Transport] = []
        if d.webhook is not None:
            roots = (config.folders.done, config.folders.failed)
            transports.append(Webhook(d.webhook, d.secret(), roots))
        if d.command:
            transports.append(CommandTransport(d.command, d.command_timeout_seconds))
        return cls(config, journal, gate, clock, metrics, transports, **kw)

    # -- the thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deliver", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float) -> bool:
        """Stop after the delivery in hand; False if it is still being sent after ``timeout_s`` (it is
        sent again after the restart, with the same key)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                d = self.in_hand
                log.warning(
                    "stopping: the delivery in hand (%s) is cut off; it is sent again at the next start",
                    f"{display_name(d.file_path)}, key {d.key}" if d else "?",
                )
                return False
        for transport in self.transports:
            close = getattr(transport, "close", None)
            if close:
                close()
        return True

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                wait_s = self.turn(self.clock.now())
            except JournalWriteError as exc:
                log.warning("deliveries wait: the journal cannot be written (%s)", exc)
                wait_s = ERROR_PAUSE_S
            except Exception:
                log.exception("unexpected error while delivering")
                wait_s = ERROR_PAUSE_S
            if wait_s > 0:
                self._wake.wait(wait_s)
            self._wake.clear()

    # -- one turn -------------------------------------------------------------------------------

    def turn(self, now: float) -> float:
        """Send the oldest due delivery, if the receiver's gate lets one go; returns how long to wait
        before the next turn (0: at once)."""
        admits = self.gate.admits(now)
        if admits == 0:
            at = self.gate.next_probe_at()
            return min(POLL_S, max(0.05, at - now)) if at is not None else POLL_S
        taken = self.journal.take_due_deliveries(now, 1, self.lease_s)
        if not taken:
            at = self.journal.next_delivery_at()
            return POLL_S if at is None else min(POLL_S, max(0.05, at - now))
        d = taken[0]
        probe = admits == 1
        if probe:
            self.gate.probe_started()
        self.in_hand = d
        try:
            self.deliver(d)
        finally:
            self.in_hand = None
            if probe:
                self.gate.probe_finished()
            self.journal.release_deliveries([d.id])
        return 0.0

    def deliver(self, d: DeliveryRow) -> None:
        body = self._body(d)
        if body is None:
            return
        delivery = delivery_of(d, body)
        current: DeliveryRow | None = d
        for transport in self.transports:
            if transport.name in d.sent_by:
                continue
            sent = transport.send(delivery)
            if not sent.ok:
                self._not_taken(d, sent)
                return
            log.debug("%s: %s", display_name(d.file_path), sent.detail)
            if transport is not self.transports[-1]:
                current = self.journal.delivery_sent(d, transport.name, self.clock.now())
                if current is None:
                    return  # another node took it over (this one was too slow): it sends the rest
                d = current
        now = self.clock.now()
        if self.journal.delivery_done(d, now, sent_by=[t.name for t in self.transports]) is None:
            return
        self.gate.open(now)
        latency = max(0.0, now - d.created_at)
        self.metrics.delivery_outcome("delivered", latency)
        log.info(
            "%s: delivered (%s, key %s) %.1f s after it was placed%s",
            display_name(d.file_path),
            d.event,
            d.key,
            latency,
            f" after {d.attempts} failed tr{'y' if d.attempts == 1 else 'ies'}" if d.attempts else "",
            extra={"file": display_name(d.file_path), "key": d.key, "event": d.event},
        )

    def _body(self, d: DeliveryRow) -> bytes | None:
        """The placed JSON's bytes if they are still those written; else the delivery is superseded
        (a newer revision replaced them) or fails (someone else changed or removed them): None."""
        path = Path(os.fsdecode(d.json_path))
        root = self.roots.get(d.event, self.done_root)
        body = _read_below(path, root)
        if body is not None and hashlib.sha256(body).hexdigest() == d.sha256:
            return body
        now = self.clock.now()
        why = None
        if self.journal.has_later_delivery(d):
            why = f"revision {d.revision} was replaced by a later one before it was delivered"
        elif self.journal.get(d.row_id).state == State.RETRIED:
            why = "the file was put back into the inbox (konfuzio-watch retry) before it was delivered"
        if why is not None:
            if self.journal.delivery_superseded(d, now, why) is not None:
                self.metrics.delivery_outcome("superseded")
                log.info("%s: delivery %s (%s) superseded: %s", display_name(d.file_path), d.key, d.event, why)
            return None
        what = "removed" if body is None else "changed"
        self._failed(d, f"{path} was {what} by someone else since konfuzio-watch wrote it", tried=False)
        return None

    def _not_taken(self, d: DeliveryRow, sent: Sent) -> None:
        now = self.clock.now()
        cause = Cause.TRANSIENT if sent.retry else Cause.INVALID
        decision = policy.decide(
            Step.DELIVER, Failure(cause, sent.detail, retry_after_s=sent.retry_after_s), d.failures, now, self.limits
        )
        if isinstance(decision, Blocked):
            self.gate.block(now, decision.reason, decision.retry_after_s, decision.note)
            self.journal.delivery_waits(d, now, sent.detail, next_at=now)  # due again once the gate opens
            self.metrics.delivery_outcome("retried")
            log.debug("%s: delivery %s waits for the receiver: %s", display_name(d.file_path), d.key, sent.detail)
            return
        self.gate.open(now)  # the receiver answered (it refused this one): it is there
        self._failed(d, sent.detail)

    def _failed(self, d: DeliveryRow, error: str, *, tried: bool = True) -> None:
        if self.journal.delivery_failed(d, self.clock.now(), error, tried=tried) is None:
            return
        self.metrics.delivery_outcome("failed")
        log.warning(
            "%s: delivery %s (%s) failed: %s; `konfuzio-watch redeliver` sends it again",
            display_name(d.file_path),
            d.key,
            d.event,
            error,
            extra={"file": display_name(d.file_path), "key": d.key, "event": d.event, "error": error},
        )
        self.on_failed(d, error)


def _read_below(path: Path, root: Path) -> bytes | None:
    """A regular file's bytes (below ``root``, no link followed), or None if it is not there."""
    try:
        fd, _ = open_regular_file(path, root=root if path.is_relative_to(root) else None)
    except (FileNotFoundError, NotADirectoryError, NotRegularFile):
        return None
    except FolderInTheWay:  # a folder on its path replaced by a link or a file
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()
