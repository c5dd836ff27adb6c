"""The journal: one row per file, its ``state`` is its place in the pipeline.

The only package with SQL. ``open_journal(config)`` opens the one the config names: SQLite (the
embedded default, one daemon) or PostgreSQL (one journal for a cluster of daemons on one inbox).

- ``rows.py``: ``Row``, ``NewClaim``, the columns; ``errors.py``: what goes wrong.
- ``schema.py``: the schema, described once and rendered in both dialects; the one migration runner.
- ``engine.py`` -> ``reads.py`` -> ``base.py``: ``BaseJournal``, the interface and the row SQL both
  engines share, written once over the transactions each engine provides.
- ``coordination.py``: the cluster (nodes, leases, roles, notifications) behind one interface, and
  ``LocalCoordination`` for one node.
- ``sqlite.py``: ``SqliteJournal`` (group commit), with local coordination.
- ``pg.py``: ``PgJournal``, with ``pg_cluster.PgCoordination``; ``pg_sql.py``: what they share.
  Imported only for a ``journal.url`` (psycopg is an extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..states import ACTIVE, FINISHED, TERMINAL, IllegalTransition, State
from .base import BaseJournal
from .coordination import CHANNEL, Coordination, Lease, Listener, LocalCoordination, Node, Role, default_node_id
from .errors import JournalError, JournalUnavailable, JournalWriteError
from .rows import NewClaim, Row, display_name
from .sqlite import NETWORK_FILESYSTEMS, SqliteJournal, filesystem_type

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "ACTIVE",
    "CHANNEL",
    "FINISHED",
    "NETWORK_FILESYSTEMS",
    "TERMINAL",
    "BaseJournal",
    "Coordination",
    "IllegalTransition",
    "Journal",
    "JournalError",
    "JournalUnavailable",
    "JournalWriteError",
    "Lease",
    "Listener",
    "LocalCoordination",
    "NewClaim",
    "Node",
    "Role",
    "Row",
    "SqliteJournal",
    "State",
    "default_node_id",
    "display_name",
    "filesystem_type",
    "open_journal",
]

#: The name existing callers use: the SQLite journal.
Journal = SqliteJournal


def open_journal(config: Config, **kwargs: Any) -> BaseJournal:
    """The journal the config names: PostgreSQL with a ``journal.url``, else SQLite in ``folders.state``.
    Keyword arguments go to the journal's class (e.g. ``migrate=False`` for PostgreSQL)."""
    url = config.journal.url
    if url is None:
        return SqliteJournal(config.journal_path, node_id=config.node_id, **kwargs)
    try:
        from .pg import PgJournal
    except ImportError as exc:
        raise JournalError(f"journal.url: PostgreSQL needs psycopg ({exc}); install konfuzio-watch[postgres]") from None
    kwargs.setdefault("lease_s", config.node.lease_seconds)
    return PgJournal(url, password=config.journal_password(), node_id=config.node_id, **kwargs)
