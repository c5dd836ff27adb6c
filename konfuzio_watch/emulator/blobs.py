"""Original files, kept for ``GET /doc/show-original/<id>/`` without holding big ones in memory.

A file up to ``MEMORY_LIMIT`` stays in memory; a bigger one is copied chunk by chunk to a file in
the store's temporary directory while it is read, so a 100 MB upload costs one chunk of memory.
The facts the emulator needs (sha256, pages, markers) are gathered in the same pass.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from konfuzio_watch.emulator.content import FileFacts, Scanner

CHUNK = 1024 * 1024
MEMORY_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Blob:
    """Stored bytes: in memory (``data``) or in a file (``path``)."""

    size: int
    data: bytes | None = None
    path: str | None = None

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        if self.data is not None:
            for start in range(0, len(self.data), size):
                yield self.data[start : start + size]
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            while chunk := f.read(size):
                yield chunk


class BlobStore:
    """Creates its temporary directory on first need; ``close()`` deletes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def put(self, stream: BinaryIO) -> tuple[Blob, FileFacts]:
        """Copy ``stream`` to the end; return where it is kept and what it holds."""
        scanner = Scanner()
        held = bytearray()
        out: BinaryIO | None = None
        path = None
        try:
            while chunk := stream.read(CHUNK):
                scanner.update(chunk)
                if out is None and len(held) + len(chunk) <= MEMORY_LIMIT:
                    held += chunk
                    continue
                if out is None:
                    fd, path = tempfile.mkstemp(dir=self._directory(), suffix=".original")
                    out = os.fdopen(fd, "wb")
                    out.write(held)
                    held = bytearray()
                out.write(chunk)
        except BaseException:
            if out is not None:
                out.close()
                self._remove(path)
            raise
        facts = scanner.facts()
        if out is None:
            return Blob(size=facts.size, data=bytes(held)), facts
        out.close()
        return Blob(size=facts.size, path=path), facts

    def discard(self, blob: Blob | None) -> None:
        if blob is not None and blob.path is not None:
            self._remove(blob.path)

    def close(self) -> None:
        with self._lock:
            if self._dir is not None:
                self._dir.cleanup()
                self._dir = None

    def _directory(self) -> str:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="konfuzio-emulator-")
            return self._dir.name

    @staticmethod
    def _remove(path: str | None) -> None:
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
