"""The steps as one object for the daemon, the scheduler and the dispatcher: it builds the shared
step context once (with the one-node or cluster strategy, ``recovery.node_strategy``) and runs a
step for a row, following the state table (``pipeline.run``) while a step hands its row on.

The life of a file, one step per state (``pipeline.TABLE``; the moves are in ``states.py``)::

    claiming -> claimed -> uploading -> uploaded -> exporting -> done (-> done: refreshed)
                   \\           \\            \\
                    +-----------+------------+---> failing -> failed

A share the files are on (the inbox, the processing folder, done/, failed/) that does not answer
is never a file's fault: the work on the shares pauses as one blocked episode (``shares.py``), a
result fetched meanwhile is kept in the state folder (``kept_results.py``), and a file counts as
gone only when that is proven (ENOENT from a folder that answers as itself).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import pipeline, recovery
from .clock import Clock
from .config import Config
from .gates import Gates
from .journal import BaseJournal, Row, State
from .konfuzio import KonfuzioClient
from .metrics import Metrics
from .placing import KeyedLocks
from .policy import Step
from .shares import Folders
from .steps import claim, export, fetch, probes, reconcile, upload
from .steps.claim import ClaimsPaused
from .steps.context import Context, limits_from

__all__ = ["ClaimsPaused", "Pipeline", "limits_from"]


class Pipeline:
    def __init__(
        self,
        config: Config,
        journal: BaseJournal,
        client: KonfuzioClient,
        *,
        clock: Clock,
        gates: Gates,
        metrics: Metrics,
        callback_base: Callable[[], str],
        processing_dir: Path,
        on_transition: Callable[[Row, State], None] | None = None,
        rng: random.Random | None = None,
        folders: Folders | None = None,
    ):
        folders = folders or Folders([config.folders.inbox, processing_dir, config.folders.done, config.folders.failed])
        self.ctx = ctx = Context(
            config,
            journal,
            client,
            clock=clock,
            gates=gates,
            metrics=metrics,
            callback_base=callback_base,
            processing_dir=processing_dir,
            node=recovery.node_strategy(journal.shared, folders, processing_dir),
            placing_locks=KeyedLocks(),
            on_transition=on_transition,
            rng=rng,
            folders=folders,
        )
        ctx.probe_account = self.probe_account
        ctx.probe_shares = self.probe_shares

    # -- what the daemon reads (the hooks it sets late are the context's: ``pipeline.ctx``) --------

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def journal(self) -> BaseJournal:
        return self.ctx.journal

    @property
    def processing_dir(self) -> Path:
        return self.ctx.processing_dir

    def processing_path(self, row: Row) -> Path:
        return self.ctx.processing_path(row)

    def web_url(self, row: Row) -> str | None:
        return fetch.web_url(self.ctx, row)

    # -- running steps --------------------------------------------------------------------------

    def work(self, row: Row) -> Row:
        """The step of the row's state (``pipeline.TABLE``), and the steps it hands the row on to."""
        return pipeline.run(self.ctx, pipeline.TABLE[row.state].run(self.ctx, row))

    def claim(self, rel_paths: list[bytes], detected_at: dict[bytes, float] | None = None) -> list[Row]:
        return claim.claim(self.ctx, rel_paths, detected_at)

    def upload(self, row: Row) -> Row:
        return pipeline.run(self.ctx, upload.upload(self.ctx, row))

    def reconcile(self, rows: list[Row]) -> list[Row]:
        return [pipeline.run(self.ctx, out) for out in reconcile.reconcile(self.ctx, rows)]

    def check_result(self, row: Row) -> Row:
        return pipeline.run(self.ctx, fetch.fetch(self.ctx, row))

    def export(self, row: Row, details: dict[str, Any] | None = None, checked_at: float | None = None) -> Row:
        return pipeline.run(self.ctx, export.export_result(self.ctx, row, details, checked_at))

    def handle_internal_error(self, rows: list[Row], step: Step, exc: BaseException) -> None:
        for out in self.ctx.handle_internal_error(rows, step, exc):
            pipeline.run(self.ctx, out)

    # -- probes ---------------------------------------------------------------------------------

    def probe_account(self) -> bool:
        return probes.probe_account(self.ctx)

    def probe_shares(self) -> bool:
        return probes.probe_shares(self.ctx)

    def reload_token(self) -> None:
        probes.reload_token(self.ctx)

    # -- recovery -------------------------------------------------------------------------------

    def recover(self, in_hand: Iterable[int] = (), alone: bool = True) -> int:
        return recovery.recover(self.ctx, in_hand, alone)

    def take_over(self, *, own: bool = False, exclude: Iterable[int] = ()) -> list[Row]:
        return recovery.take_over(self.ctx, own=own, exclude=exclude)

    def adopt_orphans(self) -> list[Path]:
        return recovery.adopt_orphans(self.ctx)
