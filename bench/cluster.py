"""python -m bench.cluster [--runs N] [--files N] [--nodes 1,2,3] [--leases 3,20] [--pg-url URL] [--json PATH]
                         [--show PATH]

The clustered mode: 1, 2 and 3 nodes (daemon processes, upload.concurrency 4 each) on one inbox and
one PostgreSQL journal take the same burst of files (1,000 by default) from a server with realistic
delays (0.25 s per upload, 2-3 s processing); then the failover time: a node is SIGKILLed with uploads
in flight, and the time from its last heartbeat to the moment another node has taken over its files
(by the database's clock) is measured for each node.lease_seconds given.

Each node's callbacks come to its own callback server (as behind one load balancer with sticky
routing). Without --pg-url a throwaway PostgreSQL server is started from the machine's binaries
(tests/pg.py; apt-get install postgresql). Runs >= 2 are shown as ranges (min-max).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("LOG_TO_FILE", "False")  # before anything imports konfuzio_sdk

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402

from konfuzio_watch.emulator import Emulator  # noqa: E402

from .harness import (  # noqa: E402
    PROJECT_ID,
    TOKEN,
    DaemonConfig,
    DaemonProcess,
    realistic_knobs,
    wait_until,
    write_documents,
)
from .report import _fmt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _emulator() -> Emulator:
    return Emulator(token=TOKEN, project_ids=(PROJECT_ID,), knobs=realistic_knobs(), seed=1, callback_workers=8).start(
        threads=48
    )


def _nodes(root: Path, emu: Emulator, url: str, count: int, lease_s: float) -> list[DaemonProcess]:
    shared = {"inbox": str(root / "inbox"), "done": str(root / "done"), "failed": str(root / "failed")}
    nodes = []
    for i in range(count):
        name = "abc"[i] if count <= 3 else f"n{i}"
        workdir = root / f"node-{name}"
        extra = {
            "folders": {**shared, "state": str(workdir / "state")},
            "journal": {"url": url},
            "node": {"id": name, "lease_seconds": lease_s},
        }
        nodes.append(DaemonProcess(DaemonConfig(workdir, emu.url, settle_s=2.0, concurrency=4, extra=extra), name=name))
    return nodes


def _done(root: Path) -> int:
    with os.scandir(root / "done") as entries:
        return sum(1 for e in entries if e.name.endswith(".json"))


def burst(root: Path, url: str, nodes: int, files: int) -> dict[str, Any]:
    """``files`` files moved into the inbox at once; wall time until the last result is in done/."""
    emu = _emulator()
    try:
        daemons = _nodes(root, emu, url, nodes, lease_s=20.0)
        for d in daemons:
            d.start()
        for d in daemons:
            d.wait_ready()
        staged = write_documents(root / "staging", files, "burst")
        cpu_before = [d.cpu_s() for d in daemons]
        started = time.time()
        for path in staged:
            os.rename(path, root / "inbox" / path.name)
        wait_until(
            lambda: _done(root) >= files or any(d.check_alive() for d in daemons),
            60 + files,
            f"{files} results in done/",
        )
        wall = time.time() - started
        cpu = [d.cpu_s() - before for d, before in zip(daemons, cpu_before, strict=True)]
        uploads = emu.uploads
        for d in daemons:
            d.stop()
        arrived = [u.arrived_at or u.received_at for u in uploads]
        per_node = {d.name: (d.log_path.read_text(errors="replace").count(": claimed -> uploading")) for d in daemons}
        return {
            "nodes": nodes,
            "files": files,
            "wall_s": wall,
            "uploads": len(uploads),
            "uploads_per_s": len(uploads) / max(1e-9, max(u.received_at for u in uploads) - min(arrived)),
            "cpu_s": cpu,
            "cpu_ms_per_file": [1000 * c / files for c in cpu],
            "uploads_by_node": per_node,
        }
    finally:
        emu.stop()


def failover(root: Path, url: str, lease_s: float, files: int = 200) -> dict[str, Any]:
    """Two nodes; a is SIGKILLed with uploads in flight. From a's last heartbeat to the moment no row is
    leased to a any more (b took them over and resumed them), by the database's clock."""
    emu = _emulator()
    try:
        a, b = _nodes(root, emu, url, 2, lease_s)
        for d in (a, b):
            d.start()
        for d in (a, b):
            d.wait_ready()
        staged = write_documents(root / "staging", files, "failover")
        for path in staged:
            os.rename(path, root / "inbox" / path.name)
        with psycopg.connect(url, autocommit=True) as db:

            def held_by_a() -> int:
                return db.execute("SELECT COUNT(*) FROM files WHERE lease_node = 'a'").fetchone()[0]

            wait_until(lambda: len(emu.uploads) >= files // 4 and held_by_a() > 0, 120, "uploads under way on a")
            a.kill()
            held = held_by_a()
            last_heartbeat = db.execute("SELECT heartbeat_at FROM nodes WHERE id = 'a'").fetchone()[0]
            wait_until(lambda: held_by_a() == 0, 3 * lease_s + 30, "a's files taken over")
            taken_at = db.execute("SELECT now()").fetchone()[0]
        wait_until(lambda: _done(root) >= files, 120, f"{files} results in done/")
        b.stop()
        return {
            "lease_s": lease_s,
            "files_held": held,
            "failover_s": (taken_at - last_heartbeat).total_seconds(),
            "uploads": len(emu.uploads),
            "distinct": len({u.sha256 for u in emu.uploads}),
        }
    finally:
        emu.stop()


def _database(server: Any, base_url: str | None, tag: str) -> tuple[str, Any]:
    """A new database for one run, and how to drop it."""
    if server is not None:
        name = server.create_database()
        return server.url(name), lambda: server.drop_database(name)
    name = f"kw_bench_{os.getpid()}_{tag}"
    with psycopg.connect(base_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    prefix, _, _ = base_url.rpartition("/")  # type: ignore[union-attr]

    def drop() -> None:
        with psycopg.connect(base_url, autocommit=True) as db:  # type: ignore[arg-type]
            db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]

    return f"{prefix}/{name}", drop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[1])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--leases", default="3,20", help="node.lease_seconds values for the failover runs")
    parser.add_argument("--pg-url", help="a PostgreSQL database whose user may create databases")
    parser.add_argument("--json", type=Path, help="save the figures there")
    parser.add_argument("--show", type=Path, help="print the table of figures saved with --json, and stop")
    args = parser.parse_args(argv)
    if args.show:
        show(args.show)
        return 0
    server = None
    if args.pg_url is None:
        sys.path.insert(0, str(REPO))
        from tests.pg import PgCluster

        server = PgCluster.start_new()
    work = Path(tempfile.mkdtemp(prefix="kw-bench-cluster-"))
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for run in range(args.runs):
            for count in (int(n) for n in args.nodes.split(",")):
                url, drop = _database(server, args.pg_url, f"{run}_{count}")
                root = work / f"burst-{count}-{run}"
                try:
                    found = burst(root, url, count, args.files)
                finally:
                    drop()
                    shutil.rmtree(root, ignore_errors=True)
                results.setdefault(f"burst{count}", []).append(found)
                print(
                    f"run {run + 1}: {count} node(s): {found['wall_s']:.1f} s, {found['uploads_per_s']:.1f} "
                    f"uploads/s, CPU ms per file per node {[round(c, 1) for c in found['cpu_ms_per_file']]}, "
                    f"uploads by node {found['uploads_by_node']}",
                    flush=True,
                )
            for lease in (float(x) for x in args.leases.split(",")):
                url, drop = _database(server, args.pg_url, f"{run}_f{int(lease)}")
                root = work / f"failover-{lease:g}-{run}"
                try:
                    found = failover(root, url, lease)
                finally:
                    drop()
                    shutil.rmtree(root, ignore_errors=True)
                results.setdefault(f"failover{lease:g}", []).append(found)
                print(
                    f"run {run + 1}: failover with node.lease_seconds {lease:g}: {found['failover_s']:.1f} s "
                    f"({found['files_held']} file(s) in hand; {found['uploads']} uploads of {found['distinct']} "
                    "files)",
                    flush=True,
                )
    finally:
        if server is not None:
            server.destroy()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results, args.files))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def table(results: dict[str, list[dict[str, Any]]], files: int) -> str:
    """Wall time, upload rate, and CPU per file: each node's CPU over the whole burst's files, and all
    the nodes' together (the cluster's cost of a file)."""
    lines = [f"{'':<34}{'wall':>14}{'uploads/s':>12}{'CPU ms/file, each node':>24}{'all nodes':>14}"]
    for key in sorted(k for k in results if k.startswith("burst")):
        runs = results[key]
        each = [c for r in runs for c in r["cpu_ms_per_file"]]
        total = [sum(r["cpu_ms_per_file"]) for r in runs]
        label = f"{files:,} files, {runs[0]['nodes']} node(s)"
        lines.append(
            f"{label:<34}{_fmt([r['wall_s'] for r in runs], ' s', 1):>14}"
            f"{_fmt([r['uploads_per_s'] for r in runs], '', 1):>12}{_fmt(each, ' ms', 1):>24}"
            f"{_fmt(total, ' ms', 1):>14}"
        )
    for key in sorted((k for k in results if k.startswith("failover")), key=lambda k: float(k[8:])):
        runs = results[key]
        label = f"failover, node.lease_seconds {runs[0]['lease_s']:g}"
        lines.append(
            f"{label:<34}{_fmt([r['failover_s'] for r in runs], ' s', 1):>14}"
            "   (a SIGKILLed node's last heartbeat -> its files taken over)"
        )
    return "\n".join(lines)


def show(path: Path) -> None:
    """The table of a run saved with --json."""
    results = json.loads(path.read_text())
    files = next(r["files"] for k, runs in results.items() if k.startswith("burst") for r in runs)
    print(table(results, files))


if __name__ == "__main__":
    sys.exit(main())
