"""The webhook transport: one signed POST per delivery (``delivery.py``).

The body is the placed JSON's bytes exactly as written; the headers say what it is:
``Content-Type: application/json``, ``Idempotency-Key`` (``<document_id>:<revision>``, a failed
file's ``failed:<journal id>``), ``X-Konfuzio-Watch-Signature: sha256=<hex HMAC-SHA256 of the body>``,
``X-Konfuzio-Watch-Event`` (done, revision, failed) and ``X-Konfuzio-Watch-Path`` (the placed file
relative to done/ or failed/, its name's bytes percent-encoded: a name need not be UTF-8).

Its own ``requests`` session: no proxy, certificate or credentials from the environment (as the SDK's
session), no redirect followed (a POST turned into a GET delivers nothing). A 2xx is delivered; 408,
429 and 5xx, a timeout or a refused connection are worth trying again (``Retry-After`` passed on);
any other answer fails the delivery.
"""

from __future__ import annotations

import email.utils
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

import requests

from .config import WebhookConfig
from .delivery import Delivery, Sent, signature
from .journal import display_name

RETRY_STATUSES = (408, 429)
SIGNATURE_HEADER = "X-Konfuzio-Watch-Signature"
EVENT_HEADER = "X-Konfuzio-Watch-Event"
PATH_HEADER = "X-Konfuzio-Watch-Path"
USER_AGENT = "konfuzio-watch"


def placed_path_header(file_path: Path, roots: tuple[Path, ...]) -> str:
    """The placed file relative to the output folder it is in, its bytes percent-encoded."""
    for root in roots:
        if file_path.is_relative_to(root):
            return quote(os.fsencode(file_path.relative_to(root)), safe="/")
    return quote(os.fsencode(file_path.name), safe="")


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """A Retry-After in seconds (a number or an HTTP date), or None."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Webhook:
    """POSTs deliveries to ``deliver.webhook.url``, signed with ``secret``."""

    name = "webhook"

    def __init__(self, config: WebhookConfig, secret: bytes, roots: tuple[Path, ...]):
        self.url = config.url
        self.timeout_s = config.timeout_seconds
        self._secret = secret
        self._roots = roots
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy or .netrc from the service's environment
        self._session.headers["User-Agent"] = USER_AGENT

    def send(self, delivery: Delivery) -> Sent:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": delivery.key,
            SIGNATURE_HEADER: signature(self._secret, delivery.body),
            EVENT_HEADER: delivery.event,
            PATH_HEADER: placed_path_header(delivery.file_path, self._roots),
        }
        started = time.monotonic()
        try:
            answer = self._session.post(
                self.url, data=delivery.body, headers=headers, timeout=self.timeout_s, allow_redirects=False
            )
        except requests.Timeout:
            return Sent(False, True, f"webhook: no answer from {self.url} within {self.timeout_s:g} s")
        except requests.ConnectionError as exc:
            return Sent(False, True, f"webhook: cannot connect to {self.url}: {_reason(exc)}")
        except requests.RequestException as exc:
            return Sent(False, True, f"webhook: {self.url}: {_reason(exc)}")
        with answer:
            seconds = time.monotonic() - started
            status = answer.status_code
            said = display_name(answer.text[:200].strip().splitlines()[0].encode()) if answer.text.strip() else ""
        detail = f"webhook: HTTP {status} from {self.url} after {seconds:.2f} s" + (f": {said}" if said else "")
        if 200 <= status < 300:
            return Sent(True, False, detail)
        if status >= 500 or status in RETRY_STATUSES:
            return Sent(False, True, detail, retry_after_s(answer.headers))
        return Sent(False, False, detail)

    def close(self) -> None:
        self._session.close()


def _reason(exc: BaseException) -> str:
    """What a requests error comes down to, in a few words (``Connection refused``)."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    return found.group(1).strip() if found else text[:200]
