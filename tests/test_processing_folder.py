"""Where claimed files wait: one rule (``processing.choose``), followed alike by ``check`` and ``run``,
and named with its reason in the start-up log (issue 23, item 1)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from konfuzio_watch import processing

from .helpers import AS_NOBODY, KONFUZIO_WATCH, DaemonProcess, can_drop_privileges

INBOX = Path("/srv/scans/inbox")
SIBLING = Path("/srv/scans/.inbox.konfuzio-watch")
INSIDE = Path("/srv/scans/inbox/.konfuzio-watch/processing")
NOBODY = 65534


@pytest.mark.parametrize(
    ("facts", "path", "why"),
    [
        ({}, SIBLING, "a hidden sibling of the inbox, on the same file system"),
        ({"may_create_in_parent": False}, INSIDE, "konfuzio-watch may not create entries in /srv/scans"),
        ({"may_create_in_parent": False, "user": "scan-bot"}, INSIDE, "scan-bot may not create entries in /srv/scans"),
        ({"parent_same_fs": False}, INSIDE, "/srv/scans is another file system than the inbox"),
        # made by the admin for the service's user, where it may not create entries itself
        (
            {"may_create_in_parent": False, "sibling_exists": True},
            SIBLING,
            "a hidden sibling of the inbox, on the same file system",
        ),
        # an older run's folder with files a journal moved aside no longer names: kept, so they are adopted
        ({"inside_exists": True}, INSIDE, "in the inbox: it exists already"),
        (
            {"inside_exists": True, "sibling_exists": True},
            SIBLING,
            "a hidden sibling of the inbox, on the same file system",
        ),
        (
            {"bound": "/srv/scans/inbox/.konfuzio-watch/processing", "sibling_exists": True},
            INSIDE,
            "where this journal's files were claimed before; the journal keeps it",
        ),
        (
            {"configured": Path("/srv/claims"), "bound": "/elsewhere", "may_create_in_parent": False},
            Path("/srv/claims"),
            "set in folders.processing",
        ),
    ],
)
def test_the_rule(facts: dict, path: Path, why: str):
    assert processing.choose(INBOX, **facts) == processing.Choice(path, why)


def test_an_inbox_at_the_root_has_its_folder_inside():
    assert processing.choose(Path("/")) == processing.Choice(
        Path("/.konfuzio-watch/processing"), "the inbox has no parent folder"
    )


@pytest.mark.slow
def test_the_daemon_names_its_folder_and_why_at_start(start_daemon, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="konfuzio_watch")
    start_daemon()
    sibling = tmp_path / ".inbox.konfuzio-watch"
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("processing folder:")] == [
        f"processing folder: {sibling} (a hidden sibling of the inbox, on the same file system)"
    ]
    assert sibling.is_dir()


@pytest.mark.slow
@pytest.mark.skipif(not can_drop_privileges(), reason="needs root and setpriv to run the daemon as nobody")
def test_check_as_root_and_the_daemon_as_its_user_choose_the_same_folder(emulator):
    """docs/service.md's service layout: /srv/scans belongs to root, the inbox in it to the service's user,
    who may not create entries in /srv/scans. Root's ``check`` used to announce the hidden sibling
    (``/srv/scans/.inbox.konfuzio-watch (will be created)``), and the daemon then silently used a folder
    in the inbox."""
    root = Path(tempfile.mkdtemp(prefix="kw-processing-", dir="/tmp"))  # pytest's tmp is 0700: nobody can't enter
    os.chmod(root, 0o755)
    scans = root / "scans"
    scans.mkdir(mode=0o755)
    folders = {name: scans / name for name in ("inbox", "done", "failed")} | {"state": root / "state"}
    for folder in folders.values():
        folder.mkdir()
        os.chown(folder, NOBODY, NOBODY)
    daemon = DaemonProcess(root, emulator, folders={name: str(path) for name, path in folders.items()})
    inside = folders["inbox"] / ".konfuzio-watch" / "processing"
    try:
        # root's check, for the user the service runs as (without --as: the user konfuzio-watch last ran as,
        # else the system user konfuzio-watch)
        check = subprocess.run(
            [*KONFUZIO_WATCH, "check", "--as", str(NOBODY), "--config", str(daemon.config)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=root,
        )
        assert processing_lines(check.stdout) == [
            f"ok    processing folder: {inside} (nobody may not create entries in {scans}), will be created"
        ]

        daemon.start(prefix=AS_NOBODY)
        assert processing_lines(daemon.log.read_text()) == [
            f"processing folder: {inside} (nobody may not create entries in {scans})"
        ]
        assert inside.is_dir() and not (scans / ".inbox.konfuzio-watch").exists()

        assert daemon.terminate() == 0
    finally:
        daemon.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not can_drop_privileges(), reason="needs root and setpriv to act as nobody")
def test_may_create_as_asks_the_kernel_as_that_user():
    shared = Path(tempfile.mkdtemp(prefix="kw-may-create-", dir="/tmp"))
    try:
        os.chmod(shared, 0o755)
        assert processing.may_create_entries(shared), "root may"
        assert not processing.may_create_as(NOBODY, NOBODY)(shared)
        os.chown(shared, NOBODY, NOBODY)
        assert processing.may_create_as(NOBODY, NOBODY)(shared)
        os.chown(shared, 0, 0)
        os.chmod(shared, 0o775)
        assert processing.may_create_as(NOBODY, NOBODY, [0])(shared), "through a group"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def processing_lines(text: str) -> list[str]:
    """The check's lines on the processing folder, or the log's (without the time and level)."""
    return [
        line if line.startswith(("ok", "FAIL")) else line[line.index("processing folder:") :]
        for line in text.splitlines()
        if "processing folder:" in line
    ]


def test_the_readme_and_the_example_config_state_the_rule_the_code_follows():
    repo = Path(__file__).resolve().parent.parent
    readme = " ".join((repo / "docs" / "service.md").read_text(encoding="utf-8").split())
    example = " ".join((repo / "config.example.yaml").read_text(encoding="utf-8").replace("#", " ").split())
    service_layout = processing.choose(INBOX, may_create_in_parent=False)
    assert f"(`processing folder: {service_layout}`)" in readme
    assert f"(`{processing.sibling_of(INBOX)}` for `{INBOX}`)" in readme
    assert f"processing: {processing.sibling_of(INBOX)}" in example
    order = (
        "an existing `<parent>/.<inbox name>.konfuzio-watch` or `<inbox>/.konfuzio-watch/processing` (in that order)"
    )
    assert order in readme and order.replace("`", "") in example
