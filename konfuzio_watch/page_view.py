"""What the status page shows, read from the running daemon: its snapshot (the same as ``/status``)
and a few bounded journal reads (the counts ``status`` prints, the files finished in the last hour
and day, the oldest waiting and the latest failed files, the nodes of a cluster); and the page's
retry, which does what ``konfuzio-watch retry`` does, through the daemon's journal.

Reads cost the same whatever the history: the counts go through the ``(state, next_at)`` index as
``status`` and ``/metrics`` do, the files finished in the last hour and day are a range of the
``files_finished`` index, and the lists are the ``SHOWN`` first.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from .journal import ACTIVE, IllegalTransition, State
from .monitor import iso
from .page import pending_of
from .policy import Scope
from .results import web_url
from .retry import retry_row

if TYPE_CHECKING:
    from .daemon import Daemon

SHOWN = 20  # files listed per table; the rest are counted
HOUR_S, DAY_S = 3600.0, 86400.0


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def per_minute(finished: list[tuple[State, float]], now: float, minutes: int = 60) -> list[list[int]]:
    """[done, failed] per minute of the last ``minutes``, oldest first (the chart's bars)."""
    bars = [[0, 0] for _ in range(minutes)]
    for state, at in finished:
        ago = int((now - at) // 60)
        if 0 <= ago < minutes:
            bars[minutes - 1 - ago][0 if state == State.DONE else 1] += 1
    return bars


class PageView:
    """The page's view of one daemon; called on the monitor's threads."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        m = daemon.config.monitor
        self.retry_allowed = is_loopback(m.host) or m.allow_retry

    def view(self) -> dict[str, Any]:
        d = self.daemon
        snapshot = d.snapshot()
        journal = d.journal
        assert journal is not None
        now = d.clock.now()
        counts = {state.value: n for state, n in journal.counts().items()}
        oldest = journal.oldest_active_detected_at()
        day = journal.finished_counts_since(now - DAY_S)
        hour = journal.finished_times_since(now - HOUR_S)
        host = d.config.konfuzio.host
        extra = snapshot.get("extra") or {}
        candidates = extra.get("candidates") if isinstance(extra, dict) else None
        return {
            "title": f"konfuzio-watch on {snapshot['host']}",
            "status": snapshot["status"],
            "line": snapshot["line"],
            "host": snapshot["host"],
            "pid": snapshot["pid"],
            "started_at": snapshot["started_at"],
            "now": iso(now),
            "counts": counts,
            "pending": pending_of(counts),
            "oldest_age_s": None if oldest is None else max(0.0, now - oldest),
            "finished": {
                "done_1h": sum(1 for s, _ in hour if s == State.DONE),
                "failed_1h": sum(1 for s, _ in hour if s == State.FAILED),
                "done_24h": day[State.DONE],
                "failed_24h": day[State.FAILED],
            },
            "per_minute": per_minute(hour, now),
            "blocked": [self._gate(g, now) for g in snapshot["blocked"]],
            "callbacks": (snapshot.get("callbacks") or {}).get("text"),
            "unsettled": len(candidates) if isinstance(candidates, list) else None,
            "waiting": [
                {
                    "id": r.id,
                    "name": r.display_path,
                    "state": r.state.value,
                    "stage": r.stage,
                    "age_s": max(0.0, now - r.detected_at),
                    "error": r.error,
                }
                for r in journal.oldest_active_rows(SHOWN)
            ],
            "waiting_total": sum(counts[s.value] for s in ACTIVE),
            "failed": [
                {
                    "id": r.id,
                    "name": r.display_path,
                    "stage": r.stage,
                    "error": r.error,
                    "url": web_url(host, r.document_id) if r.document_id is not None else None,
                    "age_s": max(0.0, now - (r.finished_at or r.updated_at)),
                }
                for r in journal.latest_rows(State.FAILED, SHOWN)
            ],
            "failed_total": counts[State.FAILED.value],
            "nodes": self._nodes() if journal.shared else None,
        }

    def _gate(self, gate: dict[str, Any], now: float) -> dict[str, Any]:
        """A blocked gate of the snapshot, with when its next probe goes (None: one is out now)."""
        probe_at = self.daemon.gates[Scope(gate["scope"])].next_probe_at()
        return {**gate, "next_probe_s": None if probe_at is None else max(0.0, probe_at - now)}

    def _nodes(self) -> list[dict[str, Any]]:
        journal = self.daemon.journal
        assert journal is not None
        leased = journal.leases_by_node()
        lease_s = self.daemon.config.node.lease_seconds
        nodes = [
            {
                "id": n.id,
                "host": n.host,
                "pid": n.pid,
                "heard_s": n.silent_s,
                "files": leased.get(n.id, 0),
                "silent": n.silent_s > lease_s,
            }
            for n in journal.nodes()
        ]
        known = {n["id"] for n in nodes}
        return nodes + [
            {"id": gone, "host": "-", "pid": None, "heard_s": None, "files": n, "silent": False}
            for gone, n in sorted(leased.items())
            if gone not in known
        ]

    def retry(self, row_id: int) -> str:
        """Put the failed file of row ``row_id`` back into the inbox; one line saying what happened."""
        d = self.daemon
        assert d.journal is not None
        try:
            return retry_row(d.journal, d.config, row_id, d.clock.now())
        except (KeyError, IllegalTransition) as exc:
            return f"row {row_id}: nothing to retry ({type(exc).__name__}: {exc})"
        except OSError as exc:
            return f"row {row_id}: cannot put it back: {exc.strerror or exc}"
