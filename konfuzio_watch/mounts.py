"""Which file system a folder lives on, from ``/proc/self/mountinfo``.

What the daemon can see of a folder depends on it: on a network or FUSE file system, files written
by other hosts (a scanner writing over SMB) make no inotify event here, owners and modes are the
mount's view rather than the server's, and the mount can go away and come back (another device id,
or the bare mountpoint on the local disk in between). ``mount_of(path)`` names the mount a path is on;
``Mount.is_remote`` says whether other hosts may write into it unseen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"

# Types whose content other hosts change without an inotify event here. FUSE types are all taken as
# remote (sshfs, smbnetfs, rclone, s3fs ...): a local FUSE file system is the rare case, and polling
# it costs little; inotify is still used beside polling where it works.
REMOTE_TYPES = frozenset(
    {
        "cifs",
        "smb3",
        "smbfs",
        "nfs",
        "nfs4",
        "9p",
        "ceph",
        "glusterfs",
        "gpfs",
        "lustre",
        "afs",
        "davfs",
        "ncpfs",
        "coda",
        "ocfs2",
        "gfs2",
        "beegfs",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "prl_fs",
    }
)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    device: str  # major:minor as the kernel shows it
    point: str  # where it is mounted
    fs_type: str  # "ext4", "cifs", "fuse.smbnetfs", ...
    source: str  # "//server/share", "/dev/sda1", "smbnetfs", ...

    @property
    def is_remote(self) -> bool:
        """Do other hosts write into it without this machine's inotify seeing it?"""
        base = self.fs_type.split(".", 1)[0]
        return base in ("fuse", "fuseblk") or base in REMOTE_TYPES

    def describe(self) -> str:
        return f"{self.fs_type} at {self.point}" + (f" ({self.source})" if self.source not in ("", "none") else "")


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts in the text of ``/proc/<pid>/mountinfo`` (proc(5)): ``36 35 98:0 /mnt1 /mnt/parent
    rw,noatime master:1 - ext3 /dev/root rw,errors=continue``. Paths are octal-escaped there."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            mounts.append(
                Mount(
                    int(fields[0]),
                    fields[2],
                    _unescape(fields[4]),
                    _unescape(fields[sep + 1]),
                    _unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                )
            )
        except (ValueError, IndexError):
            continue  # a line this parser does not understand names no mount
    return mounts


def _unescape(field: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash as ``\040``, ``\011``, ``\012``, ``\134``."""
    if "\\" not in field:
        return field
    raw = field.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and all(0x30 <= c <= 0x37 for c in raw[i + 1 : i + 4]):
            out.append(int(raw[i + 1 : i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


def find_mount(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount ``path`` (absolute, symlinks resolved) lives on: the last-mounted of the longest
    mount points that contain it (a later mount on the same point hides the earlier one)."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.point.rstrip("/") or "/"
        inside = path == point or point == "/" or path.startswith(point + "/")
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = mount
    return best


def mount_of(path: str | os.PathLike[str], mountinfo: str = MOUNTINFO) -> Mount | None:
    """The mount a folder lives on, or None where the system does not say (no /proc)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return None
    return find_mount(os.path.realpath(path), parse_mountinfo(text))
