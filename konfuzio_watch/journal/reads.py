"""The reads of the shared row SQL: rows by id, state, token and content, what is due, the figures."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..states import ACTIVE, TERMINAL, State
from .engine import Engine
from .rows import COLS, F_COLS, Row, in_list, marks


class JournalReads(Engine):
    """Reads, the same on every engine: each on one connection of the engine's (``_read``)."""

    def tokens_of(self, row_ids: Iterable[int]) -> dict[str, int]:
        """Every upload attempt's token hash of these rows -> row id."""
        ids = list(row_ids)
        found: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            with self._read() as tx:
                found.update(
                    tx.execute(
                        f"SELECT token_hash, row_id FROM upload_tokens WHERE row_id IN ({marks(chunk)})", chunk
                    ).fetchall()
                )
        return found

    def first_sent_at(self, row_ids: Iterable[int]) -> float | None:
        """When the earliest upload attempt of these rows was sent."""
        ids = list(row_ids)
        earliest: float | None = None
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            with self._read() as tx:
                found = tx.execute(
                    f"SELECT MIN(sent_at) FROM upload_tokens WHERE row_id IN ({marks(chunk)})", chunk
                ).fetchone()[0]
            if found is not None and (earliest is None or found < earliest):
                earliest = found
        return earliest

    def tokens_with_documents(self, since: float) -> dict[str, tuple[int, int]]:
        """Tokens sent since ``since`` by files that were uploaded more than once and have their
        document: token -> (row id, document id). A listed document carrying one of them but another
        id is a late copy of an earlier attempt."""
        with self._read() as tx:
            rows = tx.execute(
                "SELECT t.token_hash, f.id, f.document_id FROM upload_tokens t JOIN files f ON f.id = t.row_id"
                " WHERE t.sent_at >= ? AND f.document_id IS NOT NULL AND t.row_id IN"
                " (SELECT row_id FROM upload_tokens WHERE sent_at >= ? GROUP BY row_id HAVING COUNT(*) > 1)",
                (since, since),
            ).fetchall()
        return {token: (row_id, document_id) for token, row_id, document_id in rows}

    def pending_extras(self, limit: int = 100) -> list[tuple[int, int, int | None]]:
        """(document id, row id, project id) of extra documents not deleted yet."""
        with self._read() as tx:
            return [
                tuple(found)
                for found in tx.execute(
                    "SELECT document_id, row_id, project_id FROM extra_documents WHERE deleted_at IS NULL AND"
                    " error IS NULL ORDER BY found_at, document_id LIMIT ?",
                    (limit,),
                ).fetchall()
            ]

    def due_refreshes(self, now: float, exclude: Iterable[int], limit: int) -> list[Row]:
        """Done rows whose ``refresh_at`` has come, earliest first, skipping ``exclude``."""
        not_excluded, exclude_ = in_list("id", list(exclude), negate=True)
        return self._select(
            f"SELECT {COLS} FROM files WHERE refresh_at <= ? AND state = ? AND {not_excluded}"
            " ORDER BY refresh_at, id LIMIT ?",
            (now, State.DONE.value, *exclude_, limit),
        )

    def next_refresh_at(self, exclude: Iterable[int]) -> float | None:
        not_excluded, exclude_ = in_list("id", list(exclude), negate=True)
        with self._read() as tx:
            return tx.execute(
                f"SELECT MIN(refresh_at) FROM files WHERE refresh_at IS NOT NULL AND state = ?"
                f" AND {not_excluded}{self._LEASE_GUARD}",
                (State.DONE.value, *exclude_, *self._guard),
            ).fetchone()[0]

    def get(self, row_id: int) -> Row:
        rows = self._select(f"SELECT {COLS} FROM files WHERE id = ?", (row_id,))
        if not rows:
            raise KeyError(row_id)
        return rows[0]

    def get_many(self, row_ids: Sequence[int]) -> list[Row]:
        found: dict[int, Row] = {}
        for start in range(0, len(row_ids), 500):
            chunk = list(row_ids[start : start + 500])
            for row in self._select(f"SELECT {COLS} FROM files WHERE id IN ({marks(chunk)})", chunk):
                found[row.id] = row
        return [found[i] for i in row_ids if i in found]

    def runnable(self, states: Iterable[State], now: float, exclude: Iterable[int], limit: int) -> list[Row]:
        """Rows in ``states`` whose ``next_at`` has come, oldest first, skipping ``exclude``."""
        in_states, states_ = in_list("state", [s.value for s in states])
        not_excluded, exclude_ = in_list("id", list(exclude), negate=True)
        sql = (
            f"SELECT {COLS} FROM files WHERE {in_states} AND next_at <= ? AND {not_excluded}"
            " ORDER BY next_at, id LIMIT ?"
        )
        return self._select(sql, (*states_, now, *exclude_, limit))

    def next_due_at(self, states: Iterable[State], exclude: Iterable[int]) -> float | None:
        """The earliest ``next_at`` of rows in ``states``, skipping ``exclude`` and rows another node
        holds (in hand there; or, expired, waiting to be taken over with ``take_over_expired``)."""
        return min(self.next_due_by_state(states, exclude).values(), default=None)

    def next_due_by_state(self, states: Iterable[State], exclude: Iterable[int]) -> dict[State, float]:
        """``next_due_at`` of each of ``states`` in one query (the scheduling loop asks after every
        event); a state without rows is left out."""
        # Per state, the first row in (state, next_at) index order that is not excluded: a walk over
        # at most the rows in hand. MIN(next_at) with the exclusion visited every row of the states,
        # after every event of the loop, and a backlog has many rows.
        wanted = list(dict.fromkeys(states))
        if not wanted:
            return {}
        not_excluded, exclude_ = in_list("id", list(exclude), negate=True)
        first = (
            f"(SELECT next_at FROM files WHERE state = ? AND next_at IS NOT NULL AND {not_excluded}"
            f"{self._NOT_OTHERS} ORDER BY next_at LIMIT 1)"
        )
        params = [p for state in wanted for p in (state.value, *exclude_, *self._not_others)]
        with self._read() as tx:
            found = tx.execute("SELECT " + ", ".join([first] * len(wanted)), params).fetchone()
        return {state: due for state, due in zip(wanted, found, strict=True) if due is not None}

    def rows(self, states: Iterable[State] = (), limit: int = 1000) -> list[Row]:
        values = [s.value for s in states]
        if values:
            where, values = in_list("state", values)
            return self._select(f"SELECT {COLS} FROM files WHERE {where} ORDER BY id LIMIT ?", (*values, limit))
        return self._select(f"SELECT {COLS} FROM files ORDER BY id LIMIT ?", (limit,))

    def find_by_token_hash(self, token_hash: str) -> Row | None:
        rows = self._select(
            f"SELECT {F_COLS} FROM upload_tokens t JOIN files f ON f.id = t.row_id WHERE t.token_hash = ?",
            (token_hash,),
        )
        return rows[0] if rows else None

    def claim_names(self, states: Iterable[State]) -> set[bytes]:
        """The processing/ names of rows in these states (legacy rows: their id)."""
        where, values = in_list("state", [s.value for s in states])
        with self._read() as tx:
            found = tx.execute(f"SELECT id, claim_name FROM files WHERE {where}", values).fetchall()
        return {bytes(name) if name is not None else str(row_id).encode() for row_id, name in found}

    def finished_claims(self, names: Iterable[bytes]) -> dict[bytes, Row]:
        """Done or failed rows whose processing/ name is one of ``names``: claim name -> row."""
        wanted = list(names)
        found: dict[bytes, Row] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            where, states = in_list("state", [s.value for s in TERMINAL])
            for row in self._select(
                f"SELECT {COLS} FROM files WHERE claim_name IN ({marks(chunk)}) AND {where}", (*chunk, *states)
            ):
                assert row.claim_name is not None
                found[bytes(row.claim_name)] = row
        return found

    def find_same_content(self, sha256: str, exclude_id: int) -> Row | None:
        """The earliest other file with this content that is done or on its way there."""
        where, states = in_list(
            "state", [State.DONE.value, State.UPLOADING.value, State.UPLOADED.value, State.EXPORTING.value]
        )
        rows = self._select(
            f"SELECT {COLS} FROM files WHERE sha256 = ? AND id != ? AND {where} ORDER BY id LIMIT 1",
            (sha256, exclude_id, *states),
        )
        return rows[0] if rows else None

    def counts(self) -> dict[State, int]:
        with self._read() as tx:
            found = dict(tx.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        return {state: found.get(state.value, 0) for state in State}

    def oldest_active(self) -> Row | None:
        where, states = in_list("state", [s.value for s in ACTIVE])
        rows = self._select(f"SELECT {COLS} FROM files WHERE {where} ORDER BY detected_at LIMIT 1", states)
        return rows[0] if rows else None

    def oldest_active_detected_at(self) -> float | None:
        where, states = in_list("state", [s.value for s in ACTIVE])
        with self._read() as tx:
            return tx.execute(f"SELECT MIN(detected_at) FROM files WHERE {where}", states).fetchone()[0]

    def oldest_active_rows(self, limit: int) -> list[Row]:
        """The ``limit`` unfinished rows detected first (the status page's "oldest waiting")."""
        where, states = in_list("state", [s.value for s in ACTIVE])
        return self._select(
            f"SELECT {COLS} FROM files WHERE {where} ORDER BY detected_at, id LIMIT ?", (*states, limit)
        )

    def latest_rows(self, state: State, limit: int) -> list[Row]:
        """The ``limit`` rows in ``state`` written last (the newest ids), newest first."""
        return self._select(f"SELECT {COLS} FROM files WHERE state = ? ORDER BY id DESC LIMIT ?", (state.value, limit))

    def finished_counts_since(self, since: float) -> dict[State, int]:
        """Done and failed rows that finished at ``since`` or later, by state (a failed file that was
        retried since is ``retried``, and counted by its new row)."""
        with self._read() as tx:
            found = dict(
                tx.execute(
                    "SELECT state, COUNT(*) FROM files WHERE state IN (?, ?) AND finished_at >= ? GROUP BY state",
                    (State.DONE.value, State.FAILED.value, since),
                ).fetchall()
            )
        return {state: found.get(state.value, 0) for state in (State.DONE, State.FAILED)}

    def finished_times_since(self, since: float) -> list[tuple[State, float]]:
        """(state, finished_at) of the done and failed rows that finished at ``since`` or later."""
        with self._read() as tx:
            found = tx.execute(
                "SELECT state, finished_at FROM files WHERE state IN (?, ?) AND finished_at >= ?",
                (State.DONE.value, State.FAILED.value, since),
            ).fetchall()
        return [(State(state), at) for state, at in found]
