"""The floor: what one file costs in CPU with only the work that the required stack and the promise
force, and nothing of the daemon around it. Runs in its own process (its CPU is the figure); the
emulator runs in the bench process. Usage::

    python -m bench.floor --host http://127.0.0.1:PORT --workdir DIR [-n 100] [--concurrency 4] [--segments]
                          [--http raw]

Per file, exactly what the daemon cannot leave out:
- its claim recorded in the journal (one batch for all files, as the daemon claims a burst);
- the token armed in the SQLite journal, durably, before the upload (WAL fdatasync);
- the upload: a streamed multipart POST through the SDK's session (``KonfuzioClient.upload``);
- the callback, received by Waitress with the callback's Flask app, with the daemon's settings;
- the details, annotations and character boxes, GET through the same session;
- where the file goes, recorded durably in the journal (the second WAL fdatasync);
- the result JSON (text, pages, annotations, boxes, the details) encoded with the daemon's encoder,
  written, fsynced, linked into done/; the original linked next to it; done/ fsynced.

Left out, though the daemon does them: watching the folder and the settle time, the rename of each
claimed file into processing/, sniffing and hashing the file, the scheduling loop, the
other journal steps (uploaded, called back, exporting, done), logging, the rich result (category,
fields, names from the project's catalog), the checks that never overwrite someone else's file.
Four upload threads and two result threads, as the daemon has by default.

``--http raw`` sends the same requests (same URLs, token header, multipart body) on one kept-alive
``http.client`` connection per thread instead of the SDK's session: what the floor would be without
requests and urllib3 (no proxies, no retries, no TLS settings: not a client the daemon could ship).

Prints one JSON line: CPU (user, system) per file over the whole run, wall time, WAL fsyncs per
file; with ``--segments``, each worker step's own CPU (thread time) per file, and what the other
threads (Waitress's, the callback's) used.
"""

from __future__ import annotations

import os

os.environ.setdefault("LOG_TO_FILE", "False")  # before anything imports konfuzio_sdk

import argparse  # noqa: E402
import collections  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, BinaryIO  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import orjson  # noqa: E402
from requests_toolbelt import MultipartEncoder  # noqa: E402

from konfuzio_watch.callback import create_app  # noqa: E402
from konfuzio_watch.export import RESULT_SUFFIX  # noqa: E402
from konfuzio_watch.files import move_no_clobber, sidecar_for, write_json_no_clobber  # noqa: E402
from konfuzio_watch.journal import Row, SqliteJournal, State  # noqa: E402
from konfuzio_watch.konfuzio import KonfuzioClient, UploadForm, import_sdk  # noqa: E402
from konfuzio_watch.server import PUBLIC_ENDPOINT_SETTINGS, ServerThread  # noqa: E402
from konfuzio_watch.tokens import hash_token, new_token  # noqa: E402

from .harness import PROJECT_ID, TOKEN, write_documents  # noqa: E402


class RawClient:
    """``KonfuzioClient``'s four calls on bare ``http.client`` (``--http raw``): the SDK's URLs, the token
    header and the same multipart body (no User-Agent, no compression), one kept-alive connection per
    thread, orjson for the answers."""

    def __init__(self, host: str, token: str):
        self.host, self.urls = host, import_sdk()["urls"]
        self.headers = {"Authorization": f"Token {token}", "Accept": "*/*", "Connection": "keep-alive"}
        self.local = threading.local()

    def _request(self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        parts = urlsplit(url)
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection(parts.netloc, timeout=120)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, path, body=body, headers={**self.headers, **(headers or {})})
        response = connection.getresponse()
        data = response.read()
        if response.status >= 400:
            raise RuntimeError(f"{method} {url}: {response.status} {data[:200]!r}")
        return orjson.loads(data)

    def upload(self, file: BinaryIO, file_name: str, form: UploadForm) -> dict[str, Any]:
        body = MultipartEncoder(
            fields={
                "data_file": (file_name, file, "multipart/form-data"),
                "project": str(form.project_id),
                "dataset_status": str(form.dataset_status),
                "sync": "False",
                "callback_url": form.callback_url,
            }
        )
        return self._request(
            "POST",
            self.urls.get_upload_document_url(self.host),
            body,
            {"Content-Type": body.content_type, "Content-Length": str(body.len)},
        )

    def document(self, document_id: int) -> dict[str, Any]:
        return self._request("GET", self.urls.get_document_details_url(document_id=document_id, host=self.host))

    def bbox(self, document_id: int) -> dict[str, Any]:
        return self._request("GET", self.urls.get_document_bbox_url(document_id=document_id, host=self.host))

    def annotations(self, document_id: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        url = self.urls.get_document_annotations_url(document_id=document_id, host=self.host)
        while url:
            page = self._request("GET", url)
            found.extend(page["results"])
            url = page.get("next")
        return found


class Floor:
    def __init__(self, host: str, workdir: Path, concurrency: int, segments: bool, raw_http: bool = False):
        self.inbox, self.done = workdir / "inbox", workdir / "done"
        self.done.mkdir(parents=True, exist_ok=True)
        self.client: KonfuzioClient | RawClient = RawClient(host, TOKEN) if raw_http else KonfuzioClient(host, TOKEN)
        self.journal = SqliteJournal(workdir / "state" / "journal.sqlite3")
        self.uploads = ThreadPoolExecutor(concurrency, thread_name_prefix="upload")
        self.results = ThreadPoolExecutor(2, thread_name_prefix="results")
        # token -> (row, file, document id: None until the upload's answer, -1 if called back before it)
        self.pending: dict[str, tuple[Row, Path, int | None]] = {}
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        self.error: BaseException | None = None  # a step that failed: the run stops at once, with it
        self.expected = 0
        self.segments: collections.Counter[str] = collections.Counter()
        self.timed = segments
        self.server = ServerThread(
            create_app(self.record), "127.0.0.1", 0, name="callback-server", threads=4, **PUBLIC_ENDPOINT_SETTINGS
        ).start()

    def _mark(self, name: str, since: float) -> float:
        now = time.thread_time()
        if self.timed:
            with self.lock:
                self.segments[name] += now - since
        return now

    def _submit(self, pool: ThreadPoolExecutor, step: Callable[..., None], *args: object) -> None:
        def guarded() -> None:
            try:
                step(*args)
            except BaseException as exc:
                self.error = self.error or exc
                self.all_done.set()
                raise

        pool.submit(guarded)

    def wait(self, timeout_s: float, what: str) -> None:
        if not self.all_done.wait(timeout_s):
            raise SystemExit(f"floor: {self.expected} {what} did not finish in {timeout_s:.0f} s")
        if self.error is not None:
            raise SystemExit(f"floor: a step failed: {type(self.error).__name__}: {self.error}")

    def run(self, paths: list[Path]) -> None:
        self.expected = len(paths)
        rows = self.journal.add_claims([p.name.encode() for p in paths], time.time())
        rows = self.journal.transition_many(rows, State.CLAIMED, time.time())  # as the daemon's claims: one batch
        for row, path in zip(rows, paths, strict=True):
            self._submit(self.uploads, self.upload, row, path)

    def upload(self, row: Row, path: Path) -> None:
        t = time.thread_time()
        token = new_token()
        row = self.journal.start_upload(row, hash_token(token), time.time())
        t = self._mark("journal: token armed (durable)", t)
        with self.lock:
            self.pending[token] = (row, path, None)
        form = UploadForm(PROJECT_ID, f"{self.server.url}/konfuzio-callback/{token}")
        with open(path, "rb") as f:
            answer = self.client.upload(f, path.name, form)
        self._mark("upload POST", t)
        with self.lock:  # the callback may have come first
            entry = self.pending.get(token)
            if entry is None or entry[2] == -1:
                self.pending.pop(token, None)
                self._submit(self.results, self.export, row, path, answer["id"])
            else:
                self.pending[token] = (row, path, answer["id"])

    def record(self, token: str, claimed_id: int | None) -> str:
        with self.lock:
            entry = self.pending.get(token)
            if entry is None:
                return "unknown"
            row, path, document_id = entry
            if document_id is None:  # before the upload's answer: the upload thread submits
                self.pending[token] = (row, path, -1)
                return "recorded"
            del self.pending[token]
        self._submit(self.results, self.export, row, path, document_id)
        return "recorded"

    def export(self, row: Row, path: Path, document_id: int) -> None:
        t = time.thread_time()
        details = self.client.document(document_id)
        t = self._mark("GET details", t)
        annotations = self.client.annotations(document_id)
        t = self._mark("GET annotations", t)
        bbox = self.client.bbox(document_id)
        t = self._mark("GET bbox", t)
        target = self.done / path.name
        self.journal.update(row, time.time(), final_path=os.fsencode(target))
        t = self._mark("journal: final path (durable)", t)
        result = {
            "text": details.get("text"),
            "pages": details.get("pages"),
            "annotations": annotations,
            "bbox": bbox.get("bbox"),
            "konfuzio": details,
        }
        # the daemon's own writes: the JSON fsynced before its name, one fsync of done/ for both names
        write_json_no_clobber(
            sidecar_for(target, RESULT_SUFFIX), result, lambda _existing: False, root=self.done, sync_dir=False
        )
        t = self._mark("result JSON: encode, write, fsync", t)
        move_no_clobber(path, target, dst_root=self.done, sync_unlink=False)
        self._mark("file moved, done/ fsynced", t)
        with self.lock:
            self.expected -= 1
            if self.expected == 0:
                self.all_done.set()

    def close(self) -> None:
        self.uploads.shutdown()
        self.results.shutdown()
        self.server.close()
        self.journal.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", required=True, help="the emulator's URL")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--segments", action="store_true", help="each step's thread CPU (costs a little itself)")
    parser.add_argument(
        "--http",
        choices=("sdk", "raw"),
        default="sdk",
        help="the SDK's session (default), or bare http.client: the floor without requests",
    )
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    floor = Floor(args.host.rstrip("/"), workdir, args.concurrency, args.segments, raw_http=args.http == "raw")
    try:
        warm = write_documents(workdir / "inbox", 1, "warm")  # imports, connections, the SDK's first call
        floor.run(warm)
        floor.wait(args.timeout_s, "warm-up file")
        floor.all_done.clear()
        floor.segments.clear()
        paths = write_documents(workdir / "inbox", args.n, "doc")
        syncs, before, t0 = floor.journal.syncs, resource.getrusage(resource.RUSAGE_SELF), time.time()
        floor.run(paths)
        floor.wait(args.timeout_s, f"of {args.n} files")
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.time() - t0
        syncs = floor.journal.syncs - syncs
    finally:
        floor.close()
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    out: dict[str, Any] = {
        "n": args.n,
        "wall_s": wall,
        "cpu_s": user + system,
        "cpu_user_s": user,
        "cpu_system_s": system,
        "cpu_per_file_ms": (user + system) / args.n * 1000,
        "wal_syncs_per_file": syncs / args.n,
    }
    if args.segments:
        steps = {name: s / args.n * 1000 for name, s in floor.segments.most_common()}
        steps["other threads (Waitress, the callback app), and the rest"] = out["cpu_per_file_ms"] - sum(steps.values())
        out["segments_ms"] = steps
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
