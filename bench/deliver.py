"""What delivering costs (issue 25): the burst with ``deliver.webhook`` configured against the same
burst without, run interleaved (``--only deliver``: without, with, without, with, ...).

The receiver is a WSGI app under Waitress in the bench process (its CPU counts as the emulator's,
not the daemon's) that checks each signature, notes each ``Idempotency-Key`` and answers 200 at once.
Figures: the daemon's CPU per file to the last result JSON and (with the webhook) to the last 2xx,
the walls and their ratio, deliveries per key on the receiver's 2xx side, repeats, bad signatures,
bodies not as written in done/, and the latency from the JSON's mtime to its 2xx.
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from konfuzio_watch.delivery import signature
from konfuzio_watch.server import ServerThread

from . import report
from .harness import DaemonConfig, DaemonProcess, realistic_knobs, wait_until
from .scenarios import _burst, _emulator, _requests

SECRET = b"bench-webhook-secret-0123456789abcdef"
MODES = ("none", "webhook")


@dataclass
class _Post:
    key: str
    signed: bool
    path: bytes
    body_sha256: str
    at: float  # time.time() when answered


@dataclass
class Receiver:
    """Answers every POST 200 at once; keeps what each carried."""

    posts: list[_Post] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self, environ: dict, start_response) -> list[bytes]:  # type: ignore[no-untyped-def]
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        post = _Post(
            key=environ.get("HTTP_IDEMPOTENCY_KEY", ""),
            signed=environ.get("HTTP_X_KONFUZIO_WATCH_SIGNATURE") == signature(SECRET, body),
            path=unquote_to_bytes(environ.get("HTTP_X_KONFUZIO_WATCH_PATH", "")),
            body_sha256=hashlib.sha256(body).hexdigest(),
            at=time.time(),
        )
        with self.lock:
            self.posts.append(post)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    def keys(self) -> int:
        with self.lock:
            return len({p.key for p in self.posts})


def deliver_run(root: Path, *, n: int, mode: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """The burst of ``n`` files, with a webhook (``mode="webhook"``) or without (``"none"``)."""
    knobs = realistic_knobs()
    workdir = root / f"deliver-{mode}"
    workdir.mkdir(parents=True, exist_ok=True)
    receiver = Receiver()
    server = ServerThread(receiver.app, "127.0.0.1", 0, name="bench-receiver", threads=4) if mode == "webhook" else None
    extra: dict[str, dict[str, Any]] = {}
    if server is not None:
        secret_file = workdir / "webhook-secret"
        secret_file.write_bytes(SECRET)
        secret_file.chmod(0o600)
        extra["deliver"] = {
            "webhook": {"url": f"{server.url}/hooks/konfuzio", "secret_file": str(secret_file), "timeout_seconds": 10},
            "events": ["done"],
        }
        server.start()
    out: dict[str, Any] = {"n": n, "settle_s": 2.0, "concurrency": 4, "mode": mode}
    emu = _emulator(knobs)
    try:
        config = DaemonConfig(workdir, emu.url, settle_s=2.0, concurrency=4, extra=extra)
        daemon = DaemonProcess(config, name=f"deliver-{mode}").start()
        try:
            out["ready_s"] = daemon.wait_ready()
            emu.reset_request_stats()
            cpu_before = sum(daemon.cpu_times())
            out["burst"] = _burst(daemon, emu, n, timeout_s)
            out["requests"] = _requests(emu)
            if server is not None:

                def delivered() -> bool:
                    daemon.check_alive()
                    return receiver.keys() >= n

                wait_until(delivered, timeout_s, f"{n} deliveries answered 2xx", interval_s=0.05)
                cpu_s = sum(daemon.cpu_times()) - cpu_before
                out["delivered"] = _deliveries(receiver, config.done, out["burst"]["t0"], n)
                out["delivered"]["cpu_per_file_ms"] = cpu_s / n * 1000
            out["memory_kib"] = daemon.memory_kib()
        finally:
            out["stop"] = daemon.stop()
    finally:
        emu.stop()
        if server is not None:
            server.close()
    return out


def _deliveries(receiver: Receiver, done: Path, t0: float, n: int) -> dict[str, Any]:
    with receiver.lock:
        posts = list(receiver.posts)
    per_key = Counter(p.key for p in posts)
    latencies, mismatched = [], 0
    for p in posts:
        json_path = done / (p.path.decode("utf-8", "surrogateescape") + ".json")
        try:
            data, mtime = json_path.read_bytes(), json_path.stat().st_mtime
        except OSError:
            mismatched += 1
            continue
        mismatched += hashlib.sha256(data).hexdigest() != p.body_sha256
        latencies.append(p.at - mtime)
    return {
        "posts": len(posts),
        "keys": len(per_key),
        "max_per_key": max(per_key.values(), default=0),
        "repeats": len(posts) - len(per_key),
        "bad_signatures": sum(not p.signed for p in posts),
        "bodies_not_as_written": mismatched,
        "last_2xx_s": max(p.at for p in posts) - t0,
        "latency_median_s": statistics.median(latencies) if latencies else None,
        "latency_max_s": max(latencies, default=None),
        "expected": n,
    }


def summary(figures: dict[str, Any]) -> list[str]:
    """The table printed under the others (``python -m bench --only deliver``)."""
    after = figures.get("after") or {}
    without, webhook = after.get("deliver_none") or [], after.get("deliver_webhook") or []
    if not without and not webhook:
        return []
    n = (without or webhook)[0]["n"]

    def burst(runs: list[dict[str, Any]], key: str) -> list[float | None]:
        return [r["burst"][key] for r in runs]

    def sent(key: str) -> list[float | None]:
        return [r["delivered"][key] for r in webhook if "delivered" in r]

    pairs = list(zip(without, webhook, strict=False))
    wall_ratio = [w["burst"]["wall_s"] / o["burst"]["wall_s"] for o, w in pairs if o["burst"]["wall_s"]]
    last_ratio = [w["delivered"]["last_2xx_s"] / o["burst"]["wall_s"] for o, w in pairs if "delivered" in w]
    cpu_ratio = [w["burst"]["cpu_per_file_ms"] / o["burst"]["cpu_per_file_ms"] for o, w in pairs]
    fmt = report.fmt_range
    rows = [
        ("wall: drop -> last result JSON", fmt(burst(without, "wall_s"), " s", 2),
         fmt(burst(webhook, "wall_s"), " s", 2)),
        ("wall: drop -> last delivery's 2xx", "—", fmt(sent("last_2xx_s"), " s", 2)),
        ("wall ratio with / without (same run)", "",
         f"{fmt(wall_ratio, ' x', 2)} (to the last 2xx: {fmt(last_ratio, ' x', 2)})"),
        ("daemon CPU per file, to the last JSON", fmt(burst(without, "cpu_per_file_ms"), " ms", 1),
         f"{fmt(burst(webhook, 'cpu_per_file_ms'), ' ms', 1)} ({fmt(cpu_ratio, ' x', 2)})"),
        ("daemon CPU per file, to the last 2xx", "—", fmt(sent("cpu_per_file_ms"), " ms", 1)),
        ("deliveries answered 2xx / keys / most per key", "—",
         f"{fmt(sent('posts'), '', 0)} / {fmt(sent('keys'), '', 0)} / {fmt(sent('max_per_key'), '', 0)}"),
        ("repeats, bad signatures, bodies not as in done/", "—",
         f"{fmt(sent('repeats'), '', 0)}, {fmt(sent('bad_signatures'), '', 0)}, "
         f"{fmt(sent('bodies_not_as_written'), '', 0)}"),
        ("delivery latency (JSON written -> 2xx), median / max", "—",
         f"{fmt(sent('latency_median_s'), ' s', 3)} / {fmt(sent('latency_max_s'), ' s', 3)}"),
    ]  # fmt: skip
    header = (
        "delivery: the burst",
        f"without deliver ({len(without)} run(s))",
        f"with a webhook ({len(webhook)} run(s))",
    )
    return [
        f"\nDelivery ({n} files, settle 2 s, concurrency 4; the two interleaved, run by run):",
        report.markdown_table(header, rows),
        "Method (delivery): the burst above, once with deliver.webhook (events [done], timeout 10 s) and once without, "
        "alternating; the receiver is Waitress in the bench process answering 200 at once after checking the "
        "signature. CPU = the daemon's utime+stime from just before the drop to the last result JSON, and (webhook) "
        "to the last 2xx; latency = the 2xx's time - the result JSON's mtime; a repeat = a 2xx for a key seen before.",
    ]
