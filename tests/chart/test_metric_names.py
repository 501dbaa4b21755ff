"""Every metric the chart's dashboard and alert rules query is one the code really exports.

The exported names come from the live endpoints: the trainer's and the operator's metrics servers
are started here and scraped over HTTP, so a renamed or dropped metric breaks this test, not a
Grafana panel in production. The PromQL comes from the rendered chart (all alerts on).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from finetune_api.constants import OPERATOR_METRIC_PREFIX, TRAINER_METRIC_PREFIX
from prometheus_client.parser import text_string_to_metric_families

from .helm import helm_binary, one, render
from .live_metrics import operator_metrics_text, trainer_metrics_text

pytestmark = pytest.mark.skipif(helm_binary() is None, reason="helm is not built (make tools)")

METRIC_RE = re.compile(rf"\b((?:{OPERATOR_METRIC_PREFIX}|{TRAINER_METRIC_PREFIX})[A-Za-z0-9_]*)")
# `name{label="x", other=~"y"}`: the label names a selector filters on.
SELECTOR_RE = re.compile(rf"\b((?:{OPERATOR_METRIC_PREFIX}|{TRAINER_METRIC_PREFIX})[A-Za-z0-9_]*)\{{([^}}]*)\}}")
BY_RE = re.compile(r"\bby\s*\(([^)]*)\)")
#: Labels Prometheus adds to trainer series: the target's namespace/pod, and the PodMonitor's relabelling.
TRAINER_TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "endpoint",
                         "finetune_job", "node_rank", "node"}
#: Labels Prometheus adds to the operator's series (its own `namespace` wins: honorLabels).
OPERATOR_TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "endpoint", "service"}


#: Series names a family of each type exposes (the parser reports counters without `_total`).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "gauge": ("",), "info": ("_info",)}


def exported(text: str) -> dict[str, set[str] | None]:
    """Series names -> their label names (None: a labelled family with no series yet, labels unknown).

    Names come from the families' TYPE lines, so a counter whose label values have not occurred
    yet (reconcile errors) still counts as exported.
    """
    names: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = names.get(sample.name) or set()
            names[sample.name] = labels | {k for k in sample.labels if k != "le"}
    return names


@pytest.fixture(scope="module")
def live() -> dict[str, set[str] | None]:
    names = exported(trainer_metrics_text()) | exported(operator_metrics_text())
    assert any(n.startswith(TRAINER_METRIC_PREFIX) for n in names)
    assert any(n.startswith(OPERATOR_METRIC_PREFIX) for n in names)
    return names


def chart_promql() -> Iterator[tuple[str, str]]:
    """(where, expr) for every PromQL expression of the dashboard and the alert rules."""
    objs = render({"prometheusRule": {"enabled": True}})
    for group in one(objs, "PrometheusRule")["spec"]["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]
    dashboard = json.loads(one(objs, "ConfigMap")["data"]["finetune-operator.json"])

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            yield f"variable ${var['name']}", query["query"]


EXPRESSIONS = list(chart_promql()) if helm_binary() else []


def test_chart_queries_reference_metrics() -> None:
    """The regex finds names in every expression but `up` (operator down): the check is not empty."""
    assert len(EXPRESSIONS) >= 15
    without = [w for w, e in EXPRESSIONS if not METRIC_RE.search(e)]
    assert without == ["alert FineTuneOperatorDown"]


@pytest.mark.parametrize("where, expr", EXPRESSIONS, ids=[w for w, _ in EXPRESSIONS])
def test_promql_uses_only_exported_metrics_and_labels(where: str, expr: str, live: dict[str, set[str] | None]) -> None:
    missing = sorted({m for m in METRIC_RE.findall(expr) if m not in live})
    assert not missing, f"{where} queries metrics no endpoint exports: {missing}\n  {expr}"
    # Label names are checked where the scrape shows them (families with at least one series).
    def labels_of(metric: str) -> set[str] | None:
        own = live[metric]
        target = TRAINER_TARGET_LABELS if metric.startswith(TRAINER_METRIC_PREFIX) else OPERATOR_TARGET_LABELS
        return None if own is None else own | target

    for name, matchers in SELECTOR_RE.findall(expr):
        known = labels_of(name)
        for label in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
            assert known is None or label in known, f"{where}: {name} has no label {label!r}\n  {expr}"
    # `sum by (phase)` over a metric without `phase` would silently collapse into one series.
    metrics = set(METRIC_RE.findall(expr))
    for group in BY_RE.findall(expr):
        for label in (x.strip() for x in group.split(",") if x.strip()):
            if label == "le" or any(labels_of(m) is None for m in metrics):
                continue
            assert any(label in (labels_of(m) or set()) for m in metrics), \
                f"{where}: no queried metric carries label {label!r} of by ({group})\n  {expr}"


def test_exported_names_follow_prometheus_conventions(live: dict[str, set[str] | None]) -> None:
    for name in live:
        if not name.startswith((OPERATOR_METRIC_PREFIX, TRAINER_METRIC_PREFIX)):
            continue
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        # Units are base units spelled out; no milliseconds or megabytes.
        assert not re.search(r"_(ms|milliseconds|mb|megabytes|kb|percent)(_|$)", name), name

