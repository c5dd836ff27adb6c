"""The state -> step table: which step works a row in each state, on which worker pool, and which
gates must be open for it. The dispatcher reads it; ``run`` follows it when a step hands its row on.

    claiming  -> the scheduler's claim batches (``steps/claim.py``), finished by start-up recovery
    claimed   -> upload     (validate; claimed -> uploading), then at once: send (-> uploaded)
    uploading -> reconcile  (after a crash or an ambiguous error: does the server have it?)
    uploaded  -> fetch      (is it done?), then at once: export
    exporting -> export     (the result and the file into done/)
    failing   -> fail       (the error report and the file into failed/)
    done      -> refresh    (a document reported again: its next revision, in place)

A step that moves its row on to a state whose step may run at once returns ``Then`` (a failed
file always goes on to ``fail``): ``run`` runs that state's ``at_once`` step next, on the same
thread, handing over what the first step holds (the open file, the fetched details).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .journal import Row, State
from .policy import Scope, Step
from .steps import export, fail, fetch, reconcile, refresh, send, upload
from .steps.context import Context, Outcome, Then

UPLOADS, RESULTS = "upload", "results"  # the worker pools


@dataclass(frozen=True)
class Work:
    """Rows in ``state`` run ``step`` (``run``) on ``pool``, needing ``scopes`` open. ``at_once``: the
    step for a row that another step has just moved into ``state`` (``Then``)."""

    state: State
    step: Step
    pool: str
    scopes: tuple[Scope, ...]
    run: Callable[..., Any]
    at_once: Callable[..., Outcome]


TABLE: dict[State, Work] = {
    # Reading the file from the processing folder needs the shares; asking the server about an
    # upload does not, nor does fetching a result (one fetched while the shares are away is kept).
    State.CLAIMED: Work(State.CLAIMED, Step.UPLOAD, UPLOADS, (Scope.API, Scope.SHARES), upload.upload, upload.upload),
    # Due rows in ``uploading`` are reconciled in one batch; a row that ``upload`` has just moved
    # here is sent (the POST) at once.
    State.UPLOADING: Work(State.UPLOADING, Step.RECONCILE, RESULTS, (Scope.API,), reconcile.reconcile, send.send),
    State.UPLOADED: Work(State.UPLOADED, Step.FETCH, RESULTS, (Scope.API,), fetch.fetch, fetch.fetch),
    State.EXPORTING: Work(
        State.EXPORTING,
        Step.EXPORT,
        RESULTS,
        (Scope.API, Scope.OUTPUT, Scope.SHARES),
        export.export_result,
        export.export_result,
    ),
    State.FAILING: Work(
        State.FAILING, Step.FAIL, RESULTS, (Scope.OUTPUT, Scope.SHARES), fail.place_failed, fail.place_failed
    ),
    # A done file whose document Konfuzio reported again (a review, a re-extraction): due at
    # ``refresh_at``, not ``next_at``; the new revision is fetched and written like an export.
    State.DONE: Work(
        State.DONE, Step.EXPORT, RESULTS, (Scope.API, Scope.OUTPUT, Scope.SHARES), refresh.refresh, refresh.refresh
    ),
}


def run(ctx: Context, outcome: Outcome) -> Row:
    """Follow a step's ``Then`` through the table until a step leaves its row to wait."""
    while isinstance(outcome, Then):
        outcome = TABLE[outcome.row.state].at_once(ctx, outcome.row, **outcome.carry)
    return outcome
