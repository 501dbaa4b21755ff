"""The chart's alerting rules and dashboard, as Prometheus and Grafana get them from `helm template`."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from chart.helm import one, render

#: Release and namespace of every render here: the rule unit tests' labels depend on them.
RELEASE = "ft"
NAMESPACE = "finetune-system"
UNIT_TESTS = Path(__file__).with_name("alerts.test.yaml")


def rendered(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    merged = {**(values or {})}
    merged["prometheusRule"] = {"enabled": True, **merged.get("prometheusRule", {})}
    return render(merged, release=RELEASE, namespace=NAMESPACE)


def rule_groups(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The PrometheusRule's spec.groups: what prometheus-operator hands to Prometheus as a rule file."""
    return list(one(rendered(values), "PrometheusRule")["spec"]["groups"])


def alert_names(groups: list[dict[str, Any]]) -> list[str]:
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def write_rules(path: Path, values: Mapping[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump({"groups": rule_groups(values)}, sort_keys=False))
    return path


def dashboard(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Grafana dashboard as the chart ships it (the ConfigMap's JSON)."""
    cm = one([o for o in render(values, release=RELEASE, namespace=NAMESPACE) if o["kind"] == "ConfigMap"
              and "finetune-operator.json" in (o.get("data") or {})], "ConfigMap")
    return dict(json.loads(cm["data"]["finetune-operator.json"]))


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for p in items:
        yield p
        yield from panels(p.get("panels", []))
