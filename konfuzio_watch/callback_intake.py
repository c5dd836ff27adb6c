"""Callbacks as they arrive, and the one answer to "are callbacks arriving?".

The callback server's threads only record a fact (``record``: the journal's ``record_callback``) and
wake the loop. Whether callbacks reach this daemon at all is asked once at start-up (a probe through
the public URL) and then watched (``reachability.CallbackWatch``): with no callbacks arriving, results
are polled soon after the upload instead of waited for.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from . import reachability
from .callback import TryLater
from .events import CleanupWanted, JournalFailed, Wake
from .journal import JournalWriteError
from .reachability import POLL_ONLY, CallbackVerdict, CallbackWatch, ProbeTokens, Reachability
from .states import CallbackOutcome
from .tokens import hash_token

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("konfuzio_watch")


class CallbackIntake:
    """The daemon's callback side: what arrives, and whether anything does."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.probe_tokens = ProbeTokens()
        # The one answer to "are callbacks arriving?" that status, /healthz, /metrics and the log show
        # (its times are this machine's, as the log's).
        self.watch = CallbackWatch()

    def record(self, token: str, claimed_id: int | None) -> CallbackOutcome:
        """A callback arrived (on a server thread): record it, wake the loop; returns the outcome."""
        d = self.daemon
        assert d.journal and d.scheduler
        if self.probe_tokens.arrived(token):
            return CallbackOutcome.PROBE
        if d.membership.forward_probe(token):
            return CallbackOutcome.PROBE
        now = d.clock.now()
        try:
            outcome, row = d.journal.record_callback(hash_token(token), claimed_id, now)
        except JournalWriteError as exc:
            d.scheduler.report(JournalFailed(str(exc)))
            raise TryLater from exc
        d.metrics.callbacks.labels(outcome).inc()
        if outcome is CallbackOutcome.RECORDED:
            if row is not None and row.uploaded_at is not None:
                d.metrics.callback_latency.observe(max(0.0, now - row.uploaded_at))
            d.scheduler.report(Wake())
            if self.watch.callback_arrived():
                self._arriving()
        elif outcome is CallbackOutcome.FINISHED and row is not None:  # a done file's callback again: a refresh is due
            d.scheduler.report(Wake())
        elif outcome is CallbackOutcome.EXTRA:  # a late copy from an earlier attempt: check it and delete it
            d.scheduler.report(CleanupWanted())
        return outcome

    def verdict(self) -> CallbackVerdict:
        """Are callbacks arriving? The one answer (``reachability.CallbackWatch``)."""
        return self.watch.verdict() if self.daemon.config.callback.enabled else POLL_ONLY

    def _arriving(self) -> None:
        """The verdict turned to yes: results are waited for (their callbacks) again."""
        log.info("callbacks arriving: %s", self.watch.verdict().text)
        if self.daemon.pipeline is not None:
            self.daemon.pipeline.ctx.expect_callbacks = True
        self.daemon.alerts.callbacks_arriving()

    def missing(self, url: str) -> None:
        """Results keep being found by polling, their callbacks never came: the verdict is no."""
        log.warning(
            "callbacks arriving: %s (check callback.public_url, the reverse proxy or the tunnel, or set "
            "callback.enabled: false)",
            self.watch.verdict().text,
        )
        self._poll_soon()
        self.daemon.alerts.callbacks_not_arriving(url)

    def _poll_soon(self) -> None:
        """No callbacks to wait for: results are polled soon after the upload (``results.first_poll_seconds``,
        then less and less often up to ``results.poll_interval``), not after ``results.callback_timeout``."""
        assert self.daemon.pipeline
        self.daemon.pipeline.ctx.expect_callbacks = False

    # -- start-up probes: the token and projects, the callback route -----------------------------

    def start_probes(self) -> None:
        """In the background (start-up stays fast): does Konfuzio accept the token and know the
        projects; and can its callbacks reach us?"""
        pipeline = self.daemon.pipeline
        assert pipeline

        def run() -> None:
            try:
                pipeline.probe_account()
            except Exception:  # noqa: BLE001 - a probe must never take the daemon down
                log.exception("the start-up check of the API token failed")
            if self.daemon.config.callback.enabled:
                self._probe_callbacks()

        self._probe_thread = threading.Thread(target=run, name="start-up-probes", daemon=True)
        self._probe_thread.start()

    def _probe_callbacks(self) -> None:
        c = self.daemon.config
        public = (self.daemon.public_url or "").rstrip("/")
        if reachability.callback_base_is_private(public) and not reachability.callback_base_is_private(c.konfuzio.host):
            found = Reachability(False, public, f"{public} is a loopback address, which Konfuzio cannot reach")
        else:
            found = reachability.probe(public, c.callback.path, self.probe_tokens)
        verdict = self.watch.probed(found)
        if found.ok or verdict.arriving:  # (a real callback may have come first)
            log.info("callbacks arriving: %s", verdict.text)
            return
        self._poll_soon()
        log.warning(
            "callbacks arriving: %s (%g s after the upload, then less and less often up to every %g s). "
            "Set callback.public_url, enable ngrok, or callback.enabled: false",
            verdict.text,
            c.results.first_poll_seconds,
            c.results.poll_interval,
        )
        self.daemon.alerts.callbacks_not_arriving(public)
