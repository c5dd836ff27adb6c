"""Whom ``check`` judges the folders for (accounts.choose): a table of who runs it and what was found."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from konfuzio_watch.accounts import Account, AccountError, choose, lookup, me, try_writes
from konfuzio_watch.cli import main

ROOT = Account(0, 0, (), "root")
ADMIN = Account(1000, 1000, (27,), "admin")
SERVICE = Account(999, 999, (1001,), "konfuzio-watch")  # as its daemon.lock recorded it
SYSTEM = Account(998, 998, (), "konfuzio-watch")  # the system user found by name
OTHER = Account(1002, 1002, (), "scanner")
WHERE = "daemon.lock in /var/lib/konfuzio-watch"


@pytest.mark.parametrize(
    ("current", "requested", "last", "system_user", "expected", "why"),
    [
        (
            ROOT,
            None,
            SERVICE,
            SYSTEM,
            SERVICE,
            "checked as konfuzio-watch (uid 999), the user konfuzio-watch last ran as "
            f"({WHERE}); you are root (uid 0); another: check --as USER",
        ),
        (
            ROOT,
            None,
            ROOT,
            SYSTEM,
            ROOT,
            f"checked as root (uid 0), the user konfuzio-watch last ran as ({WHERE}); another: check --as USER",
        ),
        (
            ROOT,
            None,
            None,
            SYSTEM,
            SYSTEM,
            "checked as konfuzio-watch (uid 998), the system user the service runs as; "
            "you are root (uid 0); another: check --as USER",
        ),
        (
            ROOT,
            None,
            None,
            None,
            ROOT,
            "checked as root (uid 0): no konfuzio-watch user here; another: check --as USER",
        ),
        (ROOT, OTHER, SERVICE, SYSTEM, OTHER, "checked as scanner (uid 1002) (--as); you are root (uid 0)"),
        (
            ADMIN,
            None,
            None,
            None,
            ADMIN,
            "checked as admin (uid 1000), who runs check; another: check --as USER (as root)",
        ),
        (
            ADMIN,
            None,
            SERVICE,
            None,
            ADMIN,
            "checked as admin (uid 1000), who runs check; konfuzio-watch last ran as "
            f"konfuzio-watch (uid 999) ({WHERE}): to check as it, run: sudo "
            "konfuzio-watch check --as konfuzio-watch",
        ),
        (
            SERVICE,
            None,
            SERVICE,
            None,
            SERVICE,
            "checked as konfuzio-watch (uid 999), who runs check; another: check --as USER (as root)",
        ),
        (ADMIN, ADMIN, SERVICE, None, ADMIN, "checked as admin (uid 1000) (--as); you are admin (uid 1000)"),
    ],
)
def test_the_user_checked_as(current, requested, last, system_user, expected, why) -> None:  # type: ignore[no-untyped-def]
    assert choose(current, requested, last, WHERE, system_user) == (expected, why)


def test_only_root_checks_as_another_user() -> None:
    with pytest.raises(
        AccountError,
        match=r"^check --as: only root can try writing as konfuzio-watch \(uid 999\); "
        r"run check as root, or as konfuzio-watch \(uid 999\) itself$",
    ):
        choose(ADMIN, SERVICE, None, WHERE, None)


def test_a_user_is_looked_up_by_name_or_number_with_its_login_groups() -> None:
    entry = pwd.getpwuid(os.geteuid())
    found = lookup(entry.pw_name)
    assert (found.uid, found.gid, found.name) == (entry.pw_uid, entry.pw_gid, entry.pw_name)
    assert set(found.groups) == set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    assert lookup(str(entry.pw_uid)) == found
    bare = next(uid for uid in range(4242400, 4242500) if not any(e.pw_uid == uid for e in pwd.getpwall()))
    assert lookup(str(bare)) == Account(bare, bare)  # a uid without a name: its number as its group
    with pytest.raises(AccountError, match="^check --as no-such-user-here: there is no such user$"):
        lookup("no-such-user-here")


def test_check_as_an_unknown_user_is_a_usage_error(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "config.yaml"
    config.write_text(
        f"konfuzio: {{token: x, project_id: 1}}\nfolders: {{inbox: {tmp_path}/inbox, done: "
        f"{tmp_path}/done, failed: {tmp_path}/failed, state: {tmp_path}/state}}\n"
    )
    assert main(["check", "--as", "no-such-user-here", "--config", str(config)]) == 2
    assert capsys.readouterr().err == "konfuzio-watch: check --as no-such-user-here: there is no such user\n"


def test_writes_are_tried_for_real(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "ro").mkdir(mode=0o555)
    (tmp_path / "journal").write_bytes(b"")
    (tmp_path / "journal").chmod(0o444)
    tried = try_writes(
        me(),
        [
            ("folder", tmp_path),
            ("folder", tmp_path / "new" / "deeper"),
            ("file", tmp_path / "missing"),
            ("file", tmp_path / "journal"),
            ("folder", tmp_path / "ro"),
        ],
    )
    assert tried[:3] == [
        (True, str(tmp_path)),
        (True, f"{tmp_path / 'new' / 'deeper'} (will be created)"),
        (True, f"{tmp_path / 'missing'} (will be created)"),
    ]
    if os.geteuid() != 0:  # root writes anyway
        assert tried[3:] == [
            (False, f"cannot write {tmp_path / 'journal'}: Permission denied"),
            (False, f"cannot write into {tmp_path / 'ro'}: Permission denied"),
        ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal", "ro"], "a probe was left behind"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="trying writes as another user needs root")
def test_root_tries_the_writes_as_the_other_user(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """In a child process with nobody's ids: root's own folder (0700) is closed to it. Where nobody cannot
    even run this Python (it lives in root's home here), that is the answer: nor could a service.
    (tests/test_install.py runs check where the service's user reaches this Python.)"""
    nobody = Account(65534, 65534, (), "nobody")
    tmp_path.chmod(0o700)
    tried = try_writes(nobody, [("folder", tmp_path), ("file", tmp_path / "missing")])
    try:
        runs = (
            subprocess.run(
                [sys.executable, "-I", "-c", "import json, subprocess"],
                user=65534,
                group=65534,
                extra_groups=[],
                capture_output=True,
                cwd="/",
                timeout=60,
            ).returncode
            == 0
        )
    except PermissionError:
        runs = False
    if runs:
        assert tried == [
            (False, f"cannot write into {tmp_path}: Permission denied"),
            (False, f"cannot write {tmp_path / 'missing'}: Permission denied"),
        ]
    else:
        assert tried[0] == tried[1] and tried[0][0] is False
        assert tried[0][1].startswith(f"cannot try it as nobody (uid 65534): it cannot run {sys.executable} ("), tried
        assert "Permission denied" in tried[0][1] and tried[0][1].endswith(
            "); nor can the service, if it runs this installation"
        )
    assert list(tmp_path.iterdir()) == []
