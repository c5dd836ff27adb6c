"""A Samba share on loopback for the tests, from the machine's own binaries (Debian's packages).

``SambaServer`` runs ``smbd`` in the foreground on a free loopback port with a private smb.conf
(every folder it writes in a temporary folder of its own) and two users made with ``smbpasswd``:
the scanner and the daemon's. ``stop()`` and ``start()`` again play an outage.

``SmbMount`` mounts the share through FUSE with ``smbnetfs`` (the machine has no cifs module), one
HOME per client: the share is ``<mountpoint>/127.0.0.1:<port>/share`` (libsmbclient ignores the
port in the client's smb.conf, so it goes into the path). ``unmount(lazy=True)`` plays the share
dropping away under the daemon (``fusermount -u -z``).

``Scanner`` writes as another host would: ``smbclient put`` under a temporary name, then ``rename``.

smbd and smbnetfs signal their whole process group when stopped: each runs in a session of its
own, so a test is never hit by its own clean-up. Samba needs a Unix account for each of its users:
they are made once with ``useradd`` (no home, no login), which needs root; elsewhere the fixtures skip.
Where the binaries are missing the fixtures skip, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from .pg import free_port, required

SCANNER = ("kwscanner", "scanpass")
DAEMON = ("kwdaemon", "kwpass")
GROUP = "kwscanners"  # both users' group: what one creates in the share, the other may write (2770)
BINARIES = ("smbd", "smbpasswd", "smbclient", "smbnetfs", "fusermount")
SKIP_REASON = "Samba share tests not run"


class SambaUnavailable(Exception):
    """No Samba share can be served or mounted here (the message says why)."""


def check_available() -> None:
    missing = [name for name in BINARIES if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if missing:
        raise SambaUnavailable(f"missing {', '.join(missing)}: apt-get install samba smbclient smbnetfs")
    if not os.path.exists("/dev/fuse"):
        raise SambaUnavailable("no /dev/fuse: smbnetfs cannot mount the share")
    if os.geteuid() != 0:
        raise SambaUnavailable("the share's users are made with useradd, which needs root")


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def ensure_user(name: str) -> int:
    """A Unix account for a Samba user, in GROUP (made once per machine)."""
    if not _group_exists():
        subprocess.run(["groupadd", GROUP], check=True, capture_output=True)
    with suppress(KeyError):
        return pwd.getpwnam(name).pw_uid
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--groups", GROUP, name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name).pw_uid


def _group_exists() -> bool:
    try:
        grp.getgrnam(GROUP)
        return True
    except KeyError:
        return False


def _wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SambaUnavailable(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.05)


def _wait_or_kill(proc: subprocess.Popen) -> None:
    """Wait 10 s for a process that was asked to end, then kill its process group."""
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class SambaServer:
    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    # The share's folder on the server's own disk. Samba serves it as the connected user, who must
    # be able to reach it: pytest's tmp_path lies below a folder only root may enter.
    share: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kw-share-")))

    @property
    def conf(self) -> Path:
        return self.root / "samba" / "smb.conf"

    def configure(self) -> SambaServer:
        samba = self.root / "samba"
        for sub in ("private", "lock", "state", "cache", "pid", "log"):
            (samba / sub).mkdir(parents=True, exist_ok=True)
        self.share.mkdir(parents=True, exist_ok=True)
        self.share.chmod(0o777)
        self.conf.write_text(f"""[global]
  server role = standalone server
  interfaces = lo
  bind interfaces only = yes
  smb ports = {self.port}
  disable netbios = yes
  private dir = {samba}/private
  lock directory = {samba}/lock
  state directory = {samba}/state
  cache directory = {samba}/cache
  pid directory = {samba}/pid
  log file = {samba}/log/smbd.log
  passdb backend = tdbsam
  load printers = no
  disable spoolss = yes
[share]
  path = {self.share}
  read only = no
  valid users = {SCANNER[0]} {DAEMON[0]}
  force group = {GROUP}
  create mask = 0660
  directory mask = 2770
""")
        for user, password in (SCANNER, DAEMON):
            ensure_user(user)
            subprocess.run(
                [_tool("smbpasswd"), "-c", str(self.conf), "-s", "-a", user],
                input=f"{password}\n{password}\n",
                text=True,
                check=True,
                capture_output=True,
            )
        return self

    def start(self) -> SambaServer:
        with open(self.root / "samba" / "log" / "smbd.out", "ab") as log:
            self.proc = subprocess.Popen(
                [_tool("smbd"), "--foreground", "--no-process-group", "-s", str(self.conf)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _wait_for(self.answers, 15, f"smbd answering on 127.0.0.1:{self.port}")
        return self

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise SambaUnavailable(
                f"smbd exited with {self.proc.returncode}: "
                f"{(self.root / 'samba' / 'log' / 'smbd.out').read_text()[-1000:]}"
            )
        result = subprocess.run(
            [_tool("smbclient"), "//127.0.0.1/share", "-p", str(self.port), "-U", "%".join(SCANNER), "-c", "ls"],
            capture_output=True,
            timeout=10,
        )
        return result.returncode == 0

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.share, ignore_errors=True)

    def stop(self) -> None:
        """Stop smbd (and its children: it runs in a process group of its own)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        _wait_or_kill(self.proc)


@dataclass
class SmbMount:
    """The share mounted through smbnetfs at ``mountpoint`` as ``user``."""

    server: SambaServer
    home: Path
    mountpoint: Path
    user: tuple[str, str] = DAEMON
    proc: subprocess.Popen | None = None

    @property
    def share(self) -> Path:
        return self.mountpoint / f"127.0.0.1:{self.server.port}" / "share"

    def mount(self) -> SmbMount:
        smb = self.home / ".smb"
        smb.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        (smb / "smb.conf").write_text("[global]\n  client min protocol = SMB2\n  unix charset = utf-8\n")
        (smb / "smbnetfs.conf").write_text(
            'smb_query_browsers "false"\nsamba_charset "utf-8"\n'
            f'local_charset "utf-8"\nauth "127.0.0.1" "{self.user[0]}" '
            f'"{self.user[1]}"\n'
        )
        for name in ("smb.conf", "smbnetfs.conf"):  # else smbnetfs ignores the auth line
            (smb / name).chmod(0o600)
        with open(self.home / "smbnetfs.out", "ab") as log:
            self.proc = subprocess.Popen(
                [_tool("smbnetfs"), "-f", str(self.mountpoint)],
                stdout=log,
                stderr=log,
                env={**os.environ, "HOME": str(self.home)},
                start_new_session=True,
            )
        _wait_for(self._mounted, 15, f"smbnetfs mounting {self.share}")
        return self

    def _mounted(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise SambaUnavailable(
                f"smbnetfs exited with {self.proc.returncode}: {(self.home / 'smbnetfs.out').read_text()[-1000:]}"
            )
        try:
            return self.share.is_dir()
        except OSError:
            return False

    def unmount(self, *, lazy: bool = False) -> None:
        subprocess.run(["fusermount", "-u", *(["-z"] if lazy else []), str(self.mountpoint)], capture_output=True)
        if self.proc is not None:
            _wait_or_kill(self.proc)


@dataclass
class Scanner:
    """Writes into the share as another host: ``smbclient``, a temporary name, then a rename."""

    server: SambaServer
    user: tuple[str, str] = SCANNER

    def run(self, commands: str) -> str:
        result = subprocess.run(
            [
                _tool("smbclient"),
                "//127.0.0.1/share",
                "-p",
                str(self.server.port),
                "-U",
                "%".join(self.user),
                "-c",
                commands,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise OSError(f"smbclient {commands!r}: {result.stdout[-500:]}{result.stderr[-500:]}")
        return result.stdout

    def put(self, local: Path, remote: str) -> None:
        """``remote`` (a path in the share, with ``/``) appears whole, as a scanner's rename does."""
        folder, _, name = remote.rpartition("/")
        cd = f'cd "{folder}"; ' if folder else ""
        self.run(f'{cd}put "{local}" "{name}.part"; rename "{name}.part" "{name}"')

    def mkdir(self, remote: str) -> None:
        self.run(f'mkdir "{remote}"')


def start_share(root: Path) -> SambaServer:
    check_available()
    return SambaServer(root).configure().start()


def skip_or_fail(exc: Exception) -> None:
    import pytest

    if required():
        pytest.fail(f"{SKIP_REASON}: {exc}")
    pytest.skip(f"{SKIP_REASON}: {exc}")
