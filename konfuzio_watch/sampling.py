"""What the running daemon tells about itself: the status line (systemd's STATUS=), the monitor's
/status snapshot, the metrics' sample, and the files of the steps in hand, by name."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .journal import ACTIVE, JournalWriteError, Row, State
from .lock_file import hostname
from .metrics import Sample
from .monitor import OK, STARTING, STOPPING, iso
from .summary import status_line

if TYPE_CHECKING:
    from .daemon import Daemon


class StatusSampler:
    """Reads the running daemon's parts for what it tells; called on the monitor's and the loop's threads."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def status_line(self) -> str:
        """One line for systemd's STATUS=: pending / done / failed, the oldest pending, blocks."""
        d = self.daemon
        assert d.journal
        blocked = [g.reason for g in d.gates.blocked()]
        try:
            return status_line(d.journal.counts(), d.journal.oldest_active_detected_at(), d.clock.now(), blocked)
        except JournalWriteError as exc:  # a database that cannot be reached: say so, not a traceback
            return f"the journal cannot be read ({exc})" + "".join(f"; BLOCKED: {b}" for b in blocked)

    def snapshot(self) -> dict[str, object]:
        """What only the running daemon knows, for the monitor's /status (and /healthz)."""
        d = self.daemon
        status = OK if d.is_ready else STOPPING if d.is_stopping else STARTING
        now = d.clock.now()
        blocked = [
            {
                "scope": g.scope.value,
                "reason": g.reason,
                "since": iso(g.since),
                "for_seconds": None if g.since is None else round(max(0.0, now - g.since), 1),
            }
            for g in d.gates.blocked()
        ]
        extra: dict[str, object] = {}
        for name, source in list(d.status_sources.items()):
            try:
                extra[name] = source()
            except Exception as exc:  # one broken source must not hide the others
                extra[name] = {"error": f"{type(exc).__name__}: {exc}"}
        snapshot: dict[str, object] = {
            "status": status,
            "line": self.status_line() if d.journal is not None else status,
            "pid": os.getpid(),
            "host": hostname(),
            "started_at": iso(d.started_at),
            "state_folder": str(d.config.folders.state),
            "inbox": str(d.config.folders.inbox),
            "public_url": d.public_url,
            "blocked": blocked,
            "in_hand": self.in_hand(),
            "callbacks": d.callbacks_verdict().to_dict(),
            "extra": extra,
        }
        snapshot.update(d.membership.snapshot())
        return snapshot

    def sample(self) -> Sample:
        """The metrics' figures."""
        d = self.daemon
        if d.journal is None:
            return Sample()
        blocked = {g.scope.value: g.reason for g in d.gates.blocked()}
        try:
            oldest = d.journal.oldest_active_detected_at()
            files = {state.value: n for state, n in d.journal.counts().items()}
            cluster = d.membership.sample(self.in_hand())
            deliveries = (
                {s.value: n for s, n in d.journal.delivery_counts().items()} if d.config.deliver.enabled else None
            )
        except JournalWriteError:  # the database cannot be reached: what the daemon knows by itself
            return Sample(ready=d.is_ready, blocked=blocked, callbacks_arriving=d.callbacks_arriving())
        return Sample(
            files_by_state=files,
            oldest_pending_age_seconds=None if oldest is None else max(0.0, d.clock.now() - oldest),
            ready=d.is_ready,
            blocked=blocked,
            callbacks_arriving=d.callbacks_arriving(),
            cluster=cluster,
            deliveries=deliveries,
        )

    def in_hand(self) -> int:
        return len(self.daemon.dispatcher.inflight) if self.daemon.dispatcher else 0

    def pending(self) -> int:
        assert self.daemon.journal
        return sum(n for state, n in self.daemon.journal.counts().items() if state in ACTIVE)

    def describe(self, row_ids: list[int], names_shown: int = 10) -> str:
        """``2 upload(s) in flight (a.pdf, b.pdf), 1 exporting (c.pdf)``, from the journal's rows."""
        try:
            assert self.daemon.journal
            rows = self.daemon.journal.get_many(row_ids)
        except Exception as exc:  # say what we can: the ids
            return f"{len(row_ids)} step(s) (journal rows {', '.join(map(str, row_ids))}; {exc})"
        by_state: dict[State, list[Row]] = {}
        for row in rows:
            by_state.setdefault(row.state, []).append(row)
        parts = []
        for state, group in by_state.items():
            names = ", ".join(r.display_path for r in group[:names_shown])
            if len(group) > names_shown:
                names += f", and {len(group) - names_shown} more"
            what = "upload(s) in flight" if state == State.UPLOADING else state.value
            parts.append(f"{len(group)} {what} ({names})")
        return ", ".join(parts)
