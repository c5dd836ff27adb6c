"""The metrics a file's moves give: done and failed files (failed ones by the stage that failed them,
``Stage``'s name: a bounded label), and how long from detection to the upload and to the result."""

from __future__ import annotations

from .journal import Row, State
from .metrics import Metrics
from .states import Stage


def count_transition(metrics: Metrics, row: Row, old: State) -> None:
    """Called after every move this daemon makes (``Context.move``'s ``on_transition``)."""
    if row.state == State.UPLOADED and row.uploaded_at is not None:
        metrics.upload_latency.observe(max(0.0, row.uploaded_at - row.detected_at))
    elif row.state == State.DONE:
        metrics.files_done.inc()
        metrics.result_latency.observe(max(0.0, (row.finished_at or row.updated_at) - row.detected_at))
    elif row.state == State.FAILED:
        metrics.files_failed.labels(stage_label(row.stage)).inc()


def stage_label(stage: str | None) -> str:
    """``upload``, ``processing``, ...; ``other`` for a stage that is free text (or none)."""
    known = Stage.of(stage)
    return known.name.lower() if known is not None else "other"
