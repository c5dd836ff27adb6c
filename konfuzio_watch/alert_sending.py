"""Sending a message with apprise, and reading the destinations (``alerts.urls`` or
``alerts.urls_file``) without ever showing the secrets their URLs carry."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .alert_messages import Message, clip
from .config import AlertsConfig, ConfigError


class DeliveryError(Exception):
    """A message could not be sent; the message is the reason, without secrets."""


Sender = Callable[[str, Message], None]


def send_with_apprise(url: str, message: Message) -> None:
    """Send one message to one apprise URL; raise ``DeliveryError`` with apprise's reason."""
    apprise = _import_apprise()

    asset = _apprise_asset()
    notifier = apprise.Apprise(asset=asset)
    if not notifier.add(url):
        raise DeliveryError("apprise does not accept this URL")
    result = notifier.notify(
        body=message.body,
        title=message.title,
        notify_type=apprise.NotifyType(message.level),
        body_format=apprise.NotifyFormat.TEXT,
    )
    try:
        if result:
            return
        reasons = list(
            dict.fromkeys(entry.message for entry in result.logs() if entry.level in ("WARNING", "ERROR", "CRITICAL"))
        )
        raise DeliveryError(clip("; ".join(reasons)) or "apprise reported a failure without a reason")
    finally:
        result.close()


_apprise: Any = None
_apprise_lock = threading.Lock()


def _import_apprise() -> Any:
    """apprise, imported on first use (it loads all of its plugins: only a daemon with alerts pays).

    Its mail plugin imports the deprecated ``imghdr`` (for PGPy) when the plugins load, which on
    Python < 3.13 warns; we import it first with that warning silenced: not ours to show.
    apprise also logs a warning for every failed attempt, which would repeat on every retry: its
    logger is kept out of the daemon's log, and we log once per change of state instead, with
    the reason apprise captured for the call.
    """
    global _apprise
    with _apprise_lock:
        if _apprise is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="'imghdr' is deprecated", category=DeprecationWarning)
                with contextlib.suppress(ImportError):  # Python >= 3.13: apprise has a stand-in of its own
                    import imghdr  # noqa: F401
                import apprise
            logger = logging.getLogger("apprise")
            logger.propagate = False
            logger.addHandler(logging.NullHandler())
            _apprise = apprise
        return _apprise


def _apprise_asset() -> Any:
    # service_timeout=0: apprise would otherwise run each send on its own process-wide thread
    # pool (threads that outlive us); the sockets' own timeouts still bound a send. Memory
    # only: apprise writes nothing to disk for us.
    return _import_apprise().AppriseAsset(service_timeout=0, storage_mode="memory", result_log_disk_size=0)


def check_urls(config: AlertsConfig) -> list[str]:
    """The destinations, in apprise's privacy form (safe to print); ``ConfigError`` naming the
    entry if the URLs cannot be read or apprise does not accept one."""
    return [label for _, _, label in read_destinations(config)]


def read_destinations(config: AlertsConfig) -> list[tuple[str, str, str]]:
    """(url, key, label) per destination. ``key`` is apprise's privacy URL, stable when only a
    password changes; ``label`` is the key without its query, for the log."""
    apprise = _import_apprise()

    if config.urls_file is None:
        entries = [(f"alerts.urls[{i}]", url) for i, url in enumerate(config.urls)]
    else:
        try:
            text = config.urls_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"alerts.urls_file: cannot read {config.urls_file}: {reason}") from None
        entries = [
            (f"alerts.urls_file line {n}", line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")
        ]
        if not entries:
            raise ConfigError(f"alerts.urls_file: no URL in {config.urls_file}")
    asset = _apprise_asset()
    found: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for where, url in entries:
        service = apprise.Apprise.instantiate(url, asset=asset)
        if service is None:
            scheme = url.split("://", 1)[0] if "://" in url else ""
            shown = f" ({scheme}://...)" if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,20}", scheme) else ""
            raise ConfigError(f"{where}: not a URL apprise can send to{shown}")
        key = service.url(privacy=True)
        while key in seen:  # two URLs that differ only in a secret are still two destinations
            key += "#"
        seen.add(key)
        found.append((url, key, key.split("?", 1)[0]))
    return found


def scrub_secrets(text: str, url: str) -> str:
    """Take out of a reason anything secret-looking from the URL (its password, long tokens)."""
    try:
        parts = urlsplit(url)
        secrets = {parts.password or ""}
    except ValueError:
        return text
    secrets |= {s for s in re.split(r"[/?&=:@]", parts.path + "?" + parts.query) if len(s) >= 16}
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "****")
    return text
