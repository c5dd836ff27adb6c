"""The one retry policy: what to do after a step failed. Pure; time is an argument.

Every step of the pipeline classifies what went wrong into a ``Failure`` and asks ``decide``.
The answer is one of:

- ``Retry(at)``: try this file again at ``at`` (capped exponential backoff on the row's
  failure count, which the journal stores in the same transaction as the decision);
- ``Fail(reason)``: the file goes to failed/ with the reason;
- ``Blocked(scope)``: not the file's fault — the service is unavailable, throttling, or
  rejecting our token, the disk is full, or a share the files are on does not answer. The
  affected work pauses as a whole (see ``gates.py``), no file is charged, and one probe at a time
  finds out when it is over.

Nothing is retried at a fixed interval and nothing is retried without limit, except writing
into failed/ (there is no further place to put a file that cannot go there) which backs off to
the cap. ``Retry-After`` is honoured up to the backoff cap and noted when it was cut.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class Step(enum.StrEnum):
    CLAIM = "claim"  # taking files out of the inbox
    UPLOAD = "upload"  # reading, validating and posting the file
    RECONCILE = "reconcile"  # asking the server whether it already has an upload
    FETCH = "fetch"  # document details, bbox: is it done, and what did it find?
    EXPORT = "export"  # writing the result into done/
    FAIL = "fail"  # writing the error report into failed/
    DELIVER = "deliver"  # handing a placed result on to the next system (``delivery.py``)


class Cause(enum.StrEnum):
    UNAVAILABLE = "unavailable"  # cannot connect, 502/503/504: the service is down
    THROTTLED = "throttled"  # 429
    REJECTED = "rejected"  # 401/403: the API token is refused
    NOT_FOUND = "not_found"  # 404
    INVALID = "invalid"  # 400/413/415/422 ...: this request will never succeed as it is
    TRANSIENT = "transient"  # timeouts, resets, 500, a garbled answer: try again
    UNREADABLE = "unreadable"  # the daemon cannot read the file
    DISK_FULL = "disk_full"  # ENOSPC/EDQUOT writing results
    LOCAL_IO = "local_io"  # any other error writing results (permissions ...)
    # EIO, ENOTCONN, ESTALE, EBUSY, EHOSTDOWN ... on the inbox, the processing folder, done/ or failed/, or
    # one of them missing or on another file system than it was (an unmounted share): ``shares.py``
    SHARE_UNAVAILABLE = "share_unavailable"
    INTERNAL = "internal"  # a bug in the daemon


class Scope(enum.StrEnum):
    API = "api"  # every call to Konfuzio
    OUTPUT = "output"  # writing into done/ and failed/
    JOURNAL = "journal"  # everything: the journal is where every decision is recorded
    SHARES = "shares"  # every file operation: claims, reads, placing into done/ and failed/ (``shares.py``)
    RECEIVER = "receiver"  # every delivery: the next system's webhook or command (``delivery.py``)


@dataclass(frozen=True)
class Failure:
    cause: Cause
    message: str
    status: int | None = None
    retry_after_s: float | None = None
    maybe_received: bool = False  # a POST that may have reached the server before it failed


@dataclass(frozen=True)
class Limits:
    base_s: float = 2.0
    cap_s: float = 300.0
    max_attempts: int = 8  # upload attempts (and unreadable-file tries) before a file fails
    max_failures: int = 30  # consecutive failures of any other step before a file fails


@dataclass(frozen=True)
class Retry:
    at: float
    delay_s: float
    charge: bool = True  # counts as one of the row's failures


@dataclass(frozen=True)
class Fail:
    reason: str


@dataclass(frozen=True)
class Blocked:
    scope: Scope
    reason: str
    retry_after_s: float | None  # already capped
    note: str = ""  # e.g. that a Retry-After was cut to the cap
    account: bool = False  # the token or the project: probe with a project request, not with a file


Decision = Retry | Fail | Blocked


def backoff_s(failures: int, limits: Limits, jitter: float = 1.0) -> float:
    """Capped exponential backoff: 1 failure -> base, doubling, never above the cap.
    ``jitter`` in [0.5, 1] spreads retries of many files; 1.0 gives the ceiling."""
    # The exponent is bounded: past it the cap rules anyway, and a float overflows after 2 ** 1023.
    ceiling = min(limits.cap_s, limits.base_s * 2 ** min(max(0, failures - 1), 64))
    return ceiling * jitter


def cap_retry_after(retry_after_s: float | None, limits: Limits) -> tuple[float | None, str]:
    """A Retry-After is honoured up to the backoff cap; a far-future one must not stop work
    for hours (and a restart would not clear it if it were stored in the rows)."""
    if retry_after_s is None:
        return None, ""
    if retry_after_s > limits.cap_s:
        return limits.cap_s, f"Retry-After of {retry_after_s:.0f} s cut to the backoff cap of {limits.cap_s:.0f} s"
    return max(0.0, retry_after_s), ""


BLOCKING_REASONS = {
    Cause.UNAVAILABLE: "Konfuzio is unavailable",
    Cause.THROTTLED: "Konfuzio is throttling requests",
    Cause.REJECTED: "Konfuzio rejected the API token",
}


def decide(
    step: Step, failure: Failure, failures: int, now: float, limits: Limits, attempts: int = 0, jitter: float = 1.0
) -> Decision:
    """What to do with one file after ``step`` failed with ``failure``.

    ``failures``: the row's consecutive failures so far (this one not counted);
    ``attempts``: its upload attempts so far (this one counted, for ``Step.UPLOAD``).
    """
    cause = failure.cause
    if step == Step.DELIVER:
        return _deliver(failure, limits)
    if cause == Cause.REJECTED:
        return Blocked(Scope.API, f"Konfuzio rejected the API token (HTTP {failure.status or 401})", None, account=True)
    if cause in BLOCKING_REASONS:
        capped, note = cap_retry_after(failure.retry_after_s, limits)
        return Blocked(Scope.API, f"{BLOCKING_REASONS[cause]}: {failure.message}", capped, note)
    if cause == Cause.NOT_FOUND and step in (Step.UPLOAD, Step.RECONCILE):
        # The upload URL or the project is not there: a wrong host or project, not this file.
        reason = (
            failure.message
            if failure.message.startswith("project ")
            else f"Konfuzio answered 404 (wrong konfuzio.host or project_id?): {failure.message}"
        )
        return Blocked(Scope.API, reason, None, account=True)
    if cause == Cause.DISK_FULL:
        return Blocked(Scope.OUTPUT, f"disk full: {failure.message}", None)
    if cause == Cause.SHARE_UNAVAILABLE:  # never the file's fault, in any step: no attempt, no failure counted
        return Blocked(Scope.SHARES, failure.message, None)

    if step == Step.FAIL:  # nowhere further to go: keep trying, backing off to the cap
        return _retry(failures, now, limits, jitter)
    if cause == Cause.NOT_FOUND:
        return Fail(f"the document no longer exists on the server ({failure.message})")
    if cause == Cause.INVALID:
        return Fail(failure.message)
    if step == Step.UPLOAD:
        if failure.maybe_received:  # the server may hold it: look (reconcile) before giving up or retrying
            return _retry(failures, now, limits, jitter)
        used = attempts if cause != Cause.UNREADABLE else failures + 1
        if used >= limits.max_attempts:
            return Fail(f"gave up after {used} attempts: {failure.message}")
        return _retry(failures, now, limits, jitter)
    if failures + 1 >= limits.max_failures:
        return Fail(f"gave up after {failures + 1} failures: {failure.message}")
    return _retry(failures, now, limits, jitter, failure.retry_after_s)


def _deliver(failure: Failure, limits: Limits) -> Blocked | Fail:
    """A delivery the receiver did not take. Down, busy or slow (5xx, 408, 429, a timeout, a refused
    connection; a command's timeout or exit 75): the receiver's gate is blocked, no delivery charged;
    anything else (another 4xx, a command's other exit, a body that is no longer ours) fails it."""
    if failure.cause in (Cause.UNAVAILABLE, Cause.THROTTLED, Cause.TRANSIENT):
        capped, note = cap_retry_after(failure.retry_after_s, limits)
        return Blocked(Scope.RECEIVER, f"the receiver does not take deliveries: {failure.message}", capped, note)
    return Fail(failure.message)


GATEWAY_STATUSES = (502, 503, 504)


def reconcile_window_s(failure: Failure, window_s: float) -> float:
    """How long an upload that failed with ``failure`` may still be stored by the server, so that only
    looking for it (never uploading it again) is safe. A 5xx other than a gateway's (500, 507 ...) is
    the application's own answer: its handler has finished, and one look at the document list settles
    whether it stored the file (0). A timeout, a reset or a gateway's 502/503/504 may come while the
    application is still storing it: ``window_s`` (``upload.reconcile_window_seconds``)."""
    answered = failure.status is not None and failure.status >= 500 and failure.status not in GATEWAY_STATUSES
    return 0.0 if answered else window_s


def upload_again_at(now: float, look_at: float, window_s: float) -> float:
    """The earliest new upload of a file that may be on the server: after the first look, and not
    before its reconcile window (from ``now``, when the upload failed) has passed."""
    return max(look_at, now + window_s)


def attempts_used_up(attempts: int, limits: Limits) -> bool:
    """Has a file had all its upload attempts (``upload.max_attempts``)?"""
    return attempts >= limits.max_attempts


def after_reconcile(
    now: float, since: float, window_s: float, failures: int, attempts: int, limits: Limits
) -> Retry | Fail | None:
    """An upload the server's document list does not show, ambiguous since ``since``: while its
    reconcile window lasts the server may still be storing it, so look again (``Retry``, backing off,
    never past the window's end; no failure charged); after it, ``Fail`` once the attempts are used
    up, else None: it is uploaded again now."""
    end = since + window_s
    if now < end:
        at = min(end, now + backoff_s(failures + 1, limits))
        return Retry(at, at - now, charge=False)
    if attempts_used_up(attempts, limits):
        return Fail(f"gave up after {attempts} attempts")
    return None


def _retry(failures: int, now: float, limits: Limits, jitter: float, retry_after_s: float | None = None) -> Retry:
    delay = backoff_s(failures + 1, limits, jitter)
    capped, _ = cap_retry_after(retry_after_s, limits)
    delay = max(delay, capped or 0.0)
    return Retry(now + delay, delay)


# -- a blocked gate's probes (``gates.py``): the gate keeps its state, the policy decides the pace --

SUCCESSES_TO_RESET = 3  # successes between two failures of a gate that start its backoff over


def draw_jitter(rng: random.Random) -> float:
    """A ``jitter`` for ``backoff_s``: retries of many files (or probes of a gate) spread below the ceiling."""
    return rng.uniform(0.5, 1.0)


def gate_backoff(
    failures: int, *, was_blocked: bool, successes: int, limits: Limits, jitter: float, retry_after_s: float | None
) -> tuple[int, float]:
    """A gate's failure count with this failure and the delay to its next probe.

    ``failures``: the episode's failures so far; ``successes``: tasks that succeeded since the gate
    last opened. Work went on between two failures (a service throttling now and then): the count
    starts over; right after a probe passed (a disk with a few bytes free) it keeps growing. A
    ``Retry-After`` (already capped) is waited at least."""
    counted = 1 if not was_blocked and successes >= SUCCESSES_TO_RESET else failures + 1
    return counted, max(backoff_s(counted, limits, jitter), retry_after_s or 0.0)
