"""The Grafana dashboard in compose/, checked statically against what the bridge exports.

A panel on a series nobody exports shows "No data" exactly when someone is
looking at it in an incident; these tests catch that (and a renamed label, a
datasource uid that does not exist, a mount that hides the files) without a
Grafana or a Docker engine.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from bridge.metrics import SPECS, exported, family
from tests.unit.test_compose import (
    COMPOSE_DIR,
    COMPOSE_FILE,
    PROMETHEUS_SERIES,
    TARGET_LABELS,
    _bind_mounts,
    grouping_labels,
    metric_names,
)

GRAFANA = COMPOSE_DIR / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "zkbridge.json"
KNOWN = exported() | PROMETHEUS_SERIES


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    grafana: dict[str, Any] = _yaml(COMPOSE_FILE)["services"]["grafana"]
    return grafana


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows nest theirs
    return out


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, Grafana's own variables made neutral."""
    return [(p["title"], t["expr"].replace("$__rate_interval", "5m"))
            for p in panels(dashboard) for t in p.get("targets", [])]


class _Sample(Collector):
    def collect(self) -> Any:
        for name, spec in SPECS.items():
            fam = family(name)
            fam.add_metric(["x"] * len(spec.labels), 1)
            yield fam


def test_exported_names_are_what_a_scrape_shows() -> None:
    # The table the dashboard test trusts, checked against the client library
    # that really renders the scrape (counters gain _total there).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Sample())
    scraped = {}
    for line in io.StringIO(generate_latest(registry).decode()):
        if line.strip() and not line.startswith("#"):
            name, _, rest = line.partition("{") if "{" in line else line.partition(" ")
            labels = set(re.findall(r'(\w+)="', rest)) if "{" in line else set()
            scraped[name] = frozenset(labels)
    assert scraped == exported()


def test_every_query_uses_exported_series_and_their_labels(dashboard: dict[str, Any]) -> None:
    found = queries(dashboard)
    assert len(found) >= 12
    for title, expr in found:
        used = metric_names(expr)
        assert used, f"{title}: no metric in {expr!r}"
        assert used <= set(KNOWN), f"{title}: not exported: {used - set(KNOWN)}"
        available = set(TARGET_LABELS).union(*(KNOWN[n] for n in used))
        assert grouping_labels(expr) <= available, f"{title}: groups by labels the series lack"
        for label in re.findall(r"(\w+)\s*=~?", re.sub(r'"[^"]*"', '""', expr)):
            assert label in available, f"{title}: filters on {label!r}, not a label of {used}"


def test_legends_use_labels_the_query_keeps(dashboard: dict[str, Any]) -> None:
    for p in panels(dashboard):
        for t in p.get("targets", []):
            kept = grouping_labels(t["expr"]) or set(TARGET_LABELS).union(
                *(KNOWN[n] for n in metric_names(t["expr"])))
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
                assert label in kept, f"{p['title']}: legend {{{{{label}}}}} is not on the result"


def test_variables_read_labels_of_exported_series(dashboard: dict[str, Any]) -> None:
    variables = dashboard["templating"]["list"]
    assert {v["name"] for v in variables} == {"region", "subtree"}
    for v in variables:
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert m, query
        metric, label = m.groups()
        assert label in KNOWN[metric] | TARGET_LABELS, f"{metric} has no {label}"
    used = " ".join(e for _, e in queries(dashboard))
    assert "$region" in used and "$subtree" in used


# What the issue asks the dashboard to show, by the series that carry it.
REQUIRED = {
    "lag seconds": "zkbridge_lag_seconds",
    "lag events": "zkbridge_lag_events",
    "heartbeat age": "zkbridge_heartbeat_age_seconds",
    "outbox depth": "zkbridge_outbox_depth",
    "applied rate": "zkbridge_applied_total",
    "published rate": "zkbridge_published_total",
    "conflicts": "zkbridge_conflicts_total",
    "rejected events": "zkbridge_rejected_total",
    "leader per region": "zkbridge_leader",
    "scan time": "zkbridge_scan_seconds",
}


@pytest.mark.parametrize("what", sorted(REQUIRED))
def test_required_panels(dashboard: dict[str, Any], what: str) -> None:
    metric = REQUIRED[what]
    hits = [(t, e) for t, e in queries(dashboard) if metric in metric_names(e)]
    assert hits, f"no panel shows {what}"
    if metric.endswith("_total"):
        assert all(re.search(rf"\b(rate|increase)\({metric}\b", e) for _, e in hits), hits


def test_lag_panels_split_by_subtree_and_peer(dashboard: dict[str, Any]) -> None:
    for title, expr in queries(dashboard):
        if {"zkbridge_lag_seconds", "zkbridge_lag_events"} & metric_names(expr) and \
                "Worst" not in title:
            assert {"region", "subtree", "peer"} <= grouping_labels(expr), title


def test_panel_layout_is_valid(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    for p in panels(dashboard):
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p.get("description"), f"{p['title']}: say what a bad value means"


def test_datasource_is_the_compose_prometheus(dashboard: dict[str, Any]) -> None:
    sources = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert len(sources) == 1
    ds = sources[0]
    assert ds["type"] == "prometheus"
    compose = _yaml(COMPOSE_FILE)
    prom = compose["services"]["prometheus"]
    assert ds["url"] == "http://prometheus:9090"
    assert any(p.endswith(":9090") for p in prom["ports"])
    scrape = _yaml(COMPOSE_DIR / "prometheus.yml")["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape
    for p in panels(dashboard):
        refs = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]
        for ref in refs:
            if ref is not None:
                assert ref == {"type": "prometheus", "uid": ds["uid"]}, p["title"]


def test_grafana_service_mounts_the_provisioning_and_the_dashboard(
    service: dict[str, Any]
) -> None:
    mounts = _bind_mounts(service)
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    provider = _yaml(GRAFANA / "provisioning" / "dashboards" / "zkbridge.yml")["providers"][0]
    folder = provider["options"]["path"]
    assert mounts[folder] == DASHBOARD.parent.resolve()
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == folder and Path(home).name == DASHBOARD.name
    assert all(str(p).startswith("127.0.0.1:") for p in service["ports"]), "loopback only"
    assert "prometheus" in service["depends_on"]
