"""The daemon on the file server: it watches the share's own folder (``samba.share``, a local disk:
inotify sees what smbd writes there), while scanners write over SMB (tests/smb.py).

A scanner that pauses longer than ``watch.settle_seconds`` with its file open: smbd holds the file
open for writing on the server, in a process of its own. A daemon that runs as root sees that
through /proc (writers.py) and waits for the close; a daemon that runs as the share's service
account may not look into smbd's processes and takes the file in by the settle time alone: the half
file is uploaded, then again when it grew. Either way each file leaves one document in Konfuzio.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from konfuzio_watch.samples import make_pdf, make_png

from .conftest import wait_until
from .helpers import DaemonProcess, assert_own_result, can_drop_privileges, net_uploads_per_sha
from .smb import DAEMON, GROUP, SCANNER, Scanner, SmbMount

pytestmark = pytest.mark.slow

QUICK, SLOW = 27, 3
SETTLE_S = 0.5
PAUSE_S = 0.8  # longer than the settle time; shorter than an upload plus Konfuzio's processing (2 s here)
CHUNKS = 3
AS_SERVICE_ACCOUNT = ["setpriv", f"--reuid={DAEMON[0]}", f"--regid={GROUP}", "--clear-groups"]


def make_jpeg(label: str, width: int = 400, height: int = 300) -> bytes:
    """A real JPEG of noise (some 300 KB, written in chunks), its pixels drawn from ``label``."""
    from PIL import Image

    image = Image.frombytes("RGB", (width, height), random.Random(label).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue()


def write_slowly(path: Path, data: bytes, last_writes: list[float]) -> None:
    """A scanner writing page by page through its own mount, the file open the whole time."""
    step = -(-len(data) // CHUNKS)
    with open(path, "wb") as f:
        for start in range(0, len(data), step):
            if start:
                time.sleep(PAUSE_S)  # the scanner's own pause between pages, not a wait for something
            f.write(data[start : start + step])
            f.flush()
        last_writes.append(time.monotonic())


def put_all(scanner: Scanner, local: Path, files: dict[str, bytes]) -> None:
    """Every file into the inbox in one smbclient session, each under a temporary name, then renamed."""
    local.mkdir(exist_ok=True)
    commands = ["cd inbox"]
    for name, data in files.items():
        (local / name).write_bytes(data)
        commands += [f'put "{local / name}" "{name}.part"', f'rename "{name}.part" "{name}"']
    scanner.run("; ".join(commands))


@pytest.fixture
def server_root() -> Iterator[Path]:
    """The daemon's own folder (config, log, state) where the share's service account may enter it:
    pytest's tmp_path lies below a folder only root may enter."""
    root = Path(tempfile.mkdtemp(prefix="kw-server-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def own_folder(path: Path, account: str) -> None:
    path.mkdir(exist_ok=True)
    if account != "root":
        shutil.chown(path, DAEMON[0], GROUP)


@pytest.mark.parametrize("account", ["root", "service account"])
def test_a_scanner_pausing_past_the_settle_time_leaves_one_document_per_file(samba, emulator, server_root, account):
    """30 files, 3 of them JPEGs written through the scanner's own smbnetfs mount in 3 chunks with
    pauses longer than the settle time; the others put by smbclient (temporary name, rename)."""
    if account != "root" and not can_drop_privileges():
        pytest.skip("needs root and setpriv to run the daemon as the share's service account")
    emulator.knobs.processing_s = 2.0
    scanner = Scanner(samba)
    scanner.mkdir("inbox")  # the scanners' folder: 2770, their group (the daemon's account is in it)
    share = samba.share
    for folder in (share / "done", share / "failed", server_root / "state"):
        own_folder(folder, account)
    daemon = DaemonProcess(
        server_root,
        emulator,
        watch={"settle_seconds": SETTLE_S},
        folders={
            "inbox": str(share / "inbox"),
            "done": str(share / "done"),
            "failed": str(share / "failed"),
            "state": str(server_root / "state"),
        },
    )
    mount = SmbMount(samba, server_root / "scanner-home", server_root / "scanner-mnt", user=SCANNER)
    try:
        daemon.start(prefix=AS_SERVICE_ACCOUNT if account != "root" else None)
        mount.mount()
        slow = {f"slow_{i}.jpg": make_jpeg(f"slow {i}") for i in range(SLOW)}
        quick = {
            f"scan_{i:02d}.{'pdf' if i % 2 else 'png'}": make_pdf(label=f"quick {i}")
            if i % 2
            else make_png(label=f"quick {i}")
            for i in range(QUICK)
        }
        last_writes: list[float] = []
        writers = [
            threading.Thread(target=write_slowly, args=(mount.share / "inbox" / name, data, last_writes))
            for name, data in slow.items()
        ]
        for writer in writers:
            writer.start()
        put_all(scanner, server_root / "scans", quick)
        for writer in writers:
            writer.join(30)
        files = {**quick, **slow}
        results = lambda: len(list((share / "done").glob("*.json")))  # noqa: E731
        wait_until(
            lambda: results() >= len(files),
            20,
            lambda: f"{len(files)} files done (have {results()}; log: {daemon.log.read_text()[-1500:]})",
        )
        after_s = time.monotonic() - max(last_writes)

        for name, data in files.items():
            assert_own_result(share / "done", name, data)
        assert list((share / "failed").iterdir()) == []
        left = net_uploads_per_sha(emulator)
        assert sum(left.values()) == len(files), f"{sum(left.values())} documents in Konfuzio for {len(files)} files"
        assert len(emulator.documents()) == len(files)
        log = daemon.log.read_text()
        uploaded_again = log.count("after it was uploaded; uploading it again")
        deleted = log.count("the result of its bytes before they changed")
        assert deleted == len(emulator.uploads) - len(files) == uploaded_again, log[-3000:]
        if account == "root":
            assert uploaded_again == 0, "smbd's open file was not seen: a half file was uploaded"
            assert log.count("open for writing by smbd") >= 1
        else:
            assert uploaded_again >= 1, "no half file was uploaded: the test shows nothing"
        print(
            f"\nserver side, {account}: {len(files)} files | done once {len(files)} | failed 0 | "
            f"documents {len(emulator.documents())} (uploads {len(emulator.uploads)}, deleted {deleted}) | "
            f"last write to done {after_s:.1f} s"
        )
    finally:
        daemon.cleanup()
        if mount.proc is not None:
            mount.unmount(lazy=True)
