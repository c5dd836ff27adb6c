"""failing -> failed: the .error.json next to the file in failed/, placed without clobbering."""

from __future__ import annotations

from .. import export, placing
from ..journal import Row, State
from ..policy import Step
from .context import Context, Outcome


def place_failed(ctx: Context, row: Row) -> Outcome:
    report = export.build_error(row, ctx.clock.now())
    return placing.place(
        ctx,
        row,
        ctx.config.folders.failed,
        export.ERROR_SUFFIX,
        report,
        lambda existing: export.error_is_for(row, existing),
        State.FAILED,
        Step.FAIL,
    )
