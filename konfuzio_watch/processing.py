"""Where claimed files wait: a folder only the daemon can write, on the inbox's file system.

A claim is a rename, so the folder must be on the inbox's file system. Where it is, is one rule
(``choose``), which ``run`` and ``check`` both follow and the start-up log names with its reason:

1. ``folders.processing``, if set;
2. else the folder the journal's files were claimed into before (the journal keeps the first choice,
   so that a later change of permissions never strands files);
3. else the one of the two folders below that exists already, the sibling first (an admin made it for
   the service's user; an earlier run's, whose files a journal moved aside no longer names);
4. else the hidden sibling of the inbox, ``<parent>/.<inbox name>.konfuzio-watch``
   (``/srv/scans/.inbox.konfuzio-watch`` for ``/srv/scans/inbox``), so that people and scanners writing
   into the inbox cannot write into it, if the service's user may create entries in the inbox's parent
   and that parent is on the inbox's file system;
5. else ``<inbox>/.konfuzio-watch/processing``.

The one fact that depends on who asks is whether the user may create entries in the parent, so
``choose`` takes it as an argument: ``check`` run by root can judge for the service's user
(``may_create_as``). Either way the folder is created 0700 and the daemon refuses to start if others
may write into it. On a share mounted here (a network or FUSE file system: ``mounts``) the owner
and mode it sees are the mount's, not the server's: ``check`` and the start-up log say that its
privacy cannot be verified from here, and what to set on the server (``unverifiable_privacy``).

Each claimed file gets an unpredictable name there, ``<16 hex>-<its base name>``, recorded in its
journal row with the file's inode: a file found under a row's name is trusted only if it is that
file, and a file no row claims (a lost journal, a restored backup) is adopted visibly — moved back
into the inbox under its base name — never matched to another row. (smbnetfs numbers inodes by
path, so a file swapped under a claim name keeps the number there: on a share, a file's content is
compared with what was uploaded before it is placed, ``Pipeline.stat_is_blind``.) Only a daemon that holds the
folder's lock (``locks.ProcessingLock``, ``.konfuzio-watch.processing.lock`` in it, held for the
daemon's lifetime) adopts: the files of a live daemon with another journal are never taken for a
lost journal's, even when the inbox's marker was removed or the inbox renamed and recreated (the
sibling folder's name follows the inbox's path, so a daemon started on the new inbox finds the old
daemon's folder, and its lock).

Clustered mode (a PostgreSQL journal several nodes share): the folder is shared too. It is one
folder for the whole cluster, on the share next to the inbox, and the journal's ``processing_dir``
names it for every node: any node can finish any file, including the files of a node that died.
So every node must see it under the same path (mount the share at the same place everywhere) and
run as the same user id (the folder is 0700). A file's identity there is its inode alone: NFS and
CIFS (``serverino``) give the server's inode numbers on every machine, while each machine's mount
has a device number of its own. The nodes hold the folder's lock shared, as the inbox's marker: a
node that dies lets go of it, and its files pass to the other nodes through their journal rows
(leases), never as files without a row.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import accounts, mounts
from .accounts import Account
from .config import Config, ConfigError
from .locks import PROCESSING_LOCK_NAME

LOCK_NAME = os.fsencode(PROCESSING_LOCK_NAME)

NAME_KEEP = 180  # bytes of the base name kept in a claim name (a name is at most 255 bytes)


class ProcessingDirError(ConfigError):
    """The processing folder cannot be used safely; the message is one line for the admin."""


SIBLING_WHY = "a hidden sibling of the inbox, on the same file system"
USER = "konfuzio-watch"


@dataclass(frozen=True)
class Choice:
    """Where the claimed files wait, and why there (the start-up log and ``check`` say both)."""

    path: Path
    why: str

    def __str__(self) -> str:
        return f"{self.path} ({self.why})"


def sibling_of(inbox: Path) -> Path:
    return inbox.parent / f".{inbox.name}.konfuzio-watch"


def inside(inbox: Path) -> Path:
    return inbox / ".konfuzio-watch" / "processing"


def choose(
    inbox: Path,
    *,
    configured: Path | None = None,
    bound: str | None = None,
    sibling_exists: bool = False,
    inside_exists: bool = False,
    parent_same_fs: bool = True,
    may_create_in_parent: bool = True,
    user: str = USER,
) -> Choice:
    """The rule (see the module's docstring), on facts gathered elsewhere (``find``): no file system here.
    ``user``: who would create the folder, as the reason names them."""
    if configured is not None:
        return Choice(configured, "set in folders.processing")
    if bound:
        return Choice(Path(bound), "where this journal's files were claimed before; the journal keeps it")
    parent = inbox.parent
    if sibling_exists:
        return Choice(sibling_of(inbox), SIBLING_WHY)
    # An older run's folder in the inbox (a journal moved aside): its files are adopted from there.
    if inside_exists:
        return Choice(inside(inbox), "in the inbox: it exists already")
    if parent == inbox:
        return Choice(inside(inbox), "the inbox has no parent folder")
    if not parent_same_fs:
        return Choice(inside(inbox), f"{parent} is another file system than the inbox")
    if not may_create_in_parent:
        return Choice(inside(inbox), f"{user} may not create entries in {parent}")
    return Choice(sibling_of(inbox), SIBLING_WHY)


def find(
    config: Config, bound: str | None, may_create: Callable[[Path], bool] | None = None, user: str | None = None
) -> Choice:
    """``choose`` on this machine's facts; ``may_create``: whether the service's user (named ``user``)
    may create entries in a folder (default: this process, the daemon itself)."""
    if user is None:
        user = accounts.name_of(os.geteuid()) or f"uid {os.geteuid()}"
    inbox = config.folders.inbox
    if config.folders.processing is not None or bound:
        return choose(inbox, configured=config.folders.processing, bound=bound)
    parent = inbox.parent
    try:
        same_fs = os.stat(parent).st_dev == os.stat(inbox).st_dev
    except OSError:  # no inbox yet: ``run`` creates it in its parent, on that file system
        same_fs = True
    return choose(
        inbox,
        sibling_exists=os.path.lexists(sibling_of(inbox)),
        inside_exists=inside(inbox).is_dir(),
        parent_same_fs=same_fs,
        may_create_in_parent=(may_create or may_create_entries)(parent),
        user=user,
    )


def may_create_entries(folder: Path) -> bool:
    """May this process create entries in ``folder`` (write and search it)?"""
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)


def may_create_as(uid: int, gid: int, groups: Sequence[int] = ()) -> Callable[[Path], bool]:
    """``may_create_entries`` for another user (root judging for the service's user): the kernel answers,
    to a shell running as that user, so ACLs and read-only mounts count as they do for the daemon. (The
    shell, not this interpreter: that user may not reach a virtualenv under /root.)"""

    def may_create(folder: Path) -> bool:
        done = subprocess.run(
            ["sh", "-c", 'test -w "$1" && test -x "$1"', "sh", os.fsdecode(folder)],
            user=uid,
            group=gid,
            extra_groups=list(groups),
            capture_output=True,
            timeout=30,
            cwd="/",
        )
        return done.returncode == 0

    return may_create


def prepare(path: Path, inbox: Path, checked_as: Account | None = None, *, parents: bool = True) -> None:
    """Create the folder 0700; refuse one that others may write or that is on another file system.
    ``checked_as``: ``check`` judges it for the user the service runs as (``accounts``), not for itself.
    ``parents=False`` (made again while the daemon runs): its parent must be there; nothing else
    is made (a share's bare mountpoint stays empty)."""
    path.mkdir(mode=0o700, parents=parents, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ProcessingDirError(f"folders.processing: {path} is not a folder")
    owner = checked_as or accounts.me()
    if st.st_uid != owner.uid:
        whom = f"not to {owner.describe()}, the user {'running konfuzio-watch' if checked_as is None else 'checked as'}"
        if owner.uid != os.geteuid():
            whom += f"; you are {accounts.me().describe()}"
        raise ProcessingDirError(
            f"folders.processing: {path} belongs to {accounts.describe_uid(st.st_uid)}, {whom}; "
            "anyone owning it could plant files there"
        )
    if st.st_mode & 0o022:
        raise ProcessingDirError(
            f"folders.processing: {path} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 0700 {path}"
        )
    if st.st_dev != os.stat(inbox).st_dev:
        raise ProcessingDirError(
            f"folders.processing: {path} is on another file system than the inbox {inbox}; "
            "claims are renames: put it next to the inbox"
        )


def is_remote(path: Path) -> bool:
    """Is the folder on a network or FUSE file system (``mounts``), where the owner, mode, inode and
    ctime seen here are the mount's view, not the server's?"""
    mount = mounts.mount_of(path)
    return mount is not None and mount.is_remote


def unverifiable_privacy(path: Path) -> str | None:
    """On a share mounted here, why ``prepare`` cannot tell whether others may write into the folder,
    and what to set on the server; None where it can (a local disk)."""
    mount = mounts.mount_of(path)
    if mount is None or not mount.is_remote:
        return None
    return (
        f"the processing folder {path} is on {mount.describe()}: the owner and mode seen here are the "
        "mount's, not the server's, so whether others (the scanners) can put files into it cannot be verified "
        "from here. On the server, let only konfuzio-watch's account enter that folder (owned by it, mode "
        "0700; not the scanners' group), and give the scanners a share account of their own. It stays on "
        "the share next to the inbox (claims are renames)"
    )


def new_claim_name(rel_path: bytes) -> bytes:
    base = os.path.basename(rel_path)[:NAME_KEEP]
    return secrets.token_hex(8).encode() + b"-" + base


def original_name(claim_name: bytes) -> bytes:
    """The base name a claimed file had in the inbox (a legacy numeric name gives ``recovered-<n>``)."""
    head, sep, base = claim_name.partition(b"-")
    if sep and len(head) == 16 and base:
        return base
    return b"recovered-" + claim_name


def names(path: Path) -> list[bytes]:
    """The names of the files waiting in the processing folder (none if it is missing): all but its lock."""
    try:
        listed = os.listdir(os.fsencode(path))
    except FileNotFoundError:
        return []
    return [n for n in listed if n != LOCK_NAME]


def orphans(listed: list[bytes], claimed: set[bytes]) -> list[bytes]:
    """Names listed in the processing folder that no journal row claims. List the folder first, then
    read the claims: a claim's row is written before its file is moved in."""
    return sorted(n for n in listed if n not in claimed)
