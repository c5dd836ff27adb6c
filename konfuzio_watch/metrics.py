"""Prometheus metrics through prometheus_client's thread-safe types, in a registry per daemon.

Counters and the latency histogram are updated by whichever thread sees the event (workers,
HTTP handlers); the journal-derived gauges (files by state, the oldest pending file, blocked
scopes) are read from a ``Sample`` callable when ``/metrics`` is scraped.

A node of a cluster (``node_id``) labels every series it exports with ``node="<its id>"`` and adds
the cluster's gauges: the rows it holds, whether it is the rescanner, and every node's heartbeat
age. ``konfuzio_watch_files`` counts the whole cluster's files (the journal is shared): every node
exports the same numbers, so aggregate it with ``max``, not ``sum``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The *_created series double every counter and mean nothing to an admin.
prometheus_client.disable_created_metrics()

PREFIX = "konfuzio_watch_"
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FILE_LATENCY_BUCKETS_S = (*LATENCY_BUCKETS_S, 1800.0, 3600.0)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class Sample:
    """What the journal and the daemon say at scrape time."""

    files_by_state: Mapping[str, int] = field(default_factory=dict)
    oldest_pending_age_seconds: float | None = None
    ready: bool = False
    blocked: Mapping[str, str] = field(default_factory=dict)  # scope -> reason
    callbacks_arriving: bool | None = None  # None: not known yet, or poll-only mode (no callbacks expected)
    cluster: ClusterSample | None = None  # None: one daemon on its own journal
    deliveries: Mapping[str, int] | None = None  # by state (``delivery.py``); None: nothing is delivered


@dataclass(frozen=True)
class ClusterSample:
    """What a node of a cluster says about itself and the others."""

    leased: int = 0  # rows this node holds (steps in hand)
    rescanner: bool = False  # this node does the periodic rescans
    heartbeat_age_s: Mapping[str, float] = field(default_factory=dict)  # node id -> seconds since it was heard
    alive_within_s: float = 60.0  # a node heard within this is alive (its leases hold)


class Metrics:
    def __init__(self, sample: Callable[[], Sample] = Sample, node_id: str | None = None, *, deliveries: bool = False):
        self.registry = CollectorRegistry(auto_describe=True)
        self.node_id = node_id
        self._exposed = self.registry
        if node_id is not None:
            self._exposed = CollectorRegistry(auto_describe=False)
            self._exposed.register(_NodeLabelled(self.registry, node_id))
        r = self.registry
        self.uploads = Counter(PREFIX + "uploads", "Files uploaded to Konfuzio.", registry=r)
        self.upload_retries = Counter(PREFIX + "upload_retries", "Upload attempts that were retried.", registry=r)
        self.fetch_retries = Counter(
            PREFIX + "fetch_retries", "Result fetches (details, bbox) that were retried.", registry=r
        )
        self.callbacks = Counter(PREFIX + "callbacks", "Callbacks received, by outcome.", ["outcome"], registry=r)
        self.extra_documents = Counter(
            PREFIX + "extra_documents_deleted",
            "Second copies of a file on the server (late earlier attempts), deleted.",
            registry=r,
        )
        self.callback_latency = Histogram(
            PREFIX + "callback_latency_seconds",
            "Seconds from upload to Konfuzio's callback.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        # Counted and timed as files move (``transition_metrics.py``), on the node that moved them.
        self.files_done = Counter(PREFIX + "files_done", "Files that reached done/.", registry=r)
        self.files_failed = Counter(
            PREFIX + "files_failed", "Files that went to failed/, by the stage that failed them.", ["stage"], registry=r
        )
        self.upload_latency = Histogram(
            PREFIX + "upload_latency_seconds",
            "Seconds from a file's detection to its upload (the server has it).",
            buckets=FILE_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.result_latency = Histogram(
            PREFIX + "result_latency_seconds",
            "Seconds from a file's detection to its result in done/.",
            buckets=FILE_LATENCY_BUCKETS_S,
            registry=r,
        )
        # Only with a ``deliver`` section (``delivery.py``): a daemon without one exports what it always did.
        self.deliveries: Counter | None = None
        self.delivery_latency: Histogram | None = None
        if deliveries:
            self.deliveries = Counter(
                PREFIX + "deliveries",
                "Deliveries to the next system, by outcome (delivered, retried, failed, superseded).",
                ["outcome"],
                registry=r,
            )
            self.delivery_latency = Histogram(
                PREFIX + "delivery_latency_seconds",
                "Seconds from a file's move into done/ (or failed/, or its new revision) to its delivery.",
                buckets=LATENCY_BUCKETS_S,
                registry=r,
            )
        r.register(_SampleCollector(sample))

    def delivery_outcome(self, outcome: str, latency_s: float | None = None) -> None:
        if self.deliveries is not None:
            self.deliveries.labels(outcome).inc()
        if latency_s is not None and self.delivery_latency is not None:
            self.delivery_latency.observe(latency_s)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self._exposed)


class _NodeLabelled(Collector):
    """Every series of ``registry`` with ``node="<id>"`` added to its labels."""

    def __init__(self, registry: CollectorRegistry, node_id: str):
        self._registry = registry
        self._node_id = node_id

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(
                    sample.name,
                    {**sample.labels, "node": self._node_id},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield labelled


class _SampleCollector(Collector):
    def __init__(self, sample: Callable[[], Sample]):
        self._sample = sample

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on the sample

    def collect(self) -> Iterator[Metric]:
        s = self._sample()
        files = GaugeMetricFamily(PREFIX + "files", "Files in the journal by pipeline state.", labels=["state"])
        for state, n in sorted(s.files_by_state.items()):
            files.add_metric([state], n)
        yield files
        if s.oldest_pending_age_seconds is not None:
            yield GaugeMetricFamily(
                PREFIX + "oldest_pending_age_seconds",
                "Age of the oldest unfinished file in seconds.",
                value=s.oldest_pending_age_seconds,
            )
        yield GaugeMetricFamily(
            PREFIX + "up", "1 when the daemon is ready (watching and serving callbacks).", value=1 if s.ready else 0
        )
        blocked = GaugeMetricFamily(
            PREFIX + "blocked", "1 while a kind of work is paused (api, output, journal, shares).", labels=["scope"]
        )
        for scope in ("api", "output", "journal", "shares", *(("receiver",) if s.deliveries is not None else ())):
            blocked.add_metric([scope], 1 if scope in s.blocked else 0)
        yield blocked
        if s.deliveries is not None:
            yield GaugeMetricFamily(
                PREFIX + "deliveries_pending",
                "Deliveries waiting to be sent (the outbox).",
                value=s.deliveries.get("pending", 0),
            )
            yield GaugeMetricFamily(
                PREFIX + "deliveries_failed",
                "Deliveries that finally failed (konfuzio-watch redeliver sends them again).",
                value=s.deliveries.get("failed", 0),
            )
        if s.cluster is not None:
            c = s.cluster
            yield GaugeMetricFamily(
                PREFIX + "leased_files", "Files this node works on (their rows leased to it).", value=c.leased
            )
            yield GaugeMetricFamily(
                PREFIX + "rescanner",
                "1 while this node does the periodic rescans of the inbox.",
                value=1 if c.rescanner else 0,
            )
            ages = GaugeMetricFamily(
                PREFIX + "node_heartbeat_age_seconds",
                "Seconds since each node of the cluster was last heard from.",
                labels=["peer"],
            )
            for peer, age in sorted(c.heartbeat_age_s.items()):
                ages.add_metric([peer], age)
            yield ages
            yield GaugeMetricFamily(
                PREFIX + "nodes_alive",
                "Nodes of the cluster heard from within their lease.",
                value=sum(1 for age in c.heartbeat_age_s.values() if age <= c.alive_within_s),
            )
        if s.callbacks_arriving is not None:
            yield GaugeMetricFamily(
                PREFIX + "callbacks_arriving",
                "1 when Konfuzio's callbacks arrive, 0 when not (the start-up probe failed, or "
                "results keep being found by polling; results are then polled): the answer "
                "status and /healthz give under callbacks. Absent until it is known, and in "
                "poll-only mode.",
                value=1 if s.callbacks_arriving else 0,
            )
