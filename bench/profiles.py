"""Summarise py-spy's raw (collapsed-stack) recordings: where the daemon's CPU went.

The recordings are taken with ``--gil`` (only samples of the thread holding the GIL, i.e. running
Python code), so a sample is roughly "Python CPU" and waiting threads do not show up.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
OWN_PACKAGE = "konfuzio_watch/"


def load(path: Path) -> list[tuple[list[str], int]]:
    """``frame;frame;... count`` lines -> (frames root first, thread frame dropped; count)."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = [f for f in stack.split(";") if not f.startswith(("thread ", "process "))]
            stacks.append((frames, int(count)))
    return stacks


def _file(frame: str) -> str:
    match = _FRAME.match(frame)
    return match["file"] if match else frame


def _function(frame: str) -> str:
    """``Journal.update (konfuzio_watch/journal.py:171)`` -> ``konfuzio_watch/journal.py:Journal.update``."""
    match = _FRAME.match(frame)
    return f"{match['file']}:{match['func']}" if match else frame


def _library(frame: str) -> str:
    """The top-level package or module a frame's file belongs to (``json``, ``sqlite3``, ...)."""
    path = _file(frame)
    if path.startswith("<frozen"):
        return "importlib"
    head = path.split("/", 1)[0]
    return head[:-3] if head.endswith(".py") else head


def _is_import(frames: list[str]) -> bool:
    return any("importlib._bootstrap" in f for f in frames)


def breakdown(stacks: list[tuple[list[str], int]], limit: int = 10) -> dict[str, object]:
    """Samples outside imports, attributed three ways: to the innermost konfuzio_watch function on
    the stack (what the daemon was doing), to the library of the leaf frame, and to leaf functions."""
    imports = sum(c for frames, c in stacks if _is_import(frames))
    work = [(frames, c) for frames, c in stacks if frames and not _is_import(frames)]
    by_own: Counter[str] = Counter()
    by_library: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    for frames, count in work:
        own = [f for f in frames if _file(f).startswith(OWN_PACKAGE)]
        by_own[_function(own[-1]) if own else "(outside konfuzio_watch: " + _library(frames[0]) + ")"] += count
        by_library[_library(frames[-1])] += count
        by_leaf[_function(frames[-1])] += count
    return {
        "import_samples": imports,
        "work_samples": sum(c for _, c in work),
        "by_own_function": by_own.most_common(limit),
        "by_library": by_library.most_common(limit),
        "by_leaf": by_leaf.most_common(limit),
    }


def summary(folder: Path, limit: int = 10, rate_hz: int | None = None) -> str:
    out = [
        "py-spy profiles of the daemons (--gil: samples of the thread holding the GIL; start-up imports "
        "counted apart; % of the remaining samples):"
    ]
    for path in sorted(folder.glob("*.collapsed.txt")):
        b = breakdown(load(path), limit)
        work = int(b["work_samples"])  # type: ignore[call-overload]
        seconds = f" (~{work / rate_hz:.2f} s of Python CPU)" if rate_hz else ""
        out.append(f"\n{path.name}: {work} samples outside imports{seconds}, {b['import_samples']} in imports")
        if not work:
            continue
        for title, key in (
            ("innermost konfuzio_watch function", "by_own_function"),
            ("library of the leaf frame", "by_library"),
            ("leaf function", "by_leaf"),
        ):
            out.append(f"  by {title}:")
            out += [f"    {100 * c / work:5.1f} %  {name}" for name, c in b[key]]  # type: ignore[attr-defined]
    return "\n".join(out)
