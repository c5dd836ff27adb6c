"""``konfuzio-watch redeliver``: send deliveries again (``delivery.py``).

A placed file's last delivery that failed or was delivered becomes pending again, due now, with the
same idempotency key: the receiver can tell it has seen it. ``--all-failed``: every delivery that
finally failed. A file is named by its path in done/ or failed/ (absolute, or relative to that
folder or to the inbox it came from). The running daemon picks them up within seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .config import Config
from .journal import display_name, open_journal
from .journal.outbox import DeliveryRow, DeliveryState

AGAIN = (DeliveryState.FAILED, DeliveryState.DELIVERED)


def redeliver(config: Config, paths: Iterable[str], all_failed: bool, now: float) -> tuple[list[str], int]:
    """Returns (one message per delivery or path, number of paths that matched nothing)."""
    journal = open_journal(config) if config.journal.url is None else open_journal(config, migrate=False, wait_s=5.0)
    try:
        now += journal.clock_offset().offset_s  # "due now" for the nodes of a cluster: by the database's clock
        every = journal.deliveries(limit=10_000_000)
        chosen: dict[int, DeliveryRow] = {}
        if all_failed:
            chosen.update((d.id, d) for d in every if d.state == DeliveryState.FAILED)
        messages, unmatched = [], 0
        for path in paths:
            wanted = _names(config, path)
            of_file = [d for d in every if d.file_path in wanted or d.json_path in wanted]
            again = [d for d in of_file if d.state in AGAIN]
            if not again:
                pending = any(d.state == DeliveryState.PENDING for d in of_file)
                messages.append(
                    f"{path}: its delivery is pending: nothing to send again"
                    if pending
                    else f"{path}: no delivered or failed delivery of a file by that name"
                )
                unmatched += 0 if pending else 1
                continue
            last = again[-1]  # the file's latest (an older revision's body is gone: superseded if sent)
            chosen[last.id] = last
        for d in journal.redeliver(sorted(chosen), now):
            messages.append(f"{display_name(d.file_path)}: delivery {d.key} ({d.event}) will be sent again")
        if all_failed and not chosen and not paths:
            messages.append("nothing to redeliver: no delivery has failed")
        return messages, unmatched
    finally:
        journal.close()


def _names(config: Config, path: str) -> set[bytes]:
    """What ``path`` may mean: as given, absolute, or relative to done/, failed/ (and from the inbox)."""
    f = config.folders
    return {
        os.fsencode(path),
        os.fsencode(os.path.abspath(path)),
        os.fsencode(str(f.done / path)),
        os.fsencode(str(f.failed / path)),
    }
