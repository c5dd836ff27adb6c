"""uploading (after a crash or an ambiguous error): does the server already have the file?

Documents are matched by the callback token in their callback URL (every attempt's token), which
no other file can have. A file not found is looked for again until its reconcile window has passed
(a slow server may store it late: ``policy.after_reconcile``); a second document of one file (a late
earlier attempt) is deleted.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from .. import policy
from ..journal import Row, State
from ..konfuzio import ApiError
from ..policy import Cause, Failure, Retry, Step
from ..states import Stage
from ..tokens import token_hash_of
from .context import Context, Outcome, looking_until

log = logging.getLogger("konfuzio_watch")

CLOCK_SKEW_S = 600.0  # the server's clock may differ from ours: list this much further back


def reconcile(ctx: Context, rows: list[Row]) -> list[Outcome]:
    """Look for these rows' uploads among the server's documents (newest first), and move each:
    found -> ``uploaded``; not found -> looked for again, ``claimed`` (uploaded again) or failed."""
    if not rows:  # a pass for the second copies that callbacks revealed
        delete_extras(ctx)
        return []
    now = ctx.clock.now()
    default_project = ctx.config.konfuzio.project_id
    tokens = ctx.journal.tokens_of(r.id for r in rows)
    by_id = {r.id: r for r in rows}
    late = ctx.journal.tokens_with_documents(since=now - 86_400)
    found: dict[int, list[int]] = {}
    extras: list[tuple[int, int, int]] = []  # (document id, row id, project id)
    project_ids = {row.project_id or default_project for row in rows}
    first_sent = ctx.journal.first_sent_at(by_id)
    oldest_wanted = (first_sent if first_sent is not None else now) - CLOCK_SKEW_S
    try:
        for project_id in project_ids:
            for page in ctx.client.document_pages(project_id):  # newest first
                for doc in page:
                    token = token_hash_of(doc.get("callback_url"))
                    if doc.get("id") is None or token is None:
                        continue
                    if token in tokens:
                        if int(doc["id"]) != by_id[tokens[token]].document_id:  # (not its bytes before a change)
                            found.setdefault(tokens[token], []).append(int(doc["id"]))
                    elif token in late and late[token][1] != int(doc["id"]):
                        extras.append((int(doc["id"]), late[token][0], project_id))
                if len(found) == len(rows) or _created_before(page, oldest_wanted):
                    break  # all found, or the list reached documents older than any of our uploads
    except ApiError as exc:
        failure = Failure(
            exc.failure.cause,
            f"cannot list documents to reconcile: {exc.failure.message}",
            status=exc.failure.status,
            retry_after_s=exc.failure.retry_after_s,
        )
        return [ctx.handle(row, Step.RECONCILE, failure) for row in rows]
    ctx.api_ok()
    out: list[Outcome] = []
    for row_id, documents in found.items():
        first, *others = sorted(documents)
        row = by_id[row_id]
        others += [row.document_id] if row.document_id is not None else []  # the result of its old bytes
        extras += [(d, row_id, row.project_id or default_project) for d in others]
        new = ctx.journal.mark_uploaded(row, first, ctx.clock.now(), poll_at=ctx.clock.now())
        log.info("%s: the server already had it as document %d", row.display_path, first)
        ctx.log_transition(row, new)
        out.append(new)
    out += [_not_found(ctx, row, now) for row in rows if row.id not in found]
    for document_id, row_id, project_id in extras:
        row = by_id.get(row_id) or ctx.journal.get(row_id)
        if ctx.journal.record_extra(document_id, row, project_id, now):
            log.warning(
                "%s: the server holds a second copy (document %d, from an earlier attempt); deleting it",
                row.display_path,
                document_id,
            )
    if extras:
        delete_extras(ctx)
    return out


def _not_found(ctx: Context, row: Row, now: float) -> Outcome:
    window = 0.0 if Stage.of(row.stage) is Stage.ANSWERED else ctx.config.reconcile_window_s
    # Written by whichever node's upload timed out, compared by this one's: in a cluster both
    # are the database's clock (clock.DatabaseClock), so the window is the same for every node.
    since = row.ambiguous_since if row.ambiguous_since is not None else row.updated_at
    decision = policy.after_reconcile(now, since, window, row.failures, row.attempts, ctx.limits)
    if isinstance(decision, Retry):  # a slow server may still be storing it: look again, do not upload
        log.debug(
            "%s: not on the server yet; looking again in %.1f s (window ends in %.1f s)",
            row.display_path,
            decision.delay_s,
            since + window - now,
        )
        return ctx.journal.update(row, now, next_at=decision.at, stage=looking_until(since + window))
    if decision is not None:
        return ctx.fail(row, f"{decision.reason}: {row.error}", stage=Stage.UPLOAD)
    return ctx.move(row, State.CLAIMED, next_at=now, failures=row.failures, error=row.error)


def delete_extras(ctx: Context) -> int:
    """Delete second copies of our files on the server, after checking that each carries one of
    its file's earlier tokens (a forged callback cannot make us delete someone's document)."""
    deleted = 0
    for document_id, row_id, _project_id in ctx.journal.pending_extras():
        row = ctx.journal.get(row_id)
        try:
            details = ctx.client.document(document_id)
            if (
                token_hash_of(details.get("callback_url")) not in ctx.journal.tokens_of([row_id])
                or document_id == row.document_id
            ):
                ctx.journal.settle_extra(document_id, ctx.clock.now(), error="not a copy of this file")
                log.warning("%s: document %d is not a copy of it; not deleted", row.display_path, document_id)
                continue
            ctx.client.delete_document(document_id)
        except ApiError as exc:
            if exc.failure.cause == Cause.NOT_FOUND:
                ctx.journal.settle_extra(document_id, ctx.clock.now())  # gone already
                continue
            log.warning(
                "%s: could not delete the extra document %d: %s; will try again",
                row.display_path,
                document_id,
                exc.failure.message,
            )
            continue
        ctx.journal.settle_extra(document_id, ctx.clock.now())
        ctx.metrics.extra_documents.inc()
        log.info("%s: deleted document %d, a second copy from an earlier attempt", row.display_path, document_id)
        deleted += 1
    return deleted


def _created_before(page: list[dict[str, Any]], limit: float) -> bool:
    """Is the oldest document of a (newest-first) page older than ``limit``? An unreadable date
    proves nothing."""
    if not page:
        return True
    oldest = page[-1].get("created_at")
    try:
        return dt.datetime.fromisoformat(str(oldest).replace("Z", "+00:00")).timestamp() < limit
    except ValueError:
        return False
