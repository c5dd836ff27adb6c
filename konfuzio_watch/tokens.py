"""Callback tokens: one unguessable token per upload, stored only as its SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def token_hash_of(callback_url: Any) -> str | None:
    """The hash of the token at the end of a callback URL (as the server reports it back)."""
    if not isinstance(callback_url, str) or "/" not in callback_url:
        return None
    token = callback_url.rstrip("/").rsplit("/", 1)[-1]
    return hash_token(token) if token else None
