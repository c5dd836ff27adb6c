"""Prometheus metrics through prometheus_client's thread-safe types, in a registry per daemon.

Counters and the latency histogram are updated by whichever thread sees the event (workers,
HTTP handlers); the journal-derived gauges (files by state, the oldest pending file, blocked
scopes) are read from a ``Sample`` callable when ``/metrics`` is scraped.
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
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class Sample:
    """What the journal and the daemon say at scrape time."""

    files_by_state: Mapping[str, int] = field(default_factory=dict)
    oldest_pending_age_seconds: float | None = None
    ready: bool = False
    blocked: Mapping[str, str] = field(default_factory=dict)  # scope -> reason
    callbacks_arriving: bool | None = None  # None: poll-only mode (no callbacks expected)


class Metrics:
    def __init__(self, sample: Callable[[], Sample] = Sample):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.uploads = Counter(PREFIX + "uploads", "Files uploaded to Konfuzio.", registry=r)
        self.upload_retries = Counter(PREFIX + "upload_retries", "Upload attempts that were retried.", registry=r)
        self.fetch_retries = Counter(PREFIX + "fetch_retries", "Result fetches (details, bbox) that were retried.",
                                     registry=r)
        self.callbacks = Counter(PREFIX + "callbacks", "Callbacks received, by outcome.", ["outcome"], registry=r)
        self.extra_documents = Counter(PREFIX + "extra_documents_deleted",
                                       "Second copies of a file on the server (late earlier attempts), deleted.",
                                       registry=r)
        self.callback_latency = Histogram(PREFIX + "callback_latency_seconds",
                                          "Seconds from upload to Konfuzio's callback.",
                                          buckets=LATENCY_BUCKETS_S, registry=r)
        r.register(_SampleCollector(sample))

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


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
            yield GaugeMetricFamily(PREFIX + "oldest_pending_age_seconds",
                                    "Age of the oldest unfinished file in seconds.", value=s.oldest_pending_age_seconds)
        yield GaugeMetricFamily(PREFIX + "up", "1 when the daemon is ready (watching and serving callbacks).",
                                value=1 if s.ready else 0)
        blocked = GaugeMetricFamily(PREFIX + "blocked", "1 while a kind of work is paused (api, output, journal).",
                                    labels=["scope"])
        for scope in ("api", "output", "journal"):
            blocked.add_metric([scope], 1 if scope in s.blocked else 0)
        yield blocked
        if s.callbacks_arriving is not None:
            yield GaugeMetricFamily(PREFIX + "callbacks_arriving",
                                    "0 when Konfuzio's callbacks cannot reach the daemon (the start-up probe failed, "
                                    "or results keep being found by polling); results are then polled.",
                                    value=1 if s.callbacks_arriving else 0)
