"""What gets installed: the lean requirement files, the sdist and wheel, the command line, the Makefile.

The wheel test builds an sdist and a wheel from it with the build backend pyproject.toml names
(in a throwaway environment holding its build requirements), installs the wheel with
``--no-index --no-deps`` into a fresh virtualenv outside the checkout, and runs the installed
``konfuzio-watch``. The dependencies come from this test run's own environment through a .pth
line rather than being installed again: that keeps the test offline and at a few seconds, and
the dependency set itself is what the whole suite runs in (the lean .venv of ``make test``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from konfuzio_watch import cli

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SDK = "konfuzio-sdk"
SDK_MODULES = ("konfuzio_sdk.api", "konfuzio_sdk.urls", "konfuzio_sdk.utils", "konfuzio_sdk.data")
DATA_FILES = ("konfuzio-watch.service", "konfuzio-watch.sysusers", "config.example.yaml", "result.schema.json")


def name(requirement: str | Requirement) -> str:
    req = requirement if isinstance(requirement, Requirement) else Requirement(requirement)
    return re.sub(r"[-_.]+", "-", req.name).lower()


def requirements(path: Path) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("-r ")]


def spec(reqs: list[str] | list[Requirement]) -> dict[str, str]:
    return {name(r): str((r if isinstance(r, Requirement) else Requirement(r)).specifier) for r in reqs}


LEAN = requirements(REPO / "requirements" / "lean.txt")
OWN = [r for r in PYPROJECT["project"]["dependencies"] if name(r) != SDK]
SDK_PIN = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if name(r) == SDK)
SDK_SUBSET = [r for r in LEAN if name(r) not in spec(OWN)]


def test_lean_requirements_are_pyprojects_own_plus_a_pinned_part_of_the_sdks() -> None:
    assert {n: s for n, s in spec(LEAN).items() if n in spec(OWN)} == spec(OWN)
    test_txt = (REPO / "requirements" / "test.txt").read_text()
    assert "-r lean.txt" in test_txt.splitlines()
    test_extra = PYPROJECT["project"]["optional-dependencies"]["test"]
    assert spec(requirements(REPO / "requirements" / "test.txt")) == spec(test_extra)

    assert importlib.metadata.version(SDK) in SDK_PIN.specifier, "the installed konfuzio-sdk is not pyproject's pin"
    declared = {
        name(r): r
        for r in map(Requirement, importlib.metadata.requires(SDK) or [])
        if not r.marker or r.marker.evaluate({"extra": ""})
    }
    for req in SDK_SUBSET:
        (pinned,) = [s.version for s in req.specifier if s.operator == "=="]
        assert name(req) in declared, f"{req}: not a dependency of {SDK_PIN}"
        sdk_range = declared[name(req)]
        assert sdk_range.specifier.contains(pinned, prereleases=True), f"{req} is outside {sdk_range}"


@pytest.mark.slow
def test_lean_requirements_name_every_distribution_the_sdk_modules_import() -> None:
    """Nothing the SDK loads is there by accident (say, as pytest's dependency), and nothing pinned is unused."""
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"for m in {SDK_MODULES!r}: __import__(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in set(sys.modules) - before})))\n"
    )
    env = dict(os.environ, LOG_TO_FILE="False")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    by_module = importlib.metadata.packages_distributions()
    imported = {name(d) for m in json.loads(result.stdout) for d in by_module.get(m, [])} - {SDK}

    pinned = {name(r) for r in SDK_SUBSET}
    brought = closure(pinned)
    assert imported <= brought, f"imported, but not in requirements/lean.txt nor brought by it: {imported - brought}"
    assert pinned <= imported, f"pinned in requirements/lean.txt, never imported: {pinned - imported}"


def test_the_readmes_app_install_is_the_lean_one_with_pyprojects_pin() -> None:
    """docs/service.md's pip lines are not run here (they need the package index); they must name the same things."""
    (block,) = re.findall(
        r"<!-- install: app\b[^>]*-->\n```sh\n(.*?)```", (REPO / "docs" / "service.md").read_text(), re.S
    )
    venv_pip = "/opt/konfuzio-watch/.venv/bin/pip install"
    assert block.splitlines() == [
        "python3 -m venv /opt/konfuzio-watch/.venv",
        f"{venv_pip} -r requirements/lean.txt",
        f"{venv_pip} --no-deps {SDK_PIN} .",
    ]


def closure(names: set[str]) -> set[str]:
    """The installed distributions ``names`` need, themselves included."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for req in map(Requirement, importlib.metadata.requires(current) or []):
            if not req.marker or req.marker.evaluate({"extra": ""}):
                todo.append(name(req))
    return seen


def test_help_shows_the_commands_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])

    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for command in ("run", "check", "status", "retry", "demo", "install-files"):
        assert re.search(rf"^ {{4}}{command}\b", text, re.M), command
    codes = dict(re.findall(r"^  (\d+) +(\S.*)$", text.split("exit codes:")[1], re.M))
    assert set(codes) == {str(cli.EXIT_OK), str(cli.EXIT_FAILURE), str(cli.EXIT_USAGE), str(cli.EXIT_INTERRUPTED)}
    assert codes["2"].startswith("usage or configuration error") and codes["130"].startswith("interrupted")
    assert "KONFUZIO_WATCH_CONFIG" in text and "Maps errors" not in text


def test_config_defaults_to_the_environment_then_etc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KONFUZIO_WATCH_CONFIG", str(tmp_path / "from-env.yaml"))
    assert cli.main(["status"]) == cli.EXIT_USAGE
    missing = "No such file or directory"
    assert capsys.readouterr().err == f"konfuzio-watch: cannot read config {tmp_path}/from-env.yaml: {missing}\n"

    monkeypatch.delenv("KONFUZIO_WATCH_CONFIG")
    if Path(cli.DEFAULT_CONFIG).exists():
        pytest.skip(f"{cli.DEFAULT_CONFIG} exists on this machine")
    assert cli.main(["check"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"konfuzio-watch: cannot read config {cli.DEFAULT_CONFIG}: {missing}\n"


def fake_python(tmp_path: Path, version: str) -> Path:
    """An interpreter that says it is Python ``version`` and can do nothing else."""
    path = tmp_path / f"python{version}"
    path.write_text(f'#!/bin/sh\ncase "$1" in -V|--version) echo "Python {version}"; exit 0;; esac\nexit 1\n')
    path.chmod(0o755)
    return path


def make(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "MFLAGS"}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), f"VENV={tmp_path / 'venv'}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


@pytest.mark.slow
@needs_make
@pytest.mark.parametrize("python", ["3.9.18", "missing"])
def test_make_refuses_an_old_python_in_one_line(tmp_path: Path, python: str) -> None:
    interpreter = fake_python(tmp_path, python) if python != "missing" else tmp_path / "no-such-python"

    result = make(tmp_path, f"PYTHON={interpreter}", "demo")

    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert f"konfuzio-watch needs Python >= 3.11, and {interpreter} is " in result.stderr
    assert ("3.9.18" if python != "missing" else "not found") in result.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
@needs_make
def test_make_rebuilds_a_venv_left_by_an_old_python(tmp_path: Path) -> None:
    old = fake_python(tmp_path, "3.9.18")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    shutil.copy(old, tmp_path / "venv" / "bin" / "python")
    (tmp_path / "venv" / ".installed").touch()  # up to date, as far as its time stamp goes

    result = make(tmp_path, f"PYTHON={old}", "test")  # reusing it would run its python -m pytest

    assert "konfuzio-watch needs Python >= 3.11" in result.stderr, result.stdout + result.stderr
    # a newer one passes the check, then cannot make a venv
    newer = make(tmp_path, f"PYTHON={fake_python(tmp_path, '3.12.1')}", "test")
    assert newer.returncode != 0
    assert "a new virtualenv with" in newer.stdout and "(Python 3.12.1)" in newer.stdout, newer.stdout + newer.stderr
    assert not (tmp_path / "venv" / ".installed").exists()


def copy_checkout(dst: Path) -> Path:
    """The files git would commit (tracked, and new ones not ignored), symlinks kept."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    if listing.returncode != 0:
        shutil.copytree(REPO, dst, symlinks=True, ignore=shutil.ignore_patterns(".venv", ".git", "dist", "build"))
        return dst
    for rel in filter(None, listing.stdout.decode().split("\0")):
        source = REPO / rel
        if not os.path.lexists(source):
            continue  # deleted in the work tree
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return dst


def build(src: Path, out: Path, tmp_path: Path) -> tuple[Path, Path]:
    """sdist from ``src``, then the wheel from the unpacked sdist, as ``python -m build`` does."""
    backend_env = tmp_path / "build-env"
    requires = PYPROJECT["build-system"]["requires"]
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(backend_env),
            *requires,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr
    backend = PYPROJECT["build-system"]["build-backend"]

    def hook(name: str, cwd: Path) -> Path:
        code = f"import sys, {backend} as b; print(b.{name}(sys.argv[1]))"
        result = subprocess.run(
            [sys.executable, "-c", code, str(out)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PYTHONPATH=str(backend_env)),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return out / result.stdout.splitlines()[-1]

    sdist = hook("build_sdist", src)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    wheel = hook("build_wheel", tmp_path / "unpacked" / sdist.name.removesuffix(".tar.gz"))
    return sdist, wheel


@pytest.mark.slow
def test_the_wheel_installs_outside_the_checkout_and_carries_what_an_admin_deploys(tmp_path: Path) -> None:
    sdist, wheel = build(copy_checkout(tmp_path / "src"), tmp_path / "dist", tmp_path)

    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz")
        members = {m.name: m for m in tar.getmembers()}
        for rel in [f"konfuzio_watch/data/{f}" for f in DATA_FILES] + ["LICENSE"]:
            assert members[f"{top}/{rel}"].isfile(), rel  # the config symlink arrives as a file
    with zipfile.ZipFile(wheel) as whl:
        for data_file in DATA_FILES:
            shipped = (REPO / "konfuzio_watch" / "data" / data_file).read_bytes()
            assert whl.read(f"konfuzio_watch/data/{data_file}") == shipped, data_file
        dist_info = next(n.split("/")[0] for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        assert whl.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
        metadata = whl.read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert {name(r) for r in re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)} >= {SDK, *spec(OWN)}

    venv = tmp_path / "venv"  # outside the checkout
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    (Path(site) / "dependencies-from-the-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = dict(os.environ, LOG_TO_FILE="False")
    env.pop("KONFUZIO_WATCH_CONFIG", None)

    where = subprocess.run(
        [python, "-c", "import konfuzio_watch; print(konfuzio_watch.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert where.stdout.startswith(site), where.stdout + where.stderr
    helped = subprocess.run(
        [venv / "bin" / "konfuzio-watch", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30, env=env
    )
    assert helped.returncode == 0 and "install-files" in helped.stdout and "exit codes:" in helped.stdout

    prefix = tmp_path / "root"
    installed = subprocess.run(
        [venv / "bin" / "konfuzio-watch", "install-files", "--prefix", str(prefix)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    for target, data_file in (
        ("etc/systemd/system/konfuzio-watch.service", "konfuzio-watch.service"),
        ("etc/sysusers.d/konfuzio-watch.conf", "konfuzio-watch.sysusers"),
        ("etc/konfuzio-watch/config.yaml", "config.example.yaml"),
    ):
        assert (prefix / target).read_bytes() == (REPO / "konfuzio_watch/data" / data_file).read_bytes(), target
        assert f"wrote     {prefix / target}" in installed.stdout
    assert stat.S_IMODE((prefix / "etc/konfuzio-watch/config.yaml").stat().st_mode) == 0o640
    if os.geteuid() == 0 and shutil.which("systemd-sysusers"):
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "konfuzio-watch:" in (prefix / "etc/passwd").read_text()

    demo = subprocess.run(
        [venv / "bin" / "konfuzio-watch", "demo", "--files", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert re.search(r"^ {6}'scan_0001\.pdf page 1 of 1 sha256 [0-9a-f]{20,}\.\.\.'$", demo.stdout, re.M), demo.stdout
    assert demo.stdout.rstrip().endswith(f"to keep them: {venv}/bin/konfuzio-watch demo --workdir DIR")


def test_the_readme_gives_one_install_size_the_one_make_prints() -> None:
    """`make` ends with `du -sh` of the new virtualenv; the README quotes that line, and every other place
    that sizes the lean virtualenv (or the full one it replaces) says the same, in du's notation: the
    Performance table in docs/performance.md, "Why the install is lean" in docs/service.md."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    docs = {page.name: page.read_text(encoding="utf-8") for page in sorted((REPO / "docs").glob("*.md"))}
    assert 'echo "==> $(VENV) ready: $$(du -sh $(VENV) | cut -f1)' in (REPO / "Makefile").read_text()
    quoted = re.findall(r"`==> \.venv ready: (\d+)M, \d+ packages`", readme)
    assert len(quoted) == 1, "the README quotes the line `make` ends with, once"
    lean = quoted[0]
    (row,) = re.findall(r"^\| fresh `make test` venv \(`du -sh`\) \| (\d+)M \| (\d+)M \|", docs["performance.md"], re.M)
    full = row[0]
    assert row[1] == lean, "the Performance table measures the same virtualenv"
    service = docs["service.md"]
    why = service[service.index("## Why the install is lean") : service.index("## Where the processing folder is")]
    assert re.findall(r"(\d+)M in a virtualenv", why) == [full] and re.findall(r"a (\d+)M virtualenv", why) == [lean]
    sizes = re.findall(r"\b(\d+)M\b", (REPO / "requirements" / "lean.txt").read_text())
    assert sizes == [full, lean]
    assert not re.search(
        r"\d+ (MB|MiB)\b[^|\n]*\b(venv|virtualenv)|\b(venv|virtualenv)\b[^|.\n]*\d+ (MB|MiB)\b",
        "\n".join([readme, *docs.values()]),
    ), "a virtualenv sized in another unit than du's"
