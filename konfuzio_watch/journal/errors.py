"""What goes wrong with a journal: it cannot be used, a write did not happen, the server is away."""

from __future__ import annotations


class JournalError(Exception):
    """The journal cannot be used (e.g. it would live on a network file system)."""


class JournalWriteError(Exception):
    """The database could not write (disk full, I/O error, read-only): nothing of the write happened;
    or (SQLite) its transaction is committed but the fsync that makes it durable failed: as after a
    crash right after the commit, which start-up recovery (run again when the journal takes writes)
    finishes. Nothing is acted on that is not known to be durable."""


class JournalUnavailable(JournalWriteError):
    """The database server cannot be reached (down, restarting, the network): nothing of the write
    happened, and a read could not be made either. A ``JournalWriteError``, so that whatever pauses
    on a journal that cannot write pauses on this too, and resumes when ``probe`` succeeds again."""
