"""A cluster end to end: several daemon processes on one inbox and one PostgreSQL journal.

The emulator and a callback balancer (helpers.CallbackBalancer: one public callback URL in front of
the nodes, as a load balancer) run in the test process and outlive every node. A trigger on the
journal (helpers.MOVE_AUDIT) records each state move with the node that wrote it and the row's lease
holder at that time: a move by a node that did not hold the lease would be two nodes on one file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest

from konfuzio_watch.server import ServerThread

from .conftest import drop, wait_until
from .helpers import (
    KONFUZIO_WATCH,
    CallbackBalancer,
    DaemonProcess,
    cluster_node,
    illegal_move_chains,
    install_move_audit,
    is_daemons_own,
    moves_not_under_own_lease,
    pg_rows,
    sample_files,
    waiting_in,
)

pytestmark = pytest.mark.slow  # every test starts daemon processes on one PostgreSQL server


@dataclass
class Cluster:
    shared: Path
    emulator: Any
    pg_url: str
    balancer: CallbackBalancer
    balancer_url: str
    nodes: dict[str, DaemonProcess] = field(default_factory=dict)

    def node(self, node_id: str, **overrides: dict) -> DaemonProcess:
        sections: dict[str, dict] = {"callback": {"public_url": self.balancer_url}}
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        node = cluster_node(self.shared, node_id, self.emulator, self.pg_url, **sections)
        self.nodes[node_id] = node
        return node

    def start(self, node: DaemonProcess) -> None:
        # Behind the balancer from the start: its start-up probe of the callback route comes through it.
        self.balancer.backends = sorted({*self.balancer.backends, f"http://127.0.0.1:{node.port}"})
        node.start()

    @property
    def inbox(self) -> Path:
        return self.shared / "inbox"

    def finished(self) -> int:
        return sum(1 for p in (self.shared / "done").rglob("*.json")) + sum(
            1 for p in (self.shared / "failed").rglob("*") if p.is_file() and not p.name.endswith(".json")
        )

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        return pg_rows(self.pg_url, sql, params)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{n.log.read_text()[-3000:]}" for name, n in self.nodes.items() if n.log.exists()
        )


@pytest.fixture
def cluster(tmp_path: Path, emulator: Any, pg_url: str) -> Iterator[Cluster]:
    install_move_audit(pg_url)
    balancer = CallbackBalancer()
    server = ServerThread(balancer.app, "127.0.0.1", 0, name="balancer", threads=8).start()
    made = Cluster(tmp_path, emulator, pg_url, balancer, server.url)
    (tmp_path / "inbox").mkdir()
    yield made
    for node in made.nodes.values():
        node.cleanup()
    server.close()


def assert_every_file_once(cluster: Cluster, files: dict[str, bytes], shared: bool = True) -> None:
    """Each file once in done/ with its own result; nothing left in the inbox or in processing; each
    file's content uploaded once; every state move made by the row's lease holder; no active rows."""
    done = cluster.shared / "done"
    for rel, data in files.items():
        assert (done / rel).read_bytes() == data, f"{rel} missing or changed in done/"
        result = json.loads((done / (rel + ".json")).read_text())
        assert hashlib.sha256(data).hexdigest() in result["text"], f"{rel} got another file's result"
    assert len(list(done.rglob("*.json"))) == len(files), "an extra result in done/"
    assert not [p for p in (cluster.shared / "failed").rglob("*") if p.is_file()], "a file failed"
    left = [p for p in cluster.inbox.rglob("*") if p.is_file() and not is_daemons_own(p)]
    assert left == [], f"left in the inbox: {left[:10]}"
    processing = cluster.shared / ".inbox.konfuzio-watch"
    assert not waiting_in(processing), "left in the processing folder"
    per_sha = collections.Counter(u.sha256 for u in cluster.emulator.uploads)
    twice = {sha: n for sha, n in per_sha.items() if n > 1}
    assert not twice, f"{len(twice)} file(s) uploaded more than once"
    assert len(per_sha) == len(files)
    assert cluster.rows("SELECT state, COUNT(*) FROM files GROUP BY state") == [("done", len(files))]
    assert cluster.rows("SELECT COUNT(*) FROM files WHERE lease_node IS NOT NULL") == [(0,)], "a lease left behind"
    assert moves_not_under_own_lease(cluster.pg_url) == [], "a node moved a row it did not hold"
    assert illegal_move_chains(cluster.pg_url) == []
    writers = cluster.rows("SELECT COUNT(DISTINCT writer) FROM test_moves")[0][0]
    assert writers >= 2 or not shared, "the work was not shared between the nodes"


def test_three_nodes_share_a_burst_and_each_file_is_handled_once(cluster: Cluster):
    nodes = [cluster.node(n) for n in ("a", "b", "c")]
    for node in nodes:
        cluster.start(node)
    files = sample_files(30, "burst")
    for rel, data in files.items():
        drop(cluster.inbox / rel, data)
    wait_until(
        lambda: cluster.finished() >= len(files),
        60,
        lambda: f"all {len(files)} finished (have {cluster.finished()})\n{cluster.logs()}",
    )
    for node in nodes:
        assert node.terminate() == 0
    assert_every_file_once(cluster, files)


def seeded(request: pytest.FixtureRequest) -> random.Random:
    """A random generator whose seed the output shows (KW_CLUSTER_SEED repeats a run)."""
    seed = int(os.environ.get("KW_CLUSTER_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\n{request.node.name}: seed {seed} (KW_CLUSTER_SEED={seed} repeats it)")
    request.node.user_properties.append(("seed", seed))
    return random.Random(seed)


def test_failover_sigkill_and_restarts_leave_every_file_done_once(cluster: Cluster, request: pytest.FixtureRequest):
    """300 files; node a is killed with SIGKILL at random moments (restarted at once each time), node b
    stops with SIGTERM and comes back, node c runs throughout."""
    rng = seeded(request)
    emu = cluster.emulator
    emu.knobs.upload_latency_s = 0.02
    emu.knobs.processing_s = 0.3
    emu.knobs.processing_jitter_s = 0.5
    emu.knobs.callback_duplicate = 0.1
    # A reconcile window longer than any upload takes: an upload cut off by a kill is found, never repeated.
    nodes = {n: cluster.node(n, upload={"reconcile_window_seconds": 3}) for n in ("a", "b", "c")}
    for node in nodes.values():
        cluster.start(node)
    files = sample_files(300, "failover")
    names = list(files)
    uploads = lambda: len(emu.uploads)  # noqa: E731
    dropped = 0

    def drop_upto(n: int) -> None:
        nonlocal dropped
        for rel in names[dropped:n]:
            drop(cluster.inbox / rel, files[rel])
        dropped = max(dropped, n)

    # The files come in four waves, each once the cluster has uploaded most of the one before; the
    # faults happen at random numbers of uploads, in the middle of the waves.
    events: list[tuple[int, str]] = [(t, "kill a") for t in sorted(rng.sample(range(5, 285), 5))]
    events += [(rng.randrange(40, 200), "stop b")]
    events += [(0, "wave 75"), (60, "wave 150"), (135, "wave 225"), (210, "wave 300")]
    events.sort(key=lambda e: (e[0], not e[1].startswith("wave")))
    b_back_at: int | None = None
    for at, what in events:
        if b_back_at is not None and at >= b_back_at:
            wait_until(lambda t=b_back_at: uploads() >= t, 60, f"{b_back_at} uploads while b is stopped")
            cluster.start(nodes["b"])
            b_back_at = None
        wait_until(
            lambda t=at: uploads() >= t,
            60,
            lambda t=at, w=what: f"{t} uploads before '{w}' (have {uploads()})\n{cluster.logs()}",
        )
        if what.startswith("wave"):
            drop_upto(int(what.split()[1]))
        elif what == "kill a":
            nodes["a"].kill9()
            cluster.start(nodes["a"])
        else:
            assert nodes["b"].terminate() == 0
            b_back_at = min(dropped, uploads() + rng.randrange(5, 30))
    if b_back_at is not None:
        wait_until(lambda: uploads() >= b_back_at, 60, "uploads while b is stopped")
        cluster.start(nodes["b"])
    wait_until(
        lambda: cluster.finished() >= len(files),
        90,
        lambda: f"all {len(files)} finished (have {cluster.finished()})\n{cluster.logs()}",
    )
    for node in nodes.values():
        assert node.terminate() == 0
    assert_every_file_once(cluster, files)
    log_a = nodes["a"].log.read_text()
    assert log_a.count("joins the cluster") == 6, "node a did not come back after every kill"
    taken_over = sum(n.log.read_text().count("took over") for n in nodes.values())
    assert taken_over >= 1, "no node ever took over a killed node's files"


def test_a_database_outage_pauses_every_node_and_nothing_doubles_after_it(cluster: Cluster, pg_cluster: Any):
    """The database stops for about 20 s while files are on their way (uploads, processing, callbacks):
    each node says once that it pauses, takes no work, and goes on once the database is back; the leases
    that expired meanwhile are continued or taken over; every file ends once."""
    emu = cluster.emulator
    emu.knobs.upload_latency_s = 0.05
    emu.knobs.processing_s = 1.0
    nodes = {n: cluster.node(n, upload={"reconcile_window_seconds": 3}) for n in ("a", "b")}
    for node in nodes.values():
        cluster.start(node)
    files = sample_files(60, "outage")
    first, later = dict(list(files.items())[:40]), dict(list(files.items())[40:])
    for rel, data in first.items():
        drop(cluster.inbox / rel, data)
    wait_until(lambda: len(emu.uploads) >= 12, 60, "uploads under way")
    pg_cluster.stop()
    try:
        stopped_at, stopped_wall = time.monotonic(), time.time()
        for rel, data in later.items():  # arrive while the journal cannot be written: claimed afterwards
            drop(cluster.inbox / rel, data)
        paused = "the journal cannot be written"
        wait_until(
            lambda: all(paused in n.log.read_text() for n in nodes.values()),
            30,
            lambda: f"both nodes pause\n{cluster.logs()}",
        )
        refused = lambda: [c for c in emu.callbacks if c.sent_at > stopped_wall and c.status_code != 200]  # noqa: E731
        wait_until(refused, 30, "a callback refused while the journal is down (the sender tries again later)")
        # The outage outlasts several leases (3 s): every lease expires while the database is away.
        wait_until(lambda: time.monotonic() - stopped_at >= 20, 30, "the outage")
        late = [u for u in emu.uploads if (u.arrived_at or u.received_at) > stopped_wall + 1]
        assert late == [], "a node uploaded while the journal could not be written"
    finally:
        pg_cluster.start()
    wait_until(
        lambda: cluster.finished() >= len(files),
        90,
        lambda: f"all {len(files)} finished (have {cluster.finished()})\n{cluster.logs()}",
    )
    resumed = "the journal is writable again"
    wait_until(lambda: all(resumed in n.log.read_text() for n in nodes.values()), 30, "both nodes say they resumed")
    for node in nodes.values():
        assert node.terminate() == 0
    assert_every_file_once(cluster, files)
    for name, node in nodes.items():
        log = node.log.read_text()
        assert log.count(paused) == 1, f"node {name} did not say once that it pauses"
        said = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
        assert len(said) <= 6, f"node {name} said too much about one outage:\n" + "\n".join(said)


def test_cut_database_connections_of_one_node_cost_it_nothing_but_time(cluster: Cluster):
    """The database ends every connection of node a (as a network cut or a failover of the database
    would) three times while files are on their way: a reconnects; nothing doubles."""
    emu = cluster.emulator
    emu.knobs.upload_latency_s = 0.05
    emu.knobs.processing_s = 0.5
    nodes = {n: cluster.node(n) for n in ("a", "b")}
    for node in nodes.values():
        cluster.start(node)
    files = sample_files(60, "cut")
    for rel, data in files.items():
        drop(cluster.inbox / rel, data)
    of_a = " FROM pg_stat_activity WHERE application_name = 'konfuzio-watch a'"
    for at in (5, 20, 40):
        wait_until(lambda t=at: len(emu.uploads) >= t, 60, f"{at} uploads")
        # (node b alone may make the next uploads while a is still reconnecting after the last cut)
        wait_until(lambda: cluster.rows("SELECT pid" + of_a), 30, "node a connected again")
        cut = cluster.rows("SELECT pg_terminate_backend(pid)" + of_a)
        assert cut and all(ok for (ok,) in cut)
    wait_until(
        lambda: cluster.finished() >= len(files),
        90,
        lambda: f"all {len(files)} finished (have {cluster.finished()})\n{cluster.logs()}",
    )
    for node in nodes.values():
        assert node.terminate() == 0
    assert_every_file_once(cluster, files)
    assert "journal listener: listening again" in nodes["a"].log.read_text()


def konfuzio_watch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*KONFUZIO_WATCH, *args], capture_output=True, text=True, timeout=60, env={**os.environ, "LOG_TO_FILE": "False"}
    )


class ToTheOtherNode(CallbackBalancer):
    """A balancer that sends each callback to a node other than the one that uploaded the file (the
    writer of its move to ``uploading``, as the audit trigger recorded it)."""

    def __init__(self, pg_url: str, ports: dict[str, int]):
        super().__init__()
        self.pg_url, self.ports = pg_url, ports
        self.routed: list[tuple[str, str]] = []  # (uploader, receiver)

    def app(self, environ: dict, start_response: Callable) -> list[bytes]:
        from konfuzio_watch.tokens import hash_token

        token = environ.get("PATH_INFO", "").rstrip("/").rsplit("/", 1)[-1]
        found = pg_rows(
            self.pg_url,
            "SELECT m.writer FROM test_moves m JOIN files f ON f.id = m.row_id"
            " WHERE f.token_hash = %s AND m.new_state = 'uploading'",
            (hash_token(token),),
        )
        uploader = found[0][0].removeprefix("konfuzio-watch ") if found else ""
        others = [n for n in sorted(self.ports) if n != uploader]
        self.backends = [f"http://127.0.0.1:{self.ports[n]}" for n in others]
        self._next = 0
        if found:
            self.routed.append((uploader, others[0]))
        return super().app(environ, start_response)


def test_a_callback_that_reaches_another_node_finishes_the_file_at_once(tmp_path: Path, emulator: Any, pg_url: str):
    """Polling is a minute away: only the callbacks, recorded by the node that did not upload the file,
    make the files finish within seconds; the uploader hears of them (LISTEN/NOTIFY) and goes on too."""
    install_move_audit(pg_url)
    emulator.knobs.processing_s = 1.0
    emulator.knobs.processing_jitter_s = 1.0
    shared = tmp_path
    (shared / "inbox").mkdir()
    balancer = ToTheOtherNode(pg_url, {})
    server = ServerThread(balancer.app, "127.0.0.1", 0, name="balancer", threads=8).start()
    slow_polls = {"results": {"callback_timeout": 60, "poll_interval": 60}, "callback": {"public_url": server.url}}
    nodes = {n: cluster_node(shared, n, emulator, pg_url, **slow_polls) for n in ("a", "b")}
    balancer.ports.update({n: node.port for n, node in nodes.items()})
    cluster = Cluster(shared, emulator, pg_url, balancer, server.url, nodes)
    try:
        for node in nodes.values():
            node.start()
        files = sample_files(16, "woken")
        for rel, data in files.items():
            drop(shared / "inbox" / rel, data)
        wait_until(
            lambda: cluster.finished() >= len(files),
            30,
            lambda: f"all {len(files)} finished by their callbacks (have {cluster.finished()})\n{cluster.logs()}",
        )
        for node in nodes.values():
            assert node.terminate() == 0
    finally:
        for node in nodes.values():
            node.cleanup()
        server.close()
    assert_every_file_once(cluster, files)
    assert len(balancer.routed) >= len(files) and all(up != to for up, to in balancer.routed)
    # who went on after each callback: the node that recorded it, or the one woken by the journal
    fetched_by = collections.Counter(
        w
        for (w,) in cluster.rows(
            "SELECT writer FROM test_moves WHERE old_state = 'uploaded' AND new_state = 'exporting'"
        )
    )
    assert len(fetched_by) == 2, f"one node did all the fetching: {fetched_by}"


def test_one_node_rescans_and_the_role_passes_on_when_it_dies(cluster: Cluster):
    nodes = {n: cluster.node(n) for n in ("a", "b", "c")}
    for node in nodes.values():
        cluster.start(node)

    def rescanners() -> list[str]:
        found = []
        for name, node in nodes.items():
            if node.proc and node.proc.poll() is None:
                status = json.loads(urlopen(f"{node.monitor_url}/status", timeout=5).read())
                if status["node"]["rescanner"]:
                    found.append(name)
        return found

    first = wait_until(rescanners, 30, "a rescanner")
    assert len(first) == 1, first
    said = [n for n, node in nodes.items() if "this node rescans the inbox" in node.log.read_text()]
    assert said == first
    nodes[first[0]].kill9()
    second = wait_until(rescanners, 30, "another node takes the rescanner role")
    assert len(second) == 1 and second != first, second
    status = konfuzio_watch("status", "--config", str(nodes[second[0]].config))
    assert status.returncode == 0, status.stderr
    listed = status.stdout
    assert "nodes sharing the journal" in listed
    for name in nodes:
        assert f"  {name} " in listed, listed
    dead = next(line for line in listed.splitlines() if line.startswith(f"  {first[0]} "))
    wait_until(
        lambda: (
            "SILENT"
            in next(
                line
                for line in konfuzio_watch("status", "--config", str(nodes[second[0]].config)).stdout.splitlines()
                if line.startswith(f"  {first[0]} ")
            )
        ),
        30,
        f"the dead node shown silent (was: {dead})",
    )


def test_check_refuses_a_journal_url_while_a_single_daemon_holds_the_inbox(tmp_path: Path, emulator: Any, pg_url: str):
    (tmp_path / "single").mkdir()
    single = DaemonProcess(
        tmp_path / "single",
        emulator,
        folders={"inbox": str(tmp_path / "inbox"), "state": str(tmp_path / "single" / "state")},
    )
    node = cluster_node(tmp_path, "a", emulator, pg_url)
    try:
        single.start()
        checked = konfuzio_watch("check", "--config", str(node.config))
        assert checked.returncode != 0
        assert "a konfuzio-watch with a journal of its own (SQLite)" in checked.stdout + checked.stderr
        node.start(wait_ready=False)
        assert node.proc is not None and node.proc.wait(30) != 0, "a node started on a single daemon's inbox"
        assert single.terminate() == 0
        checked = konfuzio_watch("check", "--config", str(node.config))
        assert "a konfuzio-watch with a journal of its own" not in checked.stdout + checked.stderr
    finally:
        single.cleanup()
        node.cleanup()


def test_files_a_dead_node_uploaded_are_looked_at_when_it_falls_silent(tmp_path: Path, emulator: Any, pg_url: str):
    """Each node with a callback URL of its own: a node dies after its uploads, with no file in hand;
    the callbacks for its files go nowhere. The other node looks at those files once the dead one
    falls silent, not a callback_timeout (a minute here, ten by default) later."""
    install_move_audit(pg_url)
    emulator.knobs.processing_s = 2.0
    shared = tmp_path
    (shared / "inbox").mkdir()
    slow_polls = {"results": {"callback_timeout": 60, "poll_interval": 60}}
    a = cluster_node(shared, "a", emulator, pg_url, **slow_polls)
    b = cluster_node(shared, "b", emulator, pg_url, **slow_polls)
    cluster = Cluster(shared, emulator, pg_url, CallbackBalancer(), "", {"a": a, "b": b})
    try:
        a.start()
        files = sample_files(8, "orphaned")
        for rel, data in files.items():
            drop(shared / "inbox" / rel, data)
        wait_until(
            lambda: (
                cluster.rows("SELECT COUNT(*) FROM files WHERE state = 'uploaded' AND lease_node IS NULL")[0][0]
                == len(files)
            ),
            30,
            "a's uploads done",
        )
        a.kill9()
        b.start()
        wait_until(
            lambda: cluster.finished() >= len(files),
            20,
            lambda: f"all {len(files)} finished by b (have {cluster.finished()})\n{cluster.logs()}",
        )
        assert b.terminate() == 0
    finally:
        a.cleanup()
        b.cleanup()
    assert_every_file_once(cluster, files, shared=False)


def test_each_delivery_goes_once_per_key_when_a_node_dies_holding_one(cluster: Cluster):
    """Two nodes deliver; the one whose delivery the receiver holds is killed with SIGKILL: the other sends
    it again after its lease, with the same key; every other delivery goes once, never two in parallel."""
    import threading

    from .helpers import DeliveryReceiver

    secret = b"cluster-webhook-secret"
    (cluster.shared / "secret").write_bytes(secret)
    rec = DeliveryReceiver(secret, cluster.shared / "done", cluster.shared / "failed").open()
    try:
        deliver = {"webhook": {"url": rec.url, "secret_file": str(cluster.shared / "secret"), "timeout_seconds": 1}}
        nodes = {n: cluster.node(n, deliver=deliver) for n in ("a", "b")}
        for node in nodes.values():
            cluster.start(node)
        rec.hold = threading.Event()
        files = sample_files(12, "deliver")
        for rel, data in files.items():
            drop(cluster.inbox / rel, data)
        wait_until(rec.holding.is_set, 60, lambda: f"a delivery in the receiver's hands\n{cluster.logs()}")
        holders = cluster.rows(
            "SELECT lease_node FROM deliveries WHERE state = 'pending' AND lease_node IS NOT NULL ORDER BY id"
        )
        victim = nodes[holders[0][0]]
        victim.kill9()  # its delivery answered 200 to a node that is gone
        rec.hold.set()
        rec.hold = None
        survivor = next(n for name, n in nodes.items() if n is not victim)
        wait_until(
            lambda: (
                cluster.finished() >= len(files)
                and cluster.rows("SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'") == [(len(files),)]
            ),
            90,
            lambda: (
                f"all {len(files)} delivered (have "
                f"{cluster.rows('SELECT state, COUNT(*) FROM deliveries GROUP BY state')})\n{cluster.logs()}"
            ),
        )
        keys = {k for (k,) in cluster.rows("SELECT key FROM deliveries")}
        rec.assert_each_once_signed_and_placed(keys)
        repeats = sum(n - 1 for n in rec.per_key().values())
        assert repeats <= len(holders), "a repeat only for a delivery the killed node had in hand"
        assert survivor.terminate() == 0
        print(f"\ncluster, one node killed holding a delivery: {rec.figures()}, in parallel {len(rec.in_parallel)}")
    finally:
        rec.close()
