"""The /metrics exposition, read back with the Prometheus client's own parser."""

from __future__ import annotations

import math
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from konfuzio_watch.metrics import LATENCY_BUCKETS_S, Metrics, Sample


def parse(text: bytes) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def values(family: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}  # type: ignore[attr-defined]


def full_metrics() -> Metrics:
    metrics = Metrics(
        lambda: Sample(
            files_by_state={"claimed": 1, "uploaded": 3, "done": 10, "failed": 1, "exporting": 0},
            oldest_pending_age_seconds=42.5,
            ready=True,
            blocked={"api": "Konfuzio is unavailable"},
        )
    )
    metrics.uploads.inc(14)
    metrics.upload_retries.inc(2)
    metrics.fetch_retries.inc(5)
    for outcome, n in {"recorded": 12, "finished": 1, "unknown": 4, "mismatch": 0, "invalid": 2}.items():
        metrics.callbacks.labels(outcome).inc(n)
    for seconds in (0.05, 0.1, 0.3, 4.0, 4.0, 59.0, 1000.0):
        metrics.callback_latency.observe(seconds)
    return metrics


def test_every_family_has_help_type_and_its_values() -> None:
    text = full_metrics().render()
    families = parse(text)

    assert {name: f.type for name, f in families.items()} == {  # type: ignore[attr-defined]
        "konfuzio_watch_files": "gauge",
        "konfuzio_watch_uploads": "counter",
        "konfuzio_watch_upload_retries": "counter",
        "konfuzio_watch_fetch_retries": "counter",
        "konfuzio_watch_callbacks": "counter",
        "konfuzio_watch_callback_latency_seconds": "histogram",
        "konfuzio_watch_oldest_pending_age_seconds": "gauge",
        "konfuzio_watch_up": "gauge",
        "konfuzio_watch_blocked": "gauge",
        "konfuzio_watch_extra_documents_deleted": "counter",
        "konfuzio_watch_files_done": "counter",
        "konfuzio_watch_files_failed": "counter",
        "konfuzio_watch_upload_latency_seconds": "histogram",
        "konfuzio_watch_result_latency_seconds": "histogram",
    }
    assert all(f.documentation for f in families.values())  # type: ignore[attr-defined]
    files = values(families["konfuzio_watch_files"])
    assert files[("konfuzio_watch_files", (("state", "done"),))] == 10
    assert files[("konfuzio_watch_files", (("state", "exporting"),))] == 0
    assert values(families["konfuzio_watch_uploads"]) == {("konfuzio_watch_uploads_total", ()): 14}
    assert values(families["konfuzio_watch_upload_retries"]) == {("konfuzio_watch_upload_retries_total", ()): 2}
    assert values(families["konfuzio_watch_fetch_retries"]) == {("konfuzio_watch_fetch_retries_total", ()): 5}
    callbacks = values(families["konfuzio_watch_callbacks"])
    assert callbacks[("konfuzio_watch_callbacks_total", (("outcome", "invalid"),))] == 2
    assert len(callbacks) == 5
    assert values(families["konfuzio_watch_oldest_pending_age_seconds"]) == {
        ("konfuzio_watch_oldest_pending_age_seconds", ()): 42.5
    }
    assert values(families["konfuzio_watch_up"]) == {("konfuzio_watch_up", ()): 1}
    blocked = values(families["konfuzio_watch_blocked"])
    assert blocked[("konfuzio_watch_blocked", (("scope", "api"),))] == 1
    assert blocked[("konfuzio_watch_blocked", (("scope", "journal"),))] == 0
    assert b"_created" not in text


def test_histogram_buckets_are_cumulative_and_match_count_and_sum() -> None:
    family = parse(full_metrics().render())["konfuzio_watch_callback_latency_seconds"]
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]  # type: ignore[attr-defined]
    totals = {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")}  # type: ignore[attr-defined]

    assert [le for le, _ in buckets] == [*LATENCY_BUCKETS_S, math.inf]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts), "bucket counts must never decrease"
    assert dict(buckets)[0.1] == 2  # 0.05 and 0.1 (le is inclusive)
    assert dict(buckets)[5.0] == 5
    assert dict(buckets)[600.0] == 6
    assert counts[-1] == totals["konfuzio_watch_callback_latency_seconds_count"] == 7
    assert totals["konfuzio_watch_callback_latency_seconds_sum"] == pytest.approx(1067.45)


def test_label_values_are_escaped() -> None:
    odd = 'we"ird\\state\nname'
    text = Metrics(lambda: Sample(files_by_state={odd: 7})).render()

    assert b'state="we\\"ird\\\\state\\nname"' in text
    files = parse(text)["konfuzio_watch_files"]
    assert values(files) == {("konfuzio_watch_files", (("state", odd),)): 7}


def test_an_empty_sample_is_valid_and_says_down() -> None:
    families = parse(Metrics().render())

    assert values(families["konfuzio_watch_up"]) == {("konfuzio_watch_up", ()): 0}
    assert values(families["konfuzio_watch_files"]) == {}
    assert "konfuzio_watch_oldest_pending_age_seconds" not in families


def test_two_daemons_in_one_process_count_separately() -> None:
    a, b = Metrics(), Metrics()
    a.uploads.inc()
    assert a.registry.get_sample_value("konfuzio_watch_uploads_total") == 1
    assert b.registry.get_sample_value("konfuzio_watch_uploads_total") == 0


def test_counters_lose_no_increment_when_many_threads_count_at_once() -> None:
    """Counters were read-modify-written from several threads (163,137 of 400,000 counted)."""
    metrics = Metrics()

    def count() -> None:
        for _ in range(50_000):
            metrics.fetch_retries.inc()
            metrics.callbacks.labels("recorded").inc()
            metrics.callback_latency.observe(1.0)

    threads = [threading.Thread(target=count) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    r = metrics.registry
    assert r.get_sample_value("konfuzio_watch_fetch_retries_total") == 400_000
    assert r.get_sample_value("konfuzio_watch_callbacks_total", {"outcome": "recorded"}) == 400_000
    assert r.get_sample_value("konfuzio_watch_callback_latency_seconds_count") == 400_000
