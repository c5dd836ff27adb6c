"""``konfuzio-watch install-files``: put what an administrator deploys where systemd expects it.

Writes, under ``prefix`` (``/`` on the machine itself, a folder for an image being built):

- ``etc/systemd/system/konfuzio-watch.service`` and ``etc/sysusers.d/konfuzio-watch.conf``, the
  files shipped in ``konfuzio_watch/data``. An existing copy that differs is kept unless ``force``
  (local changes belong in a drop-in or a sysusers.d file of their own);
- the system user, with ``systemd-sysusers --root=<prefix> <that file>``;
- ``etc/konfuzio-watch/config.yaml`` from the example, only if there is none (never overwritten),
  root:konfuzio-watch 0640 in a root:konfuzio-watch 0750 folder, so the service can read it and
  nobody else can.

User and group ids are read from ``<prefix>/etc/passwd`` and ``<prefix>/etc/group`` (where
systemd-sysusers writes them), not through NSS, so a prefix other than ``/`` works the same way.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TextIO

SERVICE_USER = "konfuzio-watch"
APP_EXECUTABLE = "/opt/konfuzio-watch/.venv/bin/konfuzio-watch"  # the unit's ExecStart=
CONFIG_DIR = "/etc/konfuzio-watch"
CONFIG = f"{CONFIG_DIR}/config.yaml"


@dataclass(frozen=True)
class Shipped:
    name: str  # in konfuzio_watch/data
    target: str  # where it goes on the installed system


UNIT = Shipped("konfuzio-watch.service", "/etc/systemd/system/konfuzio-watch.service")
SYSUSERS = Shipped("konfuzio-watch.sysusers", "/etc/sysusers.d/konfuzio-watch.conf")
EXAMPLE_CONFIG = Shipped("config.example.yaml", CONFIG)


def shipped_bytes(name: str) -> bytes:
    return resources.files("konfuzio_watch").joinpath("data", name).read_bytes()


def install_files(
    prefix: str | os.PathLike[str], out: TextIO, *, force: bool = False, sysusers: str | None = None
) -> list[str]:
    """Install under ``prefix``; print one line per action; return the problems left for the admin.

    ``sysusers`` is the systemd-sysusers executable (default: found on PATH)."""
    root = Path(prefix)
    problems: list[str] = []

    def say(action: str, path: Path, detail: str = "") -> None:
        out.write(f"{action:<9} {path}{'  (' + detail + ')' if detail else ''}\n")

    for shipped in (UNIT, SYSUSERS):
        _write_shipped(root, shipped, force, say, problems)

    sysusers = sysusers or shutil.which("systemd-sysusers")
    ids = _create_user(root, sysusers, say, problems)

    config_dir, config = _under(root, CONFIG_DIR), _under(root, CONFIG)
    if not config_dir.exists():
        config_dir.mkdir(mode=0o750, parents=True)
        config_dir.chmod(0o750)  # mkdir's mode is masked by the umask
        say("created", config_dir)
    try:
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    except FileExistsError:
        say("kept", config, "an existing config is never overwritten")
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(shipped_bytes(EXAMPLE_CONFIG.name))
        os.chmod(config, 0o640)
        say("wrote", config, "from the example: edit it")
    if ids:
        _give_to_service_group(config_dir, ids[1], say, problems)
        _give_to_service_group(config, ids[1], say, problems)
        for path, need in ((config_dir, stat.S_IXOTH), (config, stat.S_IROTH)):
            if not _allowed(path, *ids, need):
                problems.append(
                    f"{path}: the service user {SERVICE_USER} cannot "
                    f"{'enter' if need == stat.S_IXOTH else 'read'} it "
                    f"(chgrp {SERVICE_USER} {path}; chmod g+{'x' if need == stat.S_IXOTH else 'r'} {path})"
                )

    here = Path(sys.prefix).resolve() / "bin" / "konfuzio-watch"
    if here != _under(root, APP_EXECUTABLE).resolve():
        out.write(
            f"note      the unit runs {APP_EXECUTABLE}; this konfuzio-watch is {here}: install it there "
            "(docs/service.md) or override ExecStart= in a drop-in\n"
        )
    return problems


def next_steps() -> str:
    return (
        f'next: edit {CONFIG} (konfuzio.token_file: "${{CREDENTIALS_DIRECTORY}}/konfuzio-token", project_id,\n'
        f"      folders), put the API token into {CONFIG_DIR}/konfuzio-token (root, 0600), check with\n"
        f"      CREDENTIALS_DIRECTORY={CONFIG_DIR} konfuzio-watch check\n"
        "      then: systemctl daemon-reload && systemctl enable --now konfuzio-watch"
    )


def _under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def _write_shipped(root: Path, shipped: Shipped, force: bool, say, problems: list[str]) -> None:  # type: ignore[no-untyped-def]
    path = _under(root, shipped.target)
    data = shipped_bytes(shipped.name)
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        say("unchanged", path)
        return
    if path.exists() and not force:
        say("kept", path, "differs from the shipped file; --force replaces it")
        problems.append(
            f"{path} differs from the shipped {shipped.name}: put local changes in a drop-in "
            "(systemctl edit konfuzio-watch) or a sysusers.d file of their own, then use --force"
        )
        return
    path.parent.mkdir(parents=True, exist_ok=True)  # Debian has no /etc/sysusers.d until something creates it
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    say("wrote", path)


def _create_user(root: Path, sysusers: str | None, say, problems: list[str]) -> tuple[int, int] | None:  # type: ignore[no-untyped-def]
    """The service user's (uid, gid) in ``root``'s passwd, created with systemd-sysusers if needed."""
    ids = service_ids(root)
    conf = _under(root, SYSUSERS.target)
    if ids is None and sysusers and conf.is_file():
        command = [sysusers, f"--root={root}", str(conf)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            problems.append(f"{' '.join(command)} failed: {result.stderr.strip() or result.returncode}")
            return None
        ids = service_ids(root)
    if ids is None:
        problems.append(
            f"no user {SERVICE_USER} in {_under(root, '/etc/passwd')}"
            + (
                ""
                if sysusers
                else ": systemd-sysusers is not installed; create it with `useradd --system "
                f"--user-group --home-dir /var/lib/{SERVICE_USER} --shell /usr/sbin/nologin {SERVICE_USER}`"
                ", then run install-files again"
            )
        )
        return None
    say("user", _under(root, "/etc/passwd"), f"{SERVICE_USER}: uid {ids[0]}, gid {ids[1]}")
    return ids


def service_ids(root: Path) -> tuple[int, int] | None:
    """(uid, gid) of the service user in ``root``/etc/passwd, or None."""
    try:
        lines = _under(root, "/etc/passwd").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == SERVICE_USER:
            return int(fields[2]), int(fields[3])
    return None


def _give_to_service_group(path: Path, gid: int, say, problems: list[str]) -> None:  # type: ignore[no-untyped-def]
    """A root-group file of ours (just written, or from before the user existed) goes to the service's group."""
    st = path.stat()
    if st.st_gid != 0 or st.st_gid == gid:
        return
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        problems.append(f"{path}: cannot give it to group {SERVICE_USER} (gid {gid}) without root")
        return
    say("group", path, f"{SERVICE_USER}, mode {stat.S_IMODE(st.st_mode):04o}")


def _allowed(path: Path, uid: int, gid: int, other_bit: int) -> bool:
    """Whether plain mode bits give ``uid``/``gid`` the access whose bit for others is ``other_bit``."""
    st = path.stat()
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return bool(st.st_mode & (other_bit << shift))
