"""Node markers: in a cluster each node writes ``<inbox>/.konfuzio-watch.node-<node id>``, a random
value it also records in the journal (``BaseJournal.join``). Another node that reads the same
value in its inbox sees the same folder; one that does not (another mount, another path) watches
another inbox, which ``konfuzio-watch check`` says and the daemon logs."""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from .lock_file import hostname

log = logging.getLogger("konfuzio_watch")

NODE_MARKER_PREFIX = ".konfuzio-watch.node-"


def node_marker_path(inbox: Path, node_id: str) -> Path:
    return inbox / f"{NODE_MARKER_PREFIX}{node_id}"


def write_node_marker(inbox: Path, node_id: str, journal_id: str) -> str:
    """Write this node's marker into the inbox (atomically: a temp name, then rename); returns the
    random value it holds, which the node also records in the journal."""
    value = secrets.token_hex(16)
    path = node_marker_path(inbox, node_id)
    temp = path.with_name(path.name + ".tmp")
    data = {
        "node": node_id,
        "host": hostname(),
        "pid": os.getpid(),
        "journal_id": journal_id,
        "marker": value,
        "written_at": time.time(),
    }
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o664)
    try:
        os.write(fd, (json.dumps(data, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    return value


def read_node_marker(inbox: Path, node_id: str) -> str | None:
    """The value in a node's marker as this machine sees the inbox; None if there is none."""
    try:
        with open(node_marker_path(inbox, node_id), "rb") as f:
            data = json.loads(f.read(64 * 1024))
    except (OSError, ValueError):
        return None
    value = data.get("marker") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def remove_node_marker(inbox: Path, node_id: str) -> None:
    try:
        os.unlink(node_marker_path(inbox, node_id))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", node_marker_path(inbox, node_id), exc.strerror or exc)


def foreign_inbox_nodes(inbox: Path, me: str, nodes: list[Any], alive_s: float) -> list[Any]:
    """The other live nodes (heard from within ``alive_s``) whose marker this machine does not read
    in ``inbox``: they watch another folder."""
    return [
        n
        for n in nodes
        if n.id != me
        and n.silent_s <= alive_s
        and n.inbox_marker is not None
        and read_node_marker(inbox, n.id) != n.inbox_marker
    ]
