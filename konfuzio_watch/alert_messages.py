"""What an admin notification says: the bounded batch of facts a destination has not heard yet,
and the message built from it (pure, tested as a table).

A burst (10,000 failed files) must not become unbounded memory: a ``Batch`` names ``MAX_LISTED``
files and counts the rest, keeps ``MAX_NOTES`` changes of state and counts the rest.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from enum import Enum

from .status import format_age

MAX_LISTED = 20  # failed files named in one message; the rest are counted
MAX_NOTES = 20  # state changes (blocked, unblocked, ...) kept per batch; the rest are counted
MAX_STAGES = 12  # distinct stages counted per batch; further ones count as "other"
MAX_TEXT = 300  # characters kept of a path, an error or a reason


class NoteKind(Enum):
    BLOCKED = "blocked"
    UNBLOCKED = "unblocked"
    CALLBACKS = "callbacks"
    OLDEST = "oldest"


@dataclass(frozen=True)
class FailedFile:
    display_path: str
    stage: str
    error: str
    when: float


@dataclass(frozen=True)
class Note:
    """A change of state. ``detail``: the reason (BLOCKED, UNBLOCKED), the callback URL
    (CALLBACKS) or the file (OLDEST); ``seconds``: how long it was blocked (UNBLOCKED) or the
    file's age (OLDEST)."""

    kind: NoteKind
    when: float
    detail: str
    seconds: float = 0.0


@dataclass
class Batch:
    """Facts a destination has not heard yet, bounded whatever arrives."""

    files: list[FailedFile] = field(default_factory=list)
    more_files: int = 0  # failed files past MAX_LISTED: counted, not named
    stages: dict[str, int] = field(default_factory=dict)  # every failed file, by stage
    notes: list[Note] = field(default_factory=list)
    more_notes: int = 0  # notes past MAX_NOTES: counted only
    first_at: float | None = None  # when the oldest fact in it arrived

    def __bool__(self) -> bool:
        return self.first_at is not None

    @property
    def file_count(self) -> int:
        return len(self.files) + self.more_files

    def add_file(self, failed: FailedFile, now: float) -> None:
        if len(self.files) < MAX_LISTED:
            self.files.append(failed)
        else:
            self.more_files += 1
        self._count_stage(failed.stage, 1)
        self._arrived(now)

    def add_note(self, note: Note, now: float) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(note)
        else:
            self.more_notes += 1
        self._arrived(now)

    def merge(self, newer: Batch) -> None:
        """Append what ``newer`` holds, within the same bounds."""
        if not newer:
            return
        room = MAX_LISTED - len(self.files)
        self.files.extend(newer.files[:room])
        self.more_files += newer.more_files + len(newer.files[room:])
        for stage, count in newer.stages.items():
            self._count_stage(stage, count)
        room = MAX_NOTES - len(self.notes)
        self.notes.extend(newer.notes[:room])
        self.more_notes += newer.more_notes + len(newer.notes[room:])
        assert newer.first_at is not None
        self._arrived(newer.first_at)

    def _count_stage(self, stage: str, count: int) -> None:
        if stage not in self.stages and len(self.stages) >= MAX_STAGES:
            stage = "other"
        self.stages[stage] = self.stages.get(stage, 0) + count

    def _arrived(self, now: float) -> None:
        self.first_at = now if self.first_at is None else min(self.first_at, now)


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    level: str  # apprise's notify type: "failure", "warning" or "success"


def build_message(
    batch: Batch, *, host: str, name: str | None, now: float, config_path: str | None = None, tz: tzinfo | None = None
) -> Message:
    """The message for a batch: the title says what happened, the body what and what to do.

    ``tz``: for the times shown (None: the machine's local time zone).
    """

    def at(t: float) -> str:
        return _format_time(t, tz)

    cfg = f" -c {shlex.quote(config_path)}" if config_path else ""
    status_cmd = f"`konfuzio-watch status{cfg}`"
    block_notes = [n for n in batch.notes if n.kind in (NoteKind.BLOCKED, NoteKind.UNBLOCKED)]
    still_blocked = bool(block_notes) and block_notes[-1].kind is NoteKind.BLOCKED
    oldest = [n for n in batch.notes if n.kind is NoteKind.OLDEST]
    callbacks = [n for n in batch.notes if n.kind is NoteKind.CALLBACKS]

    summary: list[str] = []
    sections: list[str] = []
    if block_notes:
        last = block_notes[-1]
        summary.append(f"stopped working: {last.detail}" if still_blocked else "working again")
        lines = []
        for note in block_notes:
            if note.kind is NoteKind.BLOCKED:
                lines.append(f"Stopped working at {at(note.when)}: {note.detail}")
            else:
                lines.append(
                    f"Working again since {at(note.when)} (was stopped for {format_age(note.seconds)}: {note.detail})"
                )
        if still_blocked:
            lines.append(
                "No file is lost: new files wait in the inbox, and the daemon goes on by itself "
                f"once the cause is fixed. What to do: fix the cause; {status_cmd} shows what waits."
            )
        sections.append("\n".join(lines))
    if batch.file_count:
        n = batch.file_count
        summary.append(f"{n:,} file{'s' if n != 1 else ''} failed")
        lines = [f"{n:,} file{'s' if n != 1 else ''} failed; each is in failed/ with a .error.json that says why:"]
        lines += [f"- {f.display_path} ({f.stage}, {at(f.when)}): {f.error}" for f in batch.files]
        if batch.more_files:
            by_stage = ", ".join(
                f"{stage} {count:,}" for stage, count in sorted(batch.stages.items(), key=lambda kv: (-kv[1], kv[0]))
            )
            lines.append(f"- and {batch.more_files:,} more (all {n:,} by stage: {by_stage})")
        lines.append(
            f"What to do: {status_cmd} lists them; once the cause is fixed, "
            f"`konfuzio-watch retry{cfg} --all-failed` puts them through again."
        )
        sections.append("\n".join(lines))
    if oldest:
        note = oldest[-1]
        summary.append(f"a file has waited {format_age(note.seconds)}")
        sections.append(
            f"The oldest pending file has waited {format_age(note.seconds)} "
            f"(more than alerts.oldest_pending_seconds), at {at(note.when)}: {note.detail}\n"
            f"What to do: {status_cmd} shows what it waits for (uploads paused, no result yet, "
            "a stuck state)."
        )
    if callbacks:
        note = callbacks[-1]
        summary.append("callbacks do not arrive")
        sections.append(
            f"Konfuzio's callbacks do not arrive at {note.detail} (noticed at {at(note.when)}). "
            "Results are still fetched by polling, only later.\n"
            "What to do: make sure Konfuzio can reach that URL (firewall, reverse proxy, "
            "callback.public_url, ngrok)."
        )
    if batch.more_notes:
        sections.append(f"({batch.more_notes:,} further changes of state are not shown.)")

    where = f"konfuzio-watch on {host}" + (f" ({name})" if name else "")
    title = clip("; ".join(summary) or "nothing to report", 150) + f" — {where}"
    sections.append(f"-- {where}, {at(now)}")
    if still_blocked or batch.file_count:
        level = "failure"
    elif oldest or callbacks:
        level = "warning"
    else:
        level = "success"
    return Message(title=title, body="\n\n".join(sections), level=level)


def _format_time(t: float, tz: tzinfo | None) -> str:
    moment = datetime.fromtimestamp(t, tz) if tz is not None else datetime.fromtimestamp(t).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """One line of at most ``limit`` characters (an error may be a traceback or a page of HTML)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(batch: Batch) -> str:
    parts = []
    if batch.file_count:
        parts.append(f"{batch.file_count:,} failed file{'s' if batch.file_count != 1 else ''}")
    notes = len(batch.notes) + batch.more_notes
    if notes:
        parts.append(f"{notes:,} change{'s' if notes != 1 else ''} of state")
    return " and ".join(parts) or "nothing"
