"""Whom ``check`` judges the folders for: the user the service runs as, not whoever runs ``check``.

Root may write anywhere and owns nothing the service made: judged as root, ``check`` passed folders
the service cannot write, and failed the processing folder the service made (0700, its own) as
"not root's". So ``check`` takes the service's user (``service_account``), in this order:

1. ``check --as USER`` (a name, or a number: a uid without a name gets its number as its group);
2. run as root: the user konfuzio-watch last ran as on this state folder — its ``daemon.lock``
   records its uid, gid and groups (systemd's ``SupplementaryGroups=`` included); without one, the
   system user ``konfuzio-watch`` that ``install-files`` creates, if it exists; else root;
3. anyone else: themselves (trying writes as another user needs root); a note then names the
   user the daemon last ran as, if it is another.

``check`` says which one it took, and why, in its first line. Writes are tried for real as that
user (``try_writes``): a child process with its ids (``-I -m konfuzio_watch.accounts``) creates and
removes a probe file in each folder, or opens each file for writing, so that modes, ACLs and
read-only mounts answer as they will answer the service.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:
    from .lock_file import Holder

SERVICE_USER = "konfuzio-watch"  # the unit's User= (install.SERVICE_USER)
PROBE_REMOVAL_DELAYS_S = (0.05, 0.1, 0.2, 0.4)  # a busy share, then the last try
CHILD_TIMEOUT_S = 60.0
FOLDER, FILE = "folder", "file"  # what try_writes tries: create a probe in a folder, or open a file for writing


class AccountError(ConfigError):
    """The user to check as cannot be used; the message is one line for the admin (a usage error)."""


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups
    name: str | None = None

    def describe(self) -> str:
        """``konfuzio-watch (uid 999)``, or ``uid 999`` for a uid without a name here."""
        return f"{self.name} (uid {self.uid})" if self.name else f"uid {self.uid}"

    def same_ids(self, other: Account) -> bool:
        return (self.uid, self.gid, set(self.groups)) == (other.uid, other.gid, set(other.groups))


def name_of(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def describe_uid(uid: int) -> str:
    """``uid 999 (konfuzio-watch)``: how an owner is named (the number first: it is what the folder holds)."""
    name = name_of(uid)
    return f"uid {uid} ({name})" if name else f"uid {uid}"


def me() -> Account:
    uid = os.geteuid()
    return Account(uid, os.getegid(), tuple(os.getgroups()), name_of(uid))


def lookup(spec: str) -> Account:
    """A user by name or number, with the groups the system gives it at login (``getgrouplist``)."""
    try:
        entry = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except KeyError:
        if spec.isdigit():
            return Account(int(spec), int(spec))
        raise AccountError(f"check --as {spec}: there is no such user") from None
    return Account(entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)), entry.pw_name)


def recorded(holder: Holder | None) -> Account | None:
    """The ids a daemon recorded in its lock; None if it recorded none (an older version)."""
    if holder is None or holder.uid is None:
        return None
    gid = holder.gid if holder.gid is not None else holder.uid
    return Account(holder.uid, gid, tuple(holder.groups or ()), name_of(holder.uid))


def service_account(state_dir: Path, requested: str | None) -> tuple[Account, str]:
    """The user to judge the folders for, and one line saying which and why (see the module doc)."""
    from .locks import DAEMON_LOCK_NAME, read_daemon_lock

    current = me()
    try:
        last = recorded(read_daemon_lock(state_dir))
    except OSError:
        last = None
    where = f"{DAEMON_LOCK_NAME} in {state_dir}"
    return choose(
        current,
        lookup(requested) if requested else None,
        last,
        where,
        _system_user() if current.uid == 0 and not requested else None,
    )


def choose(
    current: Account, requested: Account | None, last: Account | None, where: str, system_user: Account | None
) -> tuple[Account, str]:
    """The rule of the module doc, on what was found."""
    you = f"you are {current.describe()}"
    if requested is not None:
        if requested.uid != current.uid and current.uid != 0:
            raise AccountError(
                f"check --as: only root can try writing as {requested.describe()}; run check as root, "
                f"or as {requested.describe()} itself"
            )
        return requested, f"checked as {requested.describe()} (--as); {you}"
    if current.uid == 0:
        if last is not None:
            yourself = "" if last.uid == current.uid else f"; {you}"
            return last, (
                f"checked as {last.describe()}, the user konfuzio-watch last ran as ({where}){yourself}; "
                "another: check --as USER"
            )
        if system_user is not None:
            return system_user, (
                f"checked as {system_user.describe()}, the system user the service runs as; {you}; "
                "another: check --as USER"
            )
        return current, f"checked as {current.describe()}: no {SERVICE_USER} user here; another: check --as USER"
    if last is not None and last.uid != current.uid:
        return current, (
            f"checked as {current.describe()}, who runs check; konfuzio-watch last ran as "
            f"{last.describe()} ({where}): to check as it, run: sudo konfuzio-watch check --as "
            f"{last.name or last.uid}"
        )
    return current, f"checked as {current.describe()}, who runs check; another: check --as USER (as root)"


def _system_user() -> Account | None:
    try:
        return lookup(SERVICE_USER)
    except AccountError:
        return None


def try_writes(account: Account, targets: list[tuple[str, Path]]) -> list[tuple[bool, str]]:
    """For each ``(FOLDER, path)`` (a probe file created and removed in it, or in its nearest existing
    parent if it is missing) or ``(FILE, path)`` (opened for writing): (True, what) or (False, why),
    tried as ``account``."""
    if account.same_ids(me()):
        return [_try(kind, path) for kind, path in targets]
    command = [sys.executable, "-I", "-m", "konfuzio_watch.accounts", json.dumps([[k, str(p)] for k, p in targets])]
    try:
        done = subprocess.run(
            command,
            user=account.uid,
            group=account.gid,
            extra_groups=list(account.groups),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
        )
    except subprocess.TimeoutExpired:
        reason = f"no answer within {CHILD_TIMEOUT_S:g} s"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    else:
        try:
            return [(bool(ok), str(what)) for ok, what in json.loads(done.stdout)]
        except ValueError:  # it could not start: e.g. its standard library is in a folder the user may not enter
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    why = (
        f"cannot try it as {account.describe()}: it cannot run {sys.executable} ({reason}); nor can the service, "
        "if it runs this installation"
    )
    return [(False, why)] * len(targets)


def _try(kind: str, path: Path) -> tuple[bool, str]:
    return can_write(path) if kind == FOLDER else can_open_for_writing(path)


def can_write(folder: Path) -> tuple[bool, str]:
    """Really write (``os.access`` says yes to root and no to ACLs): the reason if it fails."""
    target = folder if folder.exists() else existing_parent(folder)
    probe = target / f".konfuzio-watch-check-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        _remove_probe(probe)
    except OSError as exc:
        return False, f"cannot write into {target}: {exc.strerror or exc}"
    return True, str(folder) if folder.exists() else f"{folder} (will be created)"


def can_open_for_writing(path: Path) -> tuple[bool, str]:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
    except FileNotFoundError:
        return True, f"{path} (will be created)"
    except OSError as exc:
        return False, f"cannot write {path}: {exc.strerror or exc}"
    return True, str(path)


def _remove_probe(probe: Path) -> None:
    """A share may hold the probe open for a moment after its close (smbnetfs: the removal answers
    EBUSY now and then, the next one works): the folder is writable all the same; try again."""
    for delay_s in PROBE_REMOVAL_DELAYS_S:
        try:
            os.unlink(probe)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        time.sleep(delay_s)
    os.unlink(probe)


def existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


if __name__ == "__main__":  # the child of try_writes, with the ids of the user to check as
    print(json.dumps([_try(kind, Path(path)) for kind, path in json.loads(sys.argv[1])]))
