"""The daemon's periodic duties, run by the loop thread (``scheduler.Duty``): systemd's watchdog and
status, the full rescan, the markers and the inbox's watching, the tunnel, the oldest pending file,
the API token file; and the place's own (``membership.py``: a node's heartbeat and leases)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from . import markers
from .scheduler import Duty
from .token_file import LOOK_EVERY_S

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("konfuzio_watch")

STATUS_EVERY_S = 5.0
OLDEST_EVERY_S = 60.0
TOKEN_HANGUP_ONLY_S = 3600.0
TUNNEL_CHECK_EVERY_S = 30.0


class Duties:
    """The duties of one daemon, and what they keep between runs."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self._last_status = ""
        self._watch_trouble: str | None = None  # why the inbox cannot be watched now (said once)
        # The markers, and the inbox's share, are looked at this often: watching restarts within a
        # poll_interval of the share's return.
        self.markers_every_s = max(0.5, min(markers.MARKERS_EVERY_S, daemon.config.watch.poll_interval))
        self.token: Duty | None = None

    def build(self) -> list[Duty]:
        d = self.daemon
        c = d.config
        assert d.token_watch and d.dispatcher and d.pipeline
        # A fixed token file is tried at once, not after the API gate's backoff. Without a token file
        # only SIGHUP has anything for it to do, and SIGHUP makes it due at once (``hangup``).
        self.token = Duty("token", LOOK_EVERY_S if c.konfuzio.token_file else TOKEN_HANGUP_ONLY_S, d.token_watch.look)
        return [
            # WATCHDOG=1 comes from the loop thread only: a stuck loop (not a slow upload on a
            # worker) is what systemd's watchdog catches.
            Duty("watchdog", d.notifier.watchdog_interval_s, lambda _now: d.notifier.watchdog()),
            *d.membership.duties(d.dispatcher, d.pipeline),
            Duty("rescan", d.membership.rescan_interval_s, self.rescan),
            # Anyone who may write the inbox may remove its marker; a renamed and recreated inbox has none;
            # its share may go away and come back.
            Duty("markers", self.markers_every_s, self.tend_inbox),
            Duty("status", STATUS_EVERY_S, self.publish_status),
            Duty(
                "tunnel",
                TUNNEL_CHECK_EVERY_S if c.ngrok.enabled else None,
                self.check_tunnel,
                next_at=d.clock.now() + TUNNEL_CHECK_EVERY_S,
            ),
            Duty("oldest pending", OLDEST_EVERY_S if d.alerts.enabled else None, self.tell_oldest_pending),
            self.token,
        ]

    def rescan(self, now: float) -> None:
        """A full rescan of the inbox (in a cluster only by the node with the rescanner role). Not while
        the inbox's share is away: there is nothing to find, and its return brings a rescan of its own."""
        d = self.daemon
        assert d.scheduler
        if d.markers is not None and d.markers.away is not None:
            return
        if not d.membership.may_rescan(now):
            return
        d.scheduler.rescan(now)

    # -- the inbox's markers and its watching ---------------------------------------------------

    def watch_new_inbox(self, now: float) -> None:
        """The inbox was renamed and made again: the file events come from the old folder; watch the new
        one, and look at what it holds now."""
        log.info("the inbox %s is a new folder: watching it", self.daemon.config.folders.inbox)
        self.watch_again(now)

    def tend_inbox(self, now: float) -> None:
        """The markers and the inbox's share (``markers.py``); and an observer that stopped by itself (watchdog's
        poller does when its folder is missing for a moment) is started again."""
        d = self.daemon
        assert d.markers and d.watcher
        d.markers.tend(now)
        if d.markers.away is None and d.markers.lost is None and not d.watcher.is_running():
            if self._watch_trouble is None:
                log.warning(
                    "the observer of the inbox %s had stopped (its folder was missing for a moment?): "
                    "watching it again",
                    d.config.folders.inbox,
                )
            self.watch_again(now)

    def pause_watching(self, reason: str) -> None:
        assert self.daemon.watcher
        self.daemon.watcher.pause(f"the inbox's share is away since {time.strftime('%H:%M:%S')}: {reason}")

    def watch_again(self, now: float) -> None:
        """Watch the inbox anew (a new folder, its share back, an observer that stopped) and look at what it
        holds now: a new observer reports only what changes after it started."""
        d = self.daemon
        assert d.watcher and d.scheduler
        d.watcher.stop()
        try:
            d.watcher.start()
        except OSError as exc:  # missing, or gone again in between: the next look at the markers tries again
            reason = exc.strerror or str(exc)
            if reason != self._watch_trouble:
                log.warning(
                    "cannot watch the inbox %s: %s; trying again every %g s",
                    d.config.folders.inbox,
                    reason,
                    self.markers_every_s,
                )
            self._watch_trouble = reason
            return
        if self._watch_trouble is not None:
            log.info("watching the inbox %s again", d.config.folders.inbox)
            self._watch_trouble = None
        d.scheduler.rescan(now)

    # -- what the daemon tells, the tunnel ------------------------------------------------------

    def publish_status(self, _now: float) -> None:
        line = self.daemon.status_line()
        if line != self._last_status:
            self._last_status = line
            self.daemon.notifier.status(line)

    def check_tunnel(self, _now: float) -> None:
        d = self.daemon
        assert d.tunnel
        try:
            url = d.tunnel.ensure_open()
        except Exception as exc:  # keep running: uploads wait, callbacks fall back to polling
            log.error("the ngrok tunnel is down and could not be reopened: %s", exc)
            return
        if url != d.public_url:
            log.warning("callbacks now arrive through %s (was %s); earlier uploads are polled", url, d.public_url)
            d.public_url = url

    def tell_oldest_pending(self, now: float) -> None:
        d = self.daemon
        assert d.journal
        row = d.journal.oldest_active()
        d.alerts.oldest_pending(
            None if row is None else max(0.0, now - row.detected_at), "" if row is None else row.display_path
        )
