"""mounts.py: which file system a folder is on, from mountinfo text (table-driven) and from this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from konfuzio_watch.mounts import find_mount, mount_of, parse_mountinfo

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /srv rw,relatime shared:9 - xfs /dev/sdb1 rw
41 30 0:50 / /srv/scans rw,relatime shared:20 - cifs //nas/scans rw,vers=3.1.1
42 22 0:51 / /mnt/smb rw,nosuid,nodev,relatime shared:21 - fuse.smbnetfs smbnetfs rw,user_id=0
43 22 0:52 /export /mnt/my\\040docs rw - nfs4 nas:/export rw
44 22 0:53 / /mnt/smb rw - tmpfs tmpfs rw
garbage line
45 22 0:54 / /data rw - fuse.sshfs user@host:/data rw
"""


@pytest.mark.parametrize(
    ("path", "point", "fs_type", "remote"),
    [
        ("/home/user/inbox", "/", "ext4", False),
        ("/srv/other", "/srv", "xfs", False),
        ("/srv/scans/inbox", "/srv/scans", "cifs", True),
        ("/srv/scans", "/srv/scans", "cifs", True),
        ("/srv/scansX", "/srv", "xfs", False),
        ("/mnt/my docs/in", "/mnt/my docs", "nfs4", True),
        ("/mnt/smb/127.0.0.1:1445/share", "/mnt/smb", "tmpfs", False),  # the later mount hides the earlier
        ("/data/inbox", "/data", "fuse.sshfs", True),
    ],
)
def test_the_mount_of_a_path_is_the_longest_latest_point(path: str, point: str, fs_type: str, remote: bool):
    mount = find_mount(path, parse_mountinfo(MOUNTINFO))
    assert mount is not None
    assert (mount.point, mount.fs_type, mount.is_remote) == (point, fs_type, remote)


def test_a_mount_describes_itself_with_its_source():
    mounts = {m.point: m for m in parse_mountinfo(MOUNTINFO)}
    assert mounts["/srv/scans"].describe() == "cifs at /srv/scans (//nas/scans)"
    assert mounts["/mnt/my docs"].source == "nas:/export"


def test_this_machines_tmp_path_is_found(tmp_path: Path):
    mount = mount_of(tmp_path)
    assert mount is not None and tmp_path.as_posix().startswith(mount.point.rstrip("/"))


def test_without_mountinfo_nothing_is_claimed(tmp_path: Path):
    assert mount_of(tmp_path, mountinfo=str(tmp_path / "missing")) is None


@pytest.mark.slow
def test_a_samba_client_mount_is_remote_and_the_servers_folder_is_not(samba, smb_mount):
    assert mount_of(smb_mount.share) is not None and mount_of(smb_mount.share).is_remote  # type: ignore[union-attr]
    assert mount_of(smb_mount.share).fs_type == "fuse.smbnetfs"  # type: ignore[union-attr]
    assert not mount_of(samba.share).is_remote  # type: ignore[union-attr]
