"""The service install of docs/service.md, run as written against a temporary root, then the daemon as its user.

The ``sh`` blocks of docs/service.md after ``<!-- install: system ... -->`` and ``<!-- install: scanner ... -->``
run in bash with ROOT set to a temporary folder: their one knob, which the page shows empty, so
it shows the real paths. The project's own konfuzio-watch stands in for /opt/konfuzio-watch/.venv
(installing a wheel is tested in test_packaging.py). systemd-sysusers creates the user in that
root's /etc/passwd, which this host's NSS does not read, so commands run as the user through
setpriv with the numeric ids found there, and get what systemd would give the service: the
unit's UMask=, WorkingDirectory= and Environment=, StateDirectory=, its groups (memberships in
the root's /etc/group plus SupplementaryGroups=), and the token in a credentials folder of its
own (LoadCredential=).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from konfuzio_watch.accounts import Account, describe_uid, name_of
from konfuzio_watch.install import shipped_bytes
from konfuzio_watch.samples import make_pdf

from .conftest import TOKEN, wait_until
from .helpers import MAX_EXPOSURE, readme_block, unit_settings

REPO = Path(__file__).resolve().parent.parent
USER = "konfuzio-watch"
APP = "/opt/konfuzio-watch/.venv/bin/konfuzio-watch"
TOOLS = ("bash", "systemd-sysusers", "systemd-analyze", "setpriv", "unshare", "mount", "install")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]

pytestmark = [
    pytest.mark.slow,  # every test runs docs/service.md's install block as root (the fixture ``installed``)
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, setpriv, a mount namespace"),
    pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (Debian: systemd, util-linux, coreutils)"),
]


def run_block(name: str, root: Path) -> subprocess.CompletedProcess[str]:
    """The docs/service.md block as a bash script, with ROOT set to ``root`` instead of empty."""
    lines = readme_block(f"install: {name}").splitlines()
    if re.fullmatch(r"ROOT=\s*(#.*)?", lines[0]):
        lines = lines[1:]
    code = "\n".join(line.split(" #")[0] for line in lines if not line.lstrip().startswith("#"))
    outside = re.findall(r"(?<!\$ROOT)(?<![\w.-])/(?:etc|srv|opt|var|usr|run|lib|home)\b\S*", code)
    assert not outside, f"docs/service.md block {name!r} names paths without $ROOT in front: {outside}"
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "KONFUZIO_TOKEN": TOKEN}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f"ROOT={shlex.quote(str(root))}\n" + "\n".join(lines)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def db(root: Path, name: str) -> list[list[str]]:
    return [line.split(":") for line in (root / "etc" / name).read_text().splitlines() if line]


def user_ids(root: Path, user: str = USER) -> tuple[int, int]:
    (entry,) = [e for e in db(root, "passwd") if e[0] == user]
    return int(entry[2]), int(entry[3])


def group_id(root: Path, name: str) -> int:
    (entry,) = [e for e in db(root, "group") if e[0] == name]
    return int(entry[2])


@pytest.fixture
def root() -> Iterator[Path]:
    """A temporary root that anyone may enter, with /opt/konfuzio-watch/.venv/bin/konfuzio-watch in it."""
    path = Path(tempfile.mkdtemp(prefix="konfuzio-watch-root-"))
    path.chmod(0o755)
    if not all(p.stat().st_mode & stat.S_IXOTH for p in path.parents):
        pytest.skip(f"{path.parent} is not reachable for other users")
    app = path / APP.lstrip("/")
    app.parent.mkdir(parents=True)
    app.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m konfuzio_watch "$@"\n')
    app.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def installed(root: Path) -> Path:
    result = run_block("system", root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
    return root


@dataclass
class Service:
    """konfuzio-watch.service's process environment, as systemd would set it up, under a temporary root."""

    root: Path
    uid: int
    gid: int
    groups: list[int]
    umask: str
    cwd: Path
    env: dict[str, str]

    @classmethod
    def from_unit(cls, root: Path) -> Service:
        unit_dir = root / "etc/systemd/system"
        text = (unit_dir / "konfuzio-watch.service").read_text()
        for drop_in in sorted((unit_dir / "konfuzio-watch.service.d").glob("*.conf")):
            text += "\n" + drop_in.read_text()
        unit = unit_settings(text)
        (user,) = unit["User"]
        uid, gid = user_ids(root, user)
        # like systemd: the user's memberships (getgrouplist) plus SupplementaryGroups=
        groups = {int(e[2]) for e in db(root, "group") if user in e[3].split(",")}
        groups |= {group_id(root, name) for value in unit.get("SupplementaryGroups", []) for name in value.split()}
        state = root / "var/lib" / unit["StateDirectory"][0]
        state.mkdir(parents=True, exist_ok=True)
        os.chown(state, uid, gid)
        state.chmod(int(unit["StateDirectoryMode"][0], 8))
        credentials = root / "run/credentials/konfuzio-watch.service"
        credentials.mkdir(parents=True)
        for value in unit["LoadCredential"]:
            name, source = value.split(":", 1)
            (credentials / name).write_bytes((root / source.lstrip("/")).read_bytes())
            os.chown(credentials / name, uid, gid)
            (credentials / name).chmod(0o400)
        os.chown(credentials, uid, gid)
        credentials.chmod(0o500)
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(state),
            "CREDENTIALS_DIRECTORY": str(credentials),
        }
        env.update(value.split("=", 1) for value in unit.get("Environment", []))  # type: ignore[misc]
        cwd = root / unit["WorkingDirectory"][0].lstrip("/")
        return cls(root, uid, gid, sorted(groups), unit["UMask"][0], cwd, env)

    def command(
        self, args: Sequence[str], uid: int | None = None, gid: int | None = None, groups: Sequence[int] | None = None
    ) -> list[str]:
        """``args`` as the service user (or another uid), in a mount namespace where the Python running
        this test is reachable: on this machine it lives under /root, which is 0700."""
        uid, gid = (self.uid, self.gid) if uid is None else (uid, gid if gid is not None else uid)
        groups = self.groups if groups is None else groups
        ids = [
            f"--reuid={uid}",
            f"--regid={gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
        ]
        script = (
            reachable(
                [Path(sys.executable), Path(sys.base_prefix), Path(sys.prefix), REPO, self.root], self.root / ".mnt"
            )
            + 'exec setpriv "$@"'
        )
        return [
            "unshare",
            "--mount",
            "--propagation=private",
            "sh",
            "-c",
            script,
            "sh",
            *ids,
            "--no-new-privs",
            "--inh-caps=-all",
            "--",
            "sh",
            "-c",
            'umask "$0" && exec "$@"',
            self.umask,
            *args,
        ]

    def run(self, args: Sequence[str], **ids) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
        return subprocess.run(
            self.command(args, **ids), cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60
        )

    def run_as_root(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """``args`` as root with the service's environment, where the service user reaches this Python too
        (``check`` tries writes as that user in a child process)."""
        script = (
            reachable(
                [Path(sys.executable), Path(sys.base_prefix), Path(sys.prefix), REPO, self.root], self.root / ".mnt"
            )
            + 'exec "$@"'
        )
        return subprocess.run(
            ["unshare", "--mount", "--propagation=private", "sh", "-c", script, "sh", *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )


def reachable(paths: Sequence[Path], stash: Path) -> str:
    """Shell lines (run as root in a private mount namespace) covering each ancestor of ``paths``
    that other users cannot enter with a 0755 tmpfs, into which the entries below it are bound back."""
    blocked: dict[Path, set[str]] = {}
    for path in paths:
        path = path.resolve()
        for parent in reversed(path.parents):
            if not parent.stat().st_mode & stat.S_IXOTH:
                blocked.setdefault(parent, set()).add(path.relative_to(parent).parts[0])
                break
    lines = []
    for n, (directory, names) in enumerate(sorted(blocked.items())):
        for name in sorted(names):
            keep, source = stash / f"{n}-{name}", shlex.quote(str(directory / name))
            lines += [f"mkdir -p {keep}", f"mount --bind {source} {keep}"]
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(directory))}")
        for name in sorted(names):
            keep, target = stash / f"{n}-{name}", shlex.quote(str(directory / name))
            lines += [f"mkdir {target}", f"mount --move {keep} {target}"]
    return "set -e\n" + "".join(f"{line}\n" for line in lines)


def configure(root: Path, emulator, inbox_parent: Path) -> Path:  # type: ignore[no-untyped-def]
    """What the admin does after install-files: edit the installed example for this site."""
    path = root / "etc/konfuzio-watch/config.yaml"
    raw = yaml.safe_load(path.read_text())
    del raw["konfuzio"]["token"]
    raw["konfuzio"].update(host=emulator.url, token_file="${CREDENTIALS_DIRECTORY}/konfuzio-token", project_id=1)
    raw["folders"].update(
        inbox=str(inbox_parent / "inbox"),
        done=str(inbox_parent / "done"),
        failed=str(inbox_parent / "failed"),
        state=str(root / "var/lib/konfuzio-watch"),
    )
    raw["watch"]["settle_seconds"] = 0.3
    raw["callback"]["port"] = 0
    raw["monitor"]["port"] = 0
    raw["results"].update(callback_timeout=30, poll_interval=0.5)
    path.write_text(yaml.safe_dump(raw))  # the same file: its owner and mode stay
    return path


def test_the_install_block_writes_the_files_the_user_and_a_config_only_the_service_reads(installed: Path) -> None:
    root = installed
    uid, gid = user_ids(root)
    (entry,) = [e for e in db(root, "passwd") if e[0] == USER]
    assert 0 < uid < 1000 and entry[5:] == ["/var/lib/konfuzio-watch", "/usr/sbin/nologin"]  # a system user
    assert (root / "etc/systemd/system/konfuzio-watch.service").read_bytes() == shipped_bytes("konfuzio-watch.service")
    assert (root / "etc/sysusers.d/konfuzio-watch.conf").read_bytes() == shipped_bytes("konfuzio-watch.sysusers")
    modes = {}
    for rel in ("etc/konfuzio-watch", "etc/konfuzio-watch/config.yaml", "etc/konfuzio-watch/konfuzio-token"):
        st = (root / rel).stat()
        modes[rel] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    assert modes == {
        "etc/konfuzio-watch": (0o750, 0, gid),
        "etc/konfuzio-watch/config.yaml": (0o640, 0, gid),
        "etc/konfuzio-watch/konfuzio-token": (0o600, 0, 0),
    }
    assert (root / "etc/konfuzio-watch/config.yaml").read_bytes() == shipped_bytes("config.example.yaml")
    assert (root / "etc/konfuzio-watch/konfuzio-token").read_text() == TOKEN + "\n"

    config = root / "etc/konfuzio-watch/config.yaml"
    config.write_text("# edited by the admin\n")
    again = run_block("system", root)  # an upgrade runs the same steps

    assert again.returncode == 0, again.stderr
    assert f"kept      {config}" in again.stdout and f"unchanged {root}/etc/systemd/system" in again.stdout
    assert config.read_text() == "# edited by the admin\n"
    assert user_ids(root) == (uid, gid)


def test_check_passes_as_the_service_user_and_nobody_else_can_read_the_config(installed: Path, emulator) -> None:  # type: ignore[no-untyped-def]
    root = installed
    share = root / "srv/scans"
    config = configure(root, emulator, share)
    uid, gid = user_ids(root)
    for name in ("inbox", "done", "failed"):  # folders of its own (docs/service.md: install -d -o konfuzio-watch ...)
        (share / name).mkdir(parents=True)
        os.chown(share / name, uid, gid)
        (share / name).chmod(0o750)
    service = Service.from_unit(root)

    result = service.run([str(root / APP.lstrip("/")), "check", "--config", str(config)])

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    Konfuzio API: project 1" in result.stdout and "FAIL" not in result.stdout, result.stdout
    nobody = service.run([str(root / APP.lstrip("/")), "check", "--config", str(config)], uid=65534, groups=[])
    assert nobody.returncode == 2
    assert nobody.stderr == f"konfuzio-watch: cannot read config {config}: Permission denied\n"


def test_the_scanner_group_block_lets_the_group_read_and_delete_results(installed: Path, emulator) -> None:  # type: ignore[no-untyped-def]
    root = installed
    result = run_block("scanner", root)
    assert result.returncode == 0, result.stdout + result.stderr
    scanner = group_id(root, "scanner")
    assert [e[3] for e in db(root, "group") if e[0] == "scanner"] == [USER]
    share = root / "srv/scans"
    for name in ("inbox", "done", "failed"):
        st = (share / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2770, scanner), name
    check_unit_with_drop_ins(root)

    config = configure(root, emulator, share)
    service = Service.from_unit(root)
    assert scanner in service.groups
    log = (root / "daemon.log").open("w")
    daemon = subprocess.Popen(
        service.command([str(root / APP.lstrip("/")), "run", "--config", str(config)]),
        cwd=service.cwd,
        env=service.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        person = 4242  # someone in the scanner group, not konfuzio-watch, writing with umask 0007 (docs/service.md)
        folder = share / "inbox/2026"
        folder.mkdir()
        os.chown(folder, person, scanner)
        folder.chmod(0o2770)
        part = folder / ".scan.pdf.part"
        part.write_bytes(make_pdf(label="scanner"))
        os.chown(part, person, scanner)
        part.chmod(0o660)
        os.replace(part, folder / "scan.pdf")
        done = share / "done/2026"
        wait_until(
            lambda: (done / "scan.pdf").exists() and (done / "scan.pdf.json").exists(),
            30,
            lambda: "the scan in done/: " + (root / "daemon.log").read_text()[-2000:],
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, (root / "daemon.log").read_text()[-2000:]
        log.close()

    for path, mode in ((done, 0o2770), (done / "scan.pdf.json", 0o660)):  # made by the daemon under its UMask=
        st = path.stat()
        assert (oct(stat.S_IMODE(st.st_mode)), st.st_gid) == (oct(mode), scanner), path
    stranger = service.run(["cat", str(done / "scan.pdf.json")], uid=4343, groups=[])
    assert stranger.returncode != 0 and "Permission denied" in stranger.stderr
    member = service.run(
        ["sh", "-c", 'rm -- "$1"/scan.pdf.json "$1"/scan.pdf && rmdir -- "$1"', "sh", str(done)],
        uid=person,
        gid=scanner,
        groups=[],
    )
    assert member.returncode == 0, member.stderr
    assert not done.exists()


def check_unit_with_drop_ins(root: Path) -> None:
    """systemd-analyze on the installed unit with the scanner drop-in: valid, and no more exposed."""
    units = root / "etc/systemd/system"
    verify_dir = root / "verify"
    shutil.copytree(units, verify_dir)
    unit = verify_dir / "konfuzio-watch.service"
    unit.write_text(unit.read_text().replace(f"ExecStart={APP} ", f"ExecStart={root}{APP} "))
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{verify_dir}:")
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--recursive-errors=yes", "konfuzio-watch.service"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--root={root}",
            f"--threshold={round(MAX_EXPOSURE * 10)}",
            "konfuzio-watch.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "SupplementaryGroups=" in security.stdout and "runs with supplementary groups" in security.stdout
    assert security.returncode == 0, security.stdout[-1500:]


def test_check_as_root_judges_the_folders_for_the_user_the_service_ran_as(installed: Path, emulator) -> None:  # type: ignore[no-untyped-def]
    """After the service ran, root's check judged the folders as root: it failed the service's own processing
    folder and passed a done/ the service cannot write."""
    root = installed
    share = root / "srv/scans"
    config = configure(root, emulator, share)
    uid, gid = user_ids(root)
    for name in ("inbox", "done", "failed"):
        (share / name).mkdir(parents=True)
        os.chown(share / name, uid, gid)
        (share / name).chmod(0o750)
    service = Service.from_unit(root)
    app = str(root / APP.lstrip("/"))
    with (root / "daemon.log").open("w") as log:
        daemon = subprocess.Popen(
            service.command([app, "run", "--config", str(config)]),
            cwd=service.cwd,
            env=service.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            (share / "inbox/scan.pdf").write_bytes(make_pdf(label="the service ran"))
            wait_until(
                lambda: (share / "done/scan.pdf.json").exists(),
                30,
                lambda: "scan.pdf done: " + (root / "daemon.log").read_text()[-2000:],
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(30) == 0, (root / "daemon.log").read_text()[-2000:]
    service_user = Account(uid, gid, (), name_of(uid)).describe()  # the host may have no name for it

    checked = service.run_as_root([app, "check", "--config", str(config)])

    out = checked.stdout
    assert checked.returncode == 0, out + checked.stderr
    assert out.startswith(
        f"note  checked as {service_user}, the user konfuzio-watch last ran as (daemon.lock in "
        f"{root}/var/lib/konfuzio-watch); you are root (uid 0); another: check --as USER\n"
    ), out
    assert "ok    processing folder: " in out and "FAIL" not in out, out
    assert f"ok    files it keeps: 3 (journal, locks) writable for {service_user}" in out, out

    os.chown(share / "done", 0, 0)  # root's now, as root's check could not tell: the service cannot write there
    os.chmod(share / "done", 0o755)
    journal = root / "var/lib/konfuzio-watch/journal.sqlite3"
    os.chown(journal, 0, 0)  # as after `konfuzio-watch run` by root: the service would stop at its start
    checked = service.run_as_root([app, "check", "--config", str(config)])
    out = checked.stdout
    assert checked.returncode == 1, out
    assert (
        f"FAIL  folders.done: cannot write into {share / 'done'}: Permission denied (as {service_user}) -> "
        f"let {service_user} write there"
    ) in out, out
    assert (
        f"FAIL  files it keeps: cannot write {journal}: Permission denied (as {service_user}) -> give them to "
        f"{service_user}"
    ) in out, out

    as_root = service.run_as_root([app, "check", "--as", "root", "--config", str(config)])
    out = as_root.stdout
    assert out.startswith("note  checked as root (uid 0) (--as); you are root (uid 0)\n"), out
    assert f"belongs to {describe_uid(uid)}, not to root (uid 0), the user checked as; anyone owning it" in out, out
