"""The systemd unit, checked by systemd's own tools (no systemd as PID 1 needed).

``systemd-analyze verify --recursive-errors=yes`` fails on unknown keys and bad values (plain
``verify`` only warns). It also insists that ExecStart= exists, so the verified copy points it at
this checkout's ``konfuzio-watch`` script. ``security --offline=yes`` scores the sandbox.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .helpers import MAX_EXPOSURE, unit_settings

DATA = Path(__file__).resolve().parent.parent / "konfuzio_watch" / "data"
UNIT = DATA / "konfuzio-watch.service"
SYSUSERS = DATA / "konfuzio-watch.sysusers"
INSTALLED_EXEC = "/opt/konfuzio-watch/.venv/bin/konfuzio-watch"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: apt-get install systemd)"
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def local_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart= pointing at an executable that exists on this machine."""
    text = UNIT.read_text() if text is None else text
    script = Path(sys.executable).parent / "konfuzio-watch"
    assert script.is_file(), f"{script} missing: install the project (pip install -e .)"
    assert f"ExecStart={INSTALLED_EXEC} " in text
    path = tmp_path / UNIT.name
    path.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={script} "))
    return path


def test_the_unit_says_what_the_daemon_relies_on() -> None:
    unit = unit_settings(UNIT.read_text())

    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == [f"{INSTALLED_EXEC} run --config /etc/konfuzio-watch/config.yaml"]
    assert unit["WatchdogSec"] == ["60"]
    assert unit["LoadCredential"] == ["konfuzio-token:/etc/konfuzio-watch/konfuzio-token"]
    assert unit["StateDirectory"] == ["konfuzio-watch"]
    assert unit["WorkingDirectory"] == ["/var/lib/konfuzio-watch"]
    assert unit["Environment"] == ["LOG_TO_FILE=False"]
    assert unit["User"] == ["konfuzio-watch"] and unit["ReadWritePaths"] == ["/srv/scans"]
    assert unit["KillMode"] == ["mixed"]  # the daemon stops its ngrok agent itself
    umask = int(unit["UMask"][0], 8)
    assert umask & 0o007 == 0o007, "files the daemon creates must give others nothing"
    assert umask & 0o070 == 0, (
        "a scanner group must be able to read and delete results (docs/service.md: Scanner group)"
    )


@pytest.mark.slow
@needs_analyze
def test_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = analyze("verify", "--recursive-errors=yes", str(local_copy(tmp_path)))

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.slow
@needs_analyze
@pytest.mark.parametrize(
    ("good", "bad", "complaint"),
    [
        ("ProtectSystem=strict", "ProtectSytem=strict", "Unknown key 'ProtectSytem'"),
        ("RestrictRealtime=yes", "RestrictRealtime=sometimes", "Failed to parse"),
    ],
)
def test_verify_fails_on_a_misspelt_key_or_a_bad_value(tmp_path: Path, good: str, bad: str, complaint: str) -> None:
    text = UNIT.read_text()
    assert f"\n{good}\n" in text

    result = analyze("verify", "--recursive-errors=yes", str(local_copy(tmp_path, text.replace(good, bad))))

    assert result.returncode != 0
    assert complaint in result.stderr


@pytest.mark.slow
@needs_analyze
def test_the_sandbox_exposure_is_at_most_1_4() -> None:
    result = analyze("security", "--offline=yes", f"--threshold={round(MAX_EXPOSURE * 10)}", str(UNIT))

    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    print(f"systemd-analyze security: exposure {match.group(1)} {match.group(2)}")
    assert float(match.group(1)) <= MAX_EXPOSURE
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
@needs_analyze
def test_the_security_threshold_rejects_an_unhardened_unit(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")

    result = analyze("security", "--offline=yes", f"--threshold={round(MAX_EXPOSURE * 10)}", str(bare))

    assert result.returncode != 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_creates_the_system_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()

    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    user = passwd["konfuzio-watch"]
    assert user[5:] == ["/var/lib/konfuzio-watch", "/usr/sbin/nologin"]
    assert int(user[2]) < 1000  # a system user


def mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(66, 0, 0, 0, 0) >= 0  # PR_GET_MDWE, Linux >= 6.3


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not mdwe_supported(), reason="needs Linux >= 6.3 for PR_SET_MDWE"
)
def test_the_demo_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes, approximated with prctl(PR_SET_MDWE): the real pipeline still works."""
    code = textwrap.dedent("""
        import ctypes, mmap, sys
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(65, 1, 0, 0, 0) == 0, "PR_SET_MDWE failed"  # PR_MDWE_REFUSE_EXEC_GAIN
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()
            sys.exit("a writable+executable mapping was allowed")
        except PermissionError:
            pass
        callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)  # libffi trampolines
        assert callback(1) == 2
        from konfuzio_watch.cli import main
        sys.exit(main(["demo", "--files", "3", "--workdir", sys.argv[1]]))
    """)
    env = dict(os.environ, LOG_TO_FILE="False")
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "demo")], capture_output=True, text=True, timeout=110, env=env
    )

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    done = tmp_path / "demo" / "done"
    assert len(list(done.rglob("*.json"))) == 3, result.stdout[-2000:]


def exposure(result: subprocess.CompletedProcess[str]) -> str:
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) ", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1)


@pytest.mark.slow
@needs_analyze
def test_the_readmes_exposure_figures_are_what_systemd_analyze_says(tmp_path: Path) -> None:
    """The shipped unit alone, and with the drop-in of docs/service.md's scanner group block."""
    readme = (DATA.parent.parent / "docs" / "service.md").read_text(encoding="utf-8")
    claimed = re.findall(
        r"`systemd-analyze security` exposure (\d+\.\d), or (\d+\.\d) with the \[scanner group\]", readme
    )
    assert len(claimed) == 1, "docs/service.md gives the exposure of the unit, and with the scanner group's drop-in"
    (scanner_block,) = re.findall(r"<!-- install: scanner\b[^>]*-->\n```sh\n(.*?)```", readme, re.S)
    ((drop_in, name),) = re.findall(
        r"printf '(\[Service\][^']*)' > \"\$ROOT/etc/systemd/system/konfuzio-watch\.service"
        r"\.d/([^\"]+)\"",
        scanner_block,
    )
    units = tmp_path / "etc/systemd/system"
    (units / "konfuzio-watch.service.d").mkdir(parents=True)
    shutil.copy(UNIT, units)
    (units / "konfuzio-watch.service.d" / name).write_text(drop_in.replace("\\n", "\n"))

    alone = exposure(analyze("security", "--offline=yes", str(UNIT)))
    with_group = exposure(analyze("security", "--offline=yes", f"--root={tmp_path}", "konfuzio-watch.service"))

    print(f"systemd-analyze security: {alone}, with the scanner group's drop-in {with_group}")
    assert claimed[0] == (alone, with_group)
