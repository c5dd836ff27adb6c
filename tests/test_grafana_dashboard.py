"""docs/grafana/konfuzio-watch.json: a Grafana dashboard whose every expression uses only metric names
a running daemon's /metrics exports (a daemon on its own; and a node of a cluster for the cluster's row)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests

from konfuzio_watch.emulator import FAIL_MARKER
from konfuzio_watch.samples import make_pdf

from .conftest import drop, wait_until
from .helpers import cluster_node

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "konfuzio-watch.json"
NAME = re.compile(r"\bkonfuzio_watch_[A-Za-z0-9_]+")
CLUSTER_ROW = "Cluster"


def expressions(dashboard: dict) -> dict[str, list[str]]:
    """Every PromQL expression of the dashboard (panels' targets, template queries) -> its panel's row."""
    found: dict[str, list[str]] = {}
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        for target in panel.get("targets", []):
            found.setdefault(row, []).append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.setdefault("", []).append(variable["definition"])
    return found


def names_used(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in NAME.findall(expr)}


def exported(metrics_url: str) -> set[str]:
    """The sample names of a scrape (``_total``, ``_bucket``, ``_sum``, ``_count`` as exported)."""
    text = requests.get(metrics_url, timeout=10).text
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_the_dashboard_is_a_grafana_model_over_a_prometheus_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["includeAll"] and variables["node"]["allValue"] == ".*"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert NAME.search(target["expr"]), (panel["title"], target["expr"])
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("finished", "pending by state", "failures by stage", "blocked", "upload latency", "result latency"):
        assert topic in titles, topic
    assert "callbacks arriving" in titles and "cluster" in titles


def done_failed_and_pending(inbox: Path, monitor_url: str, emulator) -> None:  # type: ignore[no-untyped-def]
    """One file done, one failed, then one waiting while Konfuzio is down (the series that are absent
    until there is something to say: a failure's stage, the oldest pending file, callbacks arriving)."""
    drop(inbox / "good.pdf", make_pdf(label="good"))
    drop(inbox / "fails.pdf", make_pdf(label="fails") + FAIL_MARKER)

    def finished() -> bool:
        line = requests.get(f"{monitor_url}/status", timeout=5).json()["line"]
        return line.startswith("0 pending, 1 done, 1 failed")

    wait_until(finished, 60, "one file done and one failed")
    emulator.knobs.outage = True
    drop(inbox / "waits.pdf", make_pdf(label="waits"))
    wait_until(lambda: requests.get(f"{monitor_url}/status", timeout=5).json()["blocked"], 60, "the API gate blocked")


@pytest.mark.slow
def test_every_metric_the_dashboard_uses_is_exported_by_a_daemon(daemon_process, emulator, tmp_path):
    daemon = daemon_process()
    daemon.start()
    done_failed_and_pending(tmp_path / "inbox", daemon.monitor_url, emulator)
    found = exported(f"{daemon.monitor_url}/metrics")
    used = names_used(
        [
            e
            for row, exprs in expressions(json.loads(DASHBOARD.read_text())).items()
            for e in exprs
            if not row.startswith(CLUSTER_ROW)
        ]
    )
    assert used and not used - found, f"not exported: {sorted(used - found)}"


@pytest.mark.slow
@pytest.mark.postgres
def test_every_metric_the_dashboard_uses_is_exported_by_a_node_of_a_cluster(emulator, pg_url, tmp_path):
    node = cluster_node(tmp_path, "a", emulator, pg_url)
    try:
        node.start()
        done_failed_and_pending(tmp_path / "inbox", node.monitor_url, emulator)
        text = requests.get(f"{node.monitor_url}/metrics", timeout=10).text
        found = exported(f"{node.monitor_url}/metrics")
        page = requests.get(f"{node.monitor_url}/", timeout=10).text  # the status page lists the nodes too
    finally:
        node.cleanup()
    used = names_used([e for exprs in expressions(json.loads(DASHBOARD.read_text())).values() for e in exprs])
    assert not used - found, f"not exported: {sorted(used - found)}"
    assert 'konfuzio_watch_up{node="a"}' in text  # the dashboard's node variable has its label
    assert re.search(r'<section id="nodes">.*<td class="name">a</td>', page, re.S)
