"""Prometheus metrics in the text exposition format 0.0.4, rendered by hand (no runtime dependency).

The daemon builds a ``MetricsSnapshot`` from the journal and its counters when ``/metrics`` is
scraped; ``render`` turns it into text. ``Histogram`` is the one piece of live state: the
callback handler observes the upload -> callback latency into it from any thread.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

PREFIX = "konfuzio_watch_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative counts per upper bound (the last bound is +Inf), their sum and count."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float
    count: int


class Histogram:
    """A thread-safe histogram with fixed buckets; ``+Inf`` is implied."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S):
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be distinct finite numbers")
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)  # a value equal to a bound belongs to it (le)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for n in counts:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(self._bounds + (math.inf,), tuple(cumulative), total, running)


@dataclass
class MetricsSnapshot:
    """What the daemon knows at scrape time."""

    files_by_state: Mapping[str, int] = field(default_factory=dict)
    uploads_total: int = 0
    upload_retries_total: int = 0
    fetch_retries_total: int = 0
    callbacks_total: Mapping[str, int] = field(default_factory=dict)
    callback_latency_seconds: HistogramSnapshot | None = None
    oldest_pending_age_seconds: float | None = None
    ready: bool = False


def render(snapshot: MetricsSnapshot) -> str:
    """The snapshot as Prometheus text exposition format 0.0.4."""
    s = snapshot
    out: list[str] = []
    _family(out, "files", "gauge", "Files in the journal by pipeline state.",
            _labelled("state", s.files_by_state))
    _family(out, "uploads_total", "counter", "Files uploaded to Konfuzio.", [("", {}, s.uploads_total)])
    _family(out, "upload_retries_total", "counter", "Upload attempts that were retried.",
            [("", {}, s.upload_retries_total)])
    _family(out, "fetch_retries_total", "counter", "Result fetches (details, bbox) that were retried.",
            [("", {}, s.fetch_retries_total)])
    _family(out, "callbacks_total", "counter", "Callbacks received, by outcome.",
            _labelled("outcome", s.callbacks_total))
    if s.callback_latency_seconds is not None:
        _family(out, "callback_latency_seconds", "histogram", "Seconds from upload to Konfuzio's callback.",
                _histogram_samples(s.callback_latency_seconds))
    if s.oldest_pending_age_seconds is not None:
        _family(out, "oldest_pending_age_seconds", "gauge", "Age of the oldest unfinished file in seconds.",
                [("", {}, s.oldest_pending_age_seconds)])
    _family(out, "up", "gauge", "1 when the daemon is ready (watching and serving callbacks).",
            [("", {}, 1 if s.ready else 0)])
    return "\n".join(out) + "\n"


Sample = tuple[str, Mapping[str, str], float]  # (suffix, labels, value)


def _family(out: list[str], name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
    full = PREFIX + name
    out.append(f"# HELP {full} {_escape_help(help_text)}")
    out.append(f"# TYPE {full} {kind}")
    for suffix, labels, value in samples:
        out.append(f"{full}{suffix}{_labels(labels)} {_number(value)}")


def _labelled(label: str, values: Mapping[str, int]) -> list[Sample]:
    return [("", {label: str(key)}, n) for key, n in sorted(values.items(), key=lambda kv: str(kv[0]))]


def _histogram_samples(h: HistogramSnapshot) -> list[Sample]:
    samples: list[Sample] = [("_bucket", {"le": _number(b)}, n) for b, n in zip(h.bounds, h.cumulative, strict=True)]
    return samples + [("_sum", {}, h.sum), ("_count", {}, h.count)]


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
