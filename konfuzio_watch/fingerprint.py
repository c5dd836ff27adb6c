"""A result's content fingerprint: "is this revision new?" for a done document exported again."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

# What a revision is compared on: everything the server says about the document's content, not
# when or by whom it was exported, nor bookkeeping the server changes on its own (callback_status_code).
CONTENT_KEYS = ("document_id", "status_data", "category", "fields", "annotations", "text", "pages", "bbox")
CONTENT_DETAIL_KEYS = ("is_reviewed", "category_is_revised")

FINGERPRINT_VERSION = "2:"


def content_fingerprint(result: dict[str, Any]) -> str:
    """A digest of what a result says about the document, for "is this revision new?".

    Leaves out when and by whom it was exported, the revision, our own timestamps, the link, and
    what the server changes by itself (``updated_at``, ``callback_status_code``): a callback sent
    again for an unchanged document gives the same digest. Works on a result read back from its
    file as well (JSON in, JSON out). Encoded by orjson with sorted keys (version ``2:``; json's
    encoder was slow on the character boxes); what orjson refuses (an integer beyond
    64 bits, a lone surrogate) by json, the same way every time.
    """
    content = _content(result)
    try:
        canonical = orjson.dumps(content, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
    except TypeError:
        canonical = _legacy_canonical(content)
    return FINGERPRINT_VERSION + hashlib.sha256(canonical).hexdigest()


def fingerprint_matches(result: dict[str, Any], stored: str | None) -> bool:
    """Whether ``result`` says what the result with fingerprint ``stored`` said; a fingerprint
    stored before version ``2:`` (json, sorted, ASCII) is compared the way it was computed."""
    if not stored:
        return False
    if stored.startswith(FINGERPRINT_VERSION):
        return content_fingerprint(result) == stored
    return hashlib.sha256(_legacy_canonical(_content(result))).hexdigest() == stored


def _content(result: dict[str, Any]) -> dict[str, Any]:
    details = result.get("konfuzio") if isinstance(result.get("konfuzio"), dict) else {}
    content = {k: result[k] for k in CONTENT_KEYS if k in result}
    content["konfuzio"] = {k: details.get(k) for k in CONTENT_DETAIL_KEYS}
    return content


def _legacy_canonical(content: dict[str, Any]) -> bytes:
    return json.dumps(content, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str).encode("ascii")
