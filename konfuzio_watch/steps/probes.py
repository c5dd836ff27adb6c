"""The probes of blocked gates: one cheap look that says whether the pause is over."""

from __future__ import annotations

import logging

from ..konfuzio import ApiError
from ..policy import Blocked, Cause, Failure, Scope, Step
from ..shares import is_share_error
from .claim import finish_waiting_claims
from .context import Context

log = logging.getLogger("konfuzio_watch")


def probe_shares(ctx: Context) -> bool:
    """The probe of the blocked shares: does every folder answer as itself (a stat and a listing
    each)? Then the claims a share's error left half done are finished, and the work goes on."""
    try:
        ctx.folders.look_all()
    except OSError as exc:
        if not is_share_error(exc):
            raise
        ctx.shares_blocked(exc, "the folders do not answer")
        return False
    if not finish_waiting_claims(ctx):
        return False
    ctx.gates[Scope.SHARES].open(ctx.clock.now())
    return True


def probe_account(ctx: Context) -> bool:
    """Does Konfuzio accept our token, and does every configured project exist? One cheap
    request per project - at start-up, and as the probe while the API is blocked for the token
    or a project (a file would only be failed by it). The token file is read again first, so a
    rotated credential is picked up without a restart."""
    reload_token(ctx)
    now = ctx.clock.now()
    project_ids = [ctx.config.konfuzio.project_id, *(r.project_id for r in ctx.config.routes if r.project_id)]
    for project_id in dict.fromkeys(project_ids):
        try:
            ctx.client.project(project_id)
        except ApiError as exc:
            failure = exc.failure
            if failure.cause == Cause.NOT_FOUND:
                failure = Failure(
                    Cause.NOT_FOUND, f"project {project_id} not found or not visible to this token", status=404
                )
            decision = ctx.decide(Step.RECONCILE, failure, now=now, spread=False)
            if isinstance(decision, Blocked):
                ctx.block(decision, now)
            else:  # a timeout or a 500: not a verdict on the token; the next tasks will tell
                log.warning("could not check project %d: %s", project_id, failure.message)
            return False
    ctx.api_ok()
    return True


def reload_token(ctx: Context) -> None:
    """Read the token file again (a probe; a SIGHUP), keep the token we have if it cannot be read."""
    if ctx.config.konfuzio.token_file is None:
        return
    try:
        token = ctx.config.api_token()
    except Exception as exc:  # noqa: BLE001 - an unreadable file: keep the token we have, say why
        log.warning("%s", exc)
        return
    if ctx.client.set_token(token):
        log.info("the API token in %s changed; trying the new one", ctx.config.konfuzio.token_file)
