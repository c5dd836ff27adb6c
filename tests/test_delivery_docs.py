"""docs/delivery.md's receiver example, run as written against real signed deliveries (issue 25)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from konfuzio_watch.delivery import signature

from .helpers import readme_block

SECRET = b"n0t-so-secret-but-long-enough-for-a-test"


@pytest.fixture
def example_receiver(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """The example in its own process on port 0; its URL once it says which port it got."""
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_bytes(SECRET + b"\n")
    script = tmp_path / "receiver.py"
    script.write_text(readme_block("delivery: receiver", "python"))
    env = {**os.environ, "PORT": "0", "WEBHOOK_SECRET_FILE": str(secret_file)}
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("listening on port "), first
        yield f"http://127.0.0.1:{int(first.split()[-1])}/hooks/konfuzio", proc
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]


def post(url: str, body: bytes, key: str, *, signed_with: bytes = SECRET, path: bytes = b"2026/scan.pdf"):
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": key,
        "X-Konfuzio-Watch-Signature": signature(signed_with, body),
        "X-Konfuzio-Watch-Event": "done",
        "X-Konfuzio-Watch-Path": quote(path, safe="/"),
    }
    return requests.post(url, data=body, headers=headers, timeout=10)


def result(document_id: int, revision: int = 1) -> bytes:
    return json.dumps({"document_id": document_id, "revision": revision, "fields": {"Total": 893.77}}).encode()


@pytest.mark.slow
def test_receiver_example_verifies_signatures_and_keeps_keys(example_receiver) -> None:  # type: ignore[no-untyped-def]
    url, proc = example_receiver
    first, second = result(41), result(42)
    assert post(url, first, "41:1", path=b"2026/M\xe4rz invoice.pdf").status_code == 200
    assert post(url, first, "41:1").status_code == 200  # a repeat: answered, not done again
    forged = post(url, first, "41:2", signed_with=b"someone else's secret")
    assert forged.status_code in (401, 403)
    tampered = requests.post(
        url,
        data=result(41, revision=2),
        headers={"Idempotency-Key": "41:2", "X-Konfuzio-Watch-Signature": signature(SECRET, first)},
        timeout=10,
    )
    assert tampered.status_code in (401, 403)  # a valid signature of another body
    unsigned = requests.post(url, data=first, headers={"Idempotency-Key": "41:3"}, timeout=10)
    assert unsigned.status_code in (401, 403)
    assert post(url, second, "42:1").status_code == 200
    proc.kill()
    proc.wait(10)
    imported = [line for line in proc.stdout.read().splitlines() if line.startswith("imported")]
    # each key's work done once; the forged, tampered and unsigned ones never
    assert imported == ["imported 41 b'2026/M\\xe4rz invoice.pdf'", "imported 42 b'2026/scan.pdf'"]
