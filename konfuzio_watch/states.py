"""The states of a file and the legal moves between them, written once.

``TRANSITIONS`` is the only statement of the state machine: the journal refuses any other move,
and the diagram below is drawn from it (a test keeps the two equal)::

    claiming  -> claimed
    claimed   -> uploading | failing
    uploading -> claimed | uploaded | failing
    uploaded  -> exporting | failing
    exporting -> claimed | failing | done
    failing   -> failed
    done      -> (final)
    failed    -> retried
    retried   -> (final)

A row is written in ``claiming`` before its file leaves the inbox; ``uploading`` is entered
(with the callback token's hash) before the POST, so a crash can always be reconciled;
``exporting``/``failing`` are entered before anything is written into done/ or failed/;
``exporting -> claimed``: the file changed after it was uploaded, so it is uploaded again.
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
        lines.append(f"{state.value:<{width}} -> {right}")
    return "\n".join(lines)
