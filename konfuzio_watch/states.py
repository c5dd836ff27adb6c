"""The states of a file and the legal moves between them, written once.

``TRANSITIONS`` is the only statement of the state machine: the journal refuses any other move,
and the diagram below is drawn from it (a test keeps the two equal)::

    claiming  -> claimed
    claimed   -> uploading | failing
    uploading -> claimed | uploaded | failing
    uploaded  -> exporting | failing
    exporting -> claimed | failing | done
    failing   -> failed
    done      -> (final); refreshed in place: done -> done
    failed    -> retried
    retried   -> (final)

A row is written in ``claiming`` before its file leaves the inbox; ``uploading`` is entered
(with the callback token's hash) before the POST, so a crash can always be reconciled;
``exporting``/``failing`` are entered before anything is written into done/ or failed/;
``exporting -> claimed``: the file changed after it was uploaded, so it is uploaded again.
``done -> done`` is the one cycle (``CYCLES``): a done file whose document Konfuzio reported again
(a review, a re-extraction) is worked again where it is; the refresh writes the next revision of
its result and the row stays ``done`` (no transition through the journal).

``pipeline.py`` names the step that works each state; ``Stage`` names the fixed stages a row's
``stage`` column shows (it also holds the server's status names and times, as free text).
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    CLAIMING = "claiming"  # row written; the file may still be in the inbox
    CLAIMED = "claimed"  # the file is in processing/, waiting for a validation + upload slot
    UPLOADING = "uploading"  # token stored; the upload POST may have reached the server
    UPLOADED = "uploaded"  # the server has it (document_id known); waiting for callback/poll
    EXPORTING = "exporting"  # server says done; writing the JSON and moving into done/
    FAILING = "failing"  # decided to fail; writing the .error.json and moving into failed/
    DONE = "done"
    FAILED = "failed"
    RETRIED = "retried"  # was failed; ``konfuzio-watch retry`` put the file back into the inbox


TRANSITIONS: dict[State, frozenset[State]] = {
    State.CLAIMING: frozenset({State.CLAIMED}),
    State.CLAIMED: frozenset({State.UPLOADING, State.FAILING}),
    State.UPLOADING: frozenset({State.CLAIMED, State.UPLOADED, State.FAILING}),
    State.UPLOADED: frozenset({State.EXPORTING, State.FAILING}),
    State.EXPORTING: frozenset({State.CLAIMED, State.DONE, State.FAILING}),
    State.FAILING: frozenset({State.FAILED}),
    State.FAILED: frozenset({State.RETRIED}),
    State.DONE: frozenset(),
    State.RETRIED: frozenset(),
}

# Moves that keep the state: a step that works a row again where it is (``steps/refresh.py``).
CYCLES: dict[State, frozenset[State]] = {State.DONE: frozenset({State.DONE})}

ACTIVE = (State.CLAIMING, State.CLAIMED, State.UPLOADING, State.UPLOADED, State.EXPORTING, State.FAILING)
FINISHED = (State.DONE, State.FAILED)
TERMINAL = (State.DONE, State.FAILED, State.RETRIED)


class IllegalTransition(Exception):
    """A move the state table does not allow, or a row that is no longer in the state the
    caller read (someone else moved it first)."""


def check_transition(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old} -> {new} is not a legal move")


def diagram() -> str:
    """The state table drawn as text: one line per state, in the order of the enum."""
    order = list(State)
    width = max(len(s.value) for s in order)
    lines = []
    for state in order:
        targets = sorted(TRANSITIONS[state], key=order.index)
        right = " | ".join(t.value for t in targets) if targets else "(final)"
        for again in sorted(CYCLES.get(state, ()), key=order.index):
            right += f"; refreshed in place: {state.value} -> {again.value}"
        lines.append(f"{state.value:<{width}} -> {right}")
    return "\n".join(lines)


class Stage(enum.StrEnum):
    """What a row is doing within its state, or which step failed it: the fixed values of the
    ``stage`` column (stored as these strings). The column also shows free text no member names:
    the server's status of a processing document, and until when an upload is looked for."""

    CLAIM = "claim"
    VALIDATE = "validate"  # the file cannot be sent as it is (empty, too big, not a regular file ...)
    DUPLICATE = "duplicate"  # upload.on_duplicate: fail
    UPLOAD = "upload"
    RECONCILE = "reconcile"
    PROCESSING = "processing"  # Konfuzio could not process the document
    FETCH = "fetch"
    RESULT = "result"  # fetching the result failed
    EXPORT = "export"
    TOO_LONG = "too_long"  # its path does not fit into done/: failed/ gets a short name
    VANISHED = "vanished"  # gone from processing/ before it was placed
    FAIL = "fail"
    # An upload the application answered with an error (500): its handler has finished, so one look at
    # the document list settles whether it stored the file; no reconcile window (policy.reconcile_window_s).
    ANSWERED = "upload answered an error: one look on the server, then uploaded again if not there"
    REVIEW = "waiting for review in Konfuzio"  # results.require_review: done, not reviewed yet
    SPLITTING = "waiting for splitting confirmation in Konfuzio"  # server status 41

    @classmethod
    def of(cls, text: str | None) -> Stage | None:
        """The member a ``stage`` column's text is, or None (free text, or no stage)."""
        return cls._value2member_map_.get(text) if text is not None else None  # type: ignore[return-value]


# Statuses in which a document waits for a person in Konfuzio (the row's stage says so).
PERSON_STAGES = {41: Stage.SPLITTING}
# The stages of an uploaded file that waits for a person in Konfuzio, not for the machine.
WAITING_FOR_A_PERSON = frozenset({Stage.REVIEW, Stage.SPLITTING})


class CallbackOutcome(enum.StrEnum):
    """What a callback came to (``journal.record_callback``); the strings label the metric."""

    RECORDED = "recorded"  # the fact is stored: the file's document is looked at now
    UNKNOWN = "unknown"  # no such token
    MISMATCH = "mismatch"  # the body names another document than the one the token was issued for
    EXTRA = "extra"  # an earlier attempt's token naming another document: a late copy, to be deleted
    FINISHED = "finished"  # the file is done/failed already (a replay; or a done file's next revision)
    PROBE = "probe"  # the daemon's own reachability probe
