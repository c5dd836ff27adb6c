"""``konfuzio-watch check``: is this config good to run with?"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

from .config import Config, ConfigError
from .journal import NETWORK_FILESYSTEMS, filesystem_type
from .konfuzio import ApiError, KonfuzioClient


def run_checks(config: Config, out: TextIO) -> list[str]:
    """Print one line per check; return the problems found."""
    problems: list[str] = []

    def report(ok: bool, what: str, detail: str = "") -> None:
        out.write(f"{'ok  ' if ok else 'FAIL'}  {what}{': ' + detail if detail else ''}\n")
        if not ok:
            problems.append(f"{what}: {detail}")

    f = config.folders
    report(f.inbox.is_dir() and os.access(f.inbox, os.R_OK | os.W_OK | os.X_OK), "folders.inbox",
           str(f.inbox) if f.inbox.is_dir() else f"{f.inbox} does not exist or is not readable and writable")
    for key, folder in (("folders.done", f.done), ("folders.failed", f.failed), ("folders.state", f.state)):
        ok, detail = _writable(folder)
        report(ok, key, detail)
    fstype = filesystem_type(f.state)
    report(fstype not in NETWORK_FILESYSTEMS, "journal on a local disk", f"{f.state} ({fstype or 'unknown'})")
    try:
        token = config.api_token()
    except ConfigError as exc:
        report(False, "API token", str(exc))
        return problems
    client = KonfuzioClient(config.konfuzio.host, token, timeout_s=min(30.0, config.konfuzio.timeout_seconds))
    try:
        project = client.project(config.konfuzio.project_id)
        report(True, "Konfuzio API", f"project {project.get('id')} ({project.get('name', '?')}) at "
               f"{config.konfuzio.host}")
    except ApiError as exc:
        report(False, "Konfuzio API", f"project {config.konfuzio.project_id} at {config.konfuzio.host}: {exc}")
    finally:
        client.close()
    if not config.callback.public_url:
        out.write("note  callback.public_url is not set: Konfuzio must reach "
                  f"http://{config.callback.host}:{config.callback.port} directly\n")
    return problems


def _writable(folder: Path) -> tuple[bool, str]:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return False, f"{folder} is not writable"
    return True, str(folder) if folder.exists() else f"{folder} (will be created)"
