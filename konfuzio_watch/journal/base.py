"""The journal's interface, ``BaseJournal``: the shared row SQL of every engine, its writes here
(claims, moves, uploads, callbacks, refreshes) atop its reads (``reads.py``) and the engine's
transactions (``engine.py``).

A write returns once its transaction is durable: SQLite (WAL mode) commits it and the journal fsyncs
the WAL before the caller goes on, several threads' commits sharing one fsync (group commit); so a
row read back after SIGKILL or power loss is a fact. A few writes are marked ``durable=False``:
committed (visible at once, and kept by SIGKILL, which leaves the page cache alone), made durable by
the next durable write of any thread (the WAL is a log: an fsync covers every commit before it).
They are the steps whose loss in a power failure start-up recovery redoes without any outside effect
twice; each such call says why.

Moves between states are checked against the table in ``states.py`` and guarded by the state the
caller read (``WHERE state = ?``), so a row cannot be moved twice or sideways. A write that the
database cannot make (disk full, I/O error, read-only, the server gone) raises ``JournalWriteError``.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable, Sequence

from ..states import ACTIVE, TERMINAL, CallbackOutcome, IllegalTransition, State, check_transition
from .outbox import NewDelivery, Outbox
from .reads import JournalReads
from .rows import COLS, COLUMNS, REFRESH_GAP_S, UPDATABLE, NewClaim, Row, in_list, marks, to_row


class BaseJournal(Outbox, JournalReads):
    """Thread-safe access to the journal, whichever database holds it. Every public method behaves
    the same on every engine (``tests/test_journal.py`` runs the same tests on each); the cluster's
    are the ``Coordination`` interface (``coordination.py``)."""

    # -- writes: each one transaction -------------------------------------------------------

    def add_claims(self, claims: Sequence[bytes | NewClaim], now: float) -> list[Row]:
        """Record files about to be claimed, in one transaction; returns their rows.

        A file that another node has claimed already (an active row with the same inbox path and
        inode: PostgreSQL's unique index) gets no row: the rows returned are those of the claims
        this call made, in order (on SQLite, one per claim)."""
        claims = [c if isinstance(c, NewClaim) else NewClaim(c, secrets.token_hex(8).encode()) for c in claims]
        rows: list[Row] = []
        with self._write() as tx:  # durable: the claim is on disk before the file leaves the inbox
            for c in claims:
                found = tx.execute(
                    "INSERT INTO files (rel_path, state, detected_at, updated_at, next_at, claim_name, file_dev,"
                    " file_ino) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                    (c.rel_path, State.CLAIMING.value, c.detected_at or now, now, now, c.claim_name, c.dev, c.ino),
                ).fetchone()
                if found is not None:  # the row as inserted (every other column at its default)
                    rows.append(
                        Row(
                            found[0],
                            c.rel_path,
                            State.CLAIMING,
                            None,
                            None,
                            None,
                            None,
                            None,
                            0,
                            now,
                            None,
                            None,
                            None,
                            None,
                            None,
                            None,
                            c.detected_at or now,
                            now,
                            None,
                            0,
                            c.claim_name,
                            c.dev,
                            c.ino,
                        )
                    )
            if rows:
                self._lease_new(tx, [r.id for r in rows])
                tx.notify(f"due:{now!r}")
        return rows

    def transition(
        self,
        row: Row,
        state: State,
        now: float,
        *,
        durable: bool = True,
        refresh_if_called_back_since: float | None = None,
        deliveries: Sequence[NewDelivery] = (),
        **fields: object,
    ) -> Row:
        """Move one row to ``state`` (a legal move from the state it is in), with other columns,
        in one transaction. A successful move clears the row's failure count unless given.
        ``durable=False``: see the module's docstring. ``refresh_if_called_back_since`` (a move to
        done): if a callback came in since then (the details the export used were fetched then), a
        review may have beaten the export: the row is due for a look again at once (``refresh_at``),
        and the move is made durable. ``deliveries``: the outbox rows the move causes, written in its
        transaction (``outbox.py``)."""
        return self.transition_many(
            [row],
            state,
            now,
            durable=durable,
            refresh_if_called_back_since=refresh_if_called_back_since,
            deliveries=deliveries,
            **fields,
        )[0]

    def transition_many(
        self,
        rows: Sequence[Row],
        state: State,
        now: float,
        *,
        durable: bool = True,
        refresh_if_called_back_since: float | None = None,
        deliveries: Sequence[NewDelivery] = (),
        **fields: object,
    ) -> list[Row]:
        for row in rows:
            check_transition(row.state, state)
        fields.setdefault("failures", 0)
        if state not in (State.FAILING, State.FAILED):
            fields.setdefault("error", None)  # moving on: the last failure is history
        if state in TERMINAL:
            fields.setdefault("finished_at", now)
        return self._set(
            rows,
            now,
            {**fields, "state": state.value},
            moving=True,
            durable=durable,
            refresh_since=refresh_if_called_back_since,
            deliveries=deliveries,
        )

    def update(self, row: Row, now: float, *, durable: bool = True, **fields: object) -> Row:
        """Change some columns of a row that stays in its state."""
        return self._set([row], now, fields, durable=durable)[0]

    def update_many(self, rows: Sequence[Row], now: float, **fields: object) -> list[Row]:
        return self._set(rows, now, fields)

    def _set(
        self,
        rows: Sequence[Row],
        now: float,
        fields: dict[str, object],
        moving: bool = False,
        durable: bool = True,
        refresh_since: float | None = None,
        deliveries: Sequence[NewDelivery] = (),
    ) -> list[Row]:
        bad = set(fields) - UPDATABLE - ({"state"} if moving else set())
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        if not rows:
            return []
        fields["updated_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = list(fields.values())
        if refresh_since is not None:  # (SET sees the row as it was)
            assignments += ", refresh_at = CASE WHEN callback_at >= ? AND refresh_at IS NULL THEN ? ELSE refresh_at END"
            values += [refresh_since, now]
        found: dict[int, Row] = {}
        assert not deliveries or len(rows) == 1, "a move's deliveries are its one row's"
        with self._writer(durable) if len(rows) > 1 or deliveries else self._one_statement(durable) as tx:
            if self._ONE_WRITER and len(rows) > 1:  # a batch (claims): one statement per 500 rows
                by_state: dict[State, list[int]] = {}
                for row in rows:
                    by_state.setdefault(row.state, []).append(row.id)
                for was, ids in by_state.items():
                    for start in range(0, len(ids), 500):
                        chunk = ids[start : start + 500]
                        for new in tx.execute(
                            f"UPDATE files SET {assignments} WHERE state = ? AND id IN"
                            f" ({marks(chunk)}){self._LEASE_GUARD} RETURNING {COLS}",
                            (*values, was.value, *chunk, *self._guard),
                        ).fetchall():
                            found[new[0]] = to_row(new)
            else:  # one row per statement, in one order for every writer: no deadlocks between nodes
                for row in sorted(rows, key=lambda r: r.id):
                    new = tx.execute(
                        f"UPDATE files SET {assignments} WHERE id = ? AND state = ?{self._LEASE_GUARD}"
                        f" RETURNING {COLS}",
                        (*values, row.id, row.state.value, *self._guard),
                    ).fetchone()
                    if new is not None:
                        found[row.id] = to_row(new)
            if deliveries and rows[0].id in found:
                self._add_deliveries(tx, rows[0].id, deliveries, now)
            for row in rows:
                if row.id not in found:  # the transaction rolls back: none of them moved
                    raise IllegalTransition(f"{row.display_path}: no longer {row.state} (row {row.id})")
            if fields.get("next_at") is not None:
                tx.notify(f"due:{fields['next_at']!r}")
        if (
            not durable
            and refresh_since is not None
            and any(found[r.id].refresh_at is not None and r.refresh_at is None for r in rows)
        ):
            self._make_durable()  # a second look armed: not to be lost
        return [found[r.id] for r in rows]

    def start_upload(self, row: Row, token_hash: str, now: float, **fields: object) -> Row:
        """CLAIMED -> UPLOADING with a new attempt's token, kept with every earlier one."""
        check_transition(row.state, State.UPLOADING)
        fields = {**fields, "token_hash": token_hash, "ambiguous_since": None}
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._write() as tx:  # durable: the token is on disk before the POST that carries it
            new = tx.execute(
                f"UPDATE files SET state = ?, updated_at = ?, {assignments} WHERE id = ? AND state = ?"
                f"{self._LEASE_GUARD} RETURNING {COLS}",
                (State.UPLOADING.value, now, *fields.values(), row.id, row.state.value, *self._guard),
            ).fetchone()
            if new is None:
                raise IllegalTransition(f"{row.display_path}: no longer {row.state} (row {row.id})")
            tx.execute(
                "INSERT INTO upload_tokens (token_hash, row_id, sent_at) VALUES (?, ?, ?)", (token_hash, row.id, now)
            )
        return to_row(new)

    def record_extra(self, document_id: int, row: Row, project_id: int | None, now: float) -> bool:
        """Remember a second document of one file, to delete; False if it was known."""
        with self._write() as tx:
            return (
                tx.execute(
                    "INSERT INTO extra_documents (document_id, row_id, project_id, found_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (document_id, row.id, project_id, now),
                ).rowcount
                == 1
            )

    def settle_extra(self, document_id: int, now: float, error: str | None = None) -> None:
        """An extra document was deleted (or could not be: ``error``)."""
        with self._write() as tx:
            tx.execute(
                "UPDATE extra_documents SET deleted_at = ?, error = ? WHERE document_id = ?",
                (now if error is None else None, error, document_id),
            )

    def mark_uploaded(
        self, row: Row, document_id: int, now: float, poll_at: float, *, durable: bool = True, **fields: object
    ) -> Row:
        """UPLOADING -> UPLOADED. If the callback already came (it can beat the upload's own
        response), the row is due at once; otherwise at ``poll_at``."""
        check_transition(row.state, State.UPLOADED)
        extra = "".join(f", {name} = ?" for name in fields)
        with self._one_statement(durable) as tx:
            found = tx.execute(
                "UPDATE files SET state = ?, document_id = ?, uploaded_at = ?, error = NULL, failures = 0,"
                f" updated_at = ?, next_at = CASE WHEN callback_at IS NOT NULL THEN ? ELSE ? END{extra}"
                f" WHERE id = ? AND state = ?{self._LEASE_GUARD} RETURNING {COLS}",
                (
                    State.UPLOADED.value,
                    document_id,
                    now,
                    now,
                    now,
                    poll_at,
                    *fields.values(),
                    row.id,
                    row.state.value,
                    *self._guard,
                ),
            ).fetchone()
            if found is None:
                raise IllegalTransition(f"{row.display_path}: no longer {row.state} (row {row.id})")
            new = to_row(found)
            if new.next_at is not None:
                tx.notify(f"due:{float(new.next_at)!r}")
        return new

    def schedule_poll(self, row: Row, checked_at: float, now: float, poll_at: float, stage: str) -> Row:
        """Look again at ``poll_at`` - or at once if a callback came in while we were checking.
        Not durable (``durable=False``): lost in a power failure, the row is looked at again at
        start-up (every uploaded row is), which is all this write asks for."""
        with self._write_soon() as tx:
            found = tx.execute(
                "UPDATE files SET stage = ?, updated_at = ?, failures = 0, error = NULL,"
                " next_at = CASE WHEN callback_at >= ? THEN ? ELSE ? END"
                f" WHERE id = ? AND state = ?{self._LEASE_GUARD} RETURNING {COLS}",
                (stage, now, checked_at, now, poll_at, row.id, row.state.value, *self._guard),
            ).fetchone()
            if found is not None and found[COLUMNS.index("next_at")] is not None:
                tx.notify(f"due:{float(found[COLUMNS.index('next_at')])!r}")
        return to_row(found) if found is not None else self.get(row.id)

    def discard(self, row: Row) -> None:
        """Forget a row whose file vanished from the inbox before we took it."""
        with self._write() as tx:
            tx.execute(
                f"DELETE FROM files WHERE id = ? AND state = ?{self._LEASE_GUARD}",
                (row.id, State.CLAIMING.value, *self._guard),
            )

    def clamp_due(self, now: float, max_delay_s: float) -> int:
        """Due times further ahead than any delay could be come from a clock stepped back
        while the daemon was down: make them due now. Returns how many were clamped."""
        where, states = in_list("state", [s.value for s in ACTIVE])
        with self._write() as tx:
            n = tx.execute(
                f"UPDATE files SET next_at = ? WHERE {where} AND next_at > ?", (now, *states, now + max_delay_s)
            ).rowcount
            n += tx.execute(
                "UPDATE files SET refresh_at = ? WHERE refresh_at > ? AND state = ?",  # a done file's
                (now, now + max_delay_s, State.DONE.value),
            ).rowcount  # look at a new revision, too
            if n:
                tx.notify(f"due:{now!r}")
        return n

    def record_callback(
        self, token_hash: str, claimed_document_id: int | None, now: float
    ) -> tuple[CallbackOutcome, Row | None]:
        """Record that a callback arrived for a token; returns what happened and the row.

        ``unknown``: no such token. ``mismatch``: the body names another document than the one
        this token was issued for. ``extra``: the token is an earlier attempt's and the body names
        another document than the file's: a late copy, recorded for deletion (after checking).
        ``finished``: the file is already done/failed (a replay), and nothing more happens, except
        for a done file and its current token: Konfuzio calls again after a review or a
        re-extraction, so the pipeline is to look at the document again (``refresh_at``, at most
        once per ``REFRESH_GAP_S``); the row is returned then, else None. ``recorded``: fact stored;
        the pipeline will confirm the outcome with the API. The listeners hear ``callback:<row id>``.

        ``recorded`` is not durable when this returns (``durable=False``): lost in a power failure, it
        is a lost callback, and start-up looks at every uploaded file once (an uploading one is
        reconciled first). The other outcomes that write are durable before the answer.
        """
        refresh = False
        new: Row | None = None
        with self._write_soon() as tx:
            found = tx.execute(
                "SELECT t.token_hash, f.id, f.state, f.document_id, f.token_hash, f.project_id FROM upload_tokens t"
                f" JOIN files f ON f.id = t.row_id WHERE t.token_hash = ?{self._LOCK_ROW}",
                (token_hash,),
            ).fetchone()
            if found is None or not hmac.compare_digest(found[0], token_hash):
                return CallbackOutcome.UNKNOWN, None
            _, row_id, state, document_id, current_token, project_id = found
            if claimed_document_id is not None and document_id is not None and claimed_document_id != document_id:
                if current_token == token_hash:
                    return CallbackOutcome.MISMATCH, None
                extra = tx.execute(
                    "INSERT INTO extra_documents (document_id, row_id, project_id, found_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (claimed_document_id, row_id, project_id, now),
                ).rowcount
                refresh = extra == 1
            elif state == State.DONE and current_token == token_hash:
                new = to_row(
                    tx.execute(
                        "UPDATE files SET callback_at = ?, refresh_at = COALESCE(refresh_at,"
                        " CASE WHEN updated_at + ? > ? THEN updated_at + ? ELSE ? END)"
                        f" WHERE id = ? AND state = ? RETURNING {COLS}",
                        (now, REFRESH_GAP_S, now, REFRESH_GAP_S, now, row_id, State.DONE.value),
                    ).fetchone()
                )
                tx.notify(f"callback:{row_id}")
                refresh = True
            elif state in TERMINAL:
                return CallbackOutcome.FINISHED, None
            else:
                next_at = now if state == State.UPLOADED else None
                new = to_row(
                    tx.execute(
                        "UPDATE files SET callback_at = ?, next_at = COALESCE(?, next_at), updated_at = ? WHERE id = ?"
                        f" RETURNING {COLS}",
                        (now, next_at, now, row_id),
                    ).fetchone()
                )
                tx.notify(f"callback:{row_id}")
        if refresh:  # a second copy to delete, a done file's next revision: nothing else would find them again
            self._make_durable()
        if new is None:
            return CallbackOutcome.EXTRA, None
        return (CallbackOutcome.FINISHED if new.state == State.DONE else CallbackOutcome.RECORDED), new

    # -- done results that may have changed on the server ------------------------------------

    def finish_refresh(
        self, row: Row, checked_at: float, now: float, *, deliveries: Sequence[NewDelivery] = (), **fields: object
    ) -> Row:
        """A refresh of a done row is over (``fields``: e.g. its new ``revision`` and ``fingerprint``),
        in one transaction: ``refresh_at`` is cleared, unless a callback came in since ``checked_at``
        (the document may have changed again after it was fetched). ``deliveries``: those the new
        revision causes (``outbox.py``), in the same transaction."""
        bad = set(fields) - UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        extra = "".join(f", {name} = ?" for name in fields)
        with self._write() as tx:
            found = tx.execute(
                "UPDATE files SET refresh_at = CASE WHEN callback_at >= ? THEN ? ELSE NULL END, failures = 0,"
                f" error = NULL, updated_at = ?{extra} WHERE id = ? AND state = ?{self._LEASE_GUARD}"
                f" RETURNING {COLS}",
                (checked_at, now + REFRESH_GAP_S, now, *fields.values(), row.id, State.DONE.value, *self._guard),
            ).fetchone()
            if found is None:
                raise IllegalTransition(f"{row.display_path}: no longer {State.DONE} (row {row.id})")
            if deliveries:
                self._add_deliveries(tx, row.id, deliveries, now)
        return to_row(found)

    def make_due(self, states: Iterable[State], now: float) -> int:
        """Make every row in ``states`` that no other node holds due at ``now``; returns how many."""
        where, values = in_list("state", [s.value for s in states])
        with self._write() as tx:
            n = tx.execute(
                f"UPDATE files SET next_at = ? WHERE {where}{self._NOT_OTHERS}", (now, *values, *self._not_others)
            ).rowcount
            if n:
                tx.notify(f"due:{now!r}")
        return n
