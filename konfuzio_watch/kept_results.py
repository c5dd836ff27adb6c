"""Results fetched while done/ could not be written, kept in the state folder until they are placed.

When the share done/ is on does not answer (``shares.py``), a file's result has been fetched already:
it is kept as ``<state>/kept-results/<row id>.json`` (written through a temporary file, fsynced, on
the local disk), and the export that goes on once the share answers again places it without asking
Konfuzio (a searchable PDF, which is downloaded into done/ itself, is downloaded then). The normal
path costs nothing: a result is kept only after a share's error, and looked for with one ``open``
that fails.

A kept result names its row, its document and the uploaded bytes' sha256: one that is not this
row's (a journal that was replaced) is never used. It goes once the file is placed, or when the
file's bytes changed (uploaded again); ``sweep`` removes those of rows no longer exporting. In a
cluster the state folder is one node's: a node that takes the row over fetches the result again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .files import encode_json, write_file_no_clobber
from .journal import Row

log = logging.getLogger("konfuzio_watch")

FOLDER_NAME = "kept-results"


class KeptResults:
    def __init__(self, state_dir: Path):
        self.folder = state_dir / FOLDER_NAME

    def _path(self, row_id: int) -> Path:
        return self.folder / f"{row_id}.json"

    def keep(self, row: Row, result: dict[str, Any], checked_at: float | None) -> None:
        """Keep the result built for ``row`` (``checked_at``: when its details were fetched), durably."""
        body = encode_json(
            {
                "row_id": row.id,
                "document_id": row.document_id,
                "sha256": row.sha256,
                "checked_at": checked_at,
                "result": result,
            }
        )
        with contextlib.suppress(FileExistsError):
            self.folder.mkdir(mode=0o700)  # in the state folder, on the local disk
        write_file_no_clobber(
            self._path(row.id), lambda out: out.write(body), root=self.folder, may_replace=lambda _folder: True
        )

    def keep_if_possible(self, row: Row, result: dict[str, Any], checked_at: float | None) -> None:
        """``keep``, or say why not: the export then fetches the result again once the shares answer."""
        try:
            self.keep(row, result, checked_at)
        except OSError as exc:  # the state folder's disk
            log.warning(
                "%s: cannot keep its result in %s (%s); it is fetched again once the shares answer",
                row.display_path,
                self.folder,
                exc.strerror or exc,
            )

    def take(self, row: Row) -> tuple[dict[str, Any], float | None] | None:
        """The result kept for ``row`` and when its details were fetched, or None."""
        try:
            with open(self._path(row.id), "rb") as f:
                kept = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot read its kept result (%s); fetching it again", row.display_path, exc)
            return None
        if (
            not isinstance(kept, dict)
            or not isinstance(kept.get("result"), dict)
            or (kept.get("row_id"), kept.get("document_id"), kept.get("sha256"))
            != (row.id, row.document_id, row.sha256)
        ):
            return None  # another row's (a journal replaced meanwhile): fetched again, and replaced when kept
        checked_at = kept.get("checked_at")
        return kept["result"], checked_at if isinstance(checked_at, int | float) else None

    def drop(self, row_id: int) -> None:
        """Not fsynced: one that comes back after a power failure belongs to a finished row (``sweep``)."""
        try:
            os.unlink(self._path(row_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self._path(row_id), exc.strerror or exc)

    def sweep(self, exporting: Iterable[int]) -> None:
        """Remove the results kept for rows that are not exporting any more (start-up)."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        keep = {f"{row_id}.json" for row_id in exporting}
        for name in names:
            if name.endswith(".json") and name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.folder / name)
