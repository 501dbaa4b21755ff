"""The chart lets the operator read Kueue's Workloads where the cluster serves Kueue's API, and
asks for nothing of Kueue's where it does not (helm sees the cluster's APIs at install time)."""

from __future__ import annotations

from typing import Any

from chart.helm import find, one, render
from finetune_api import constants as c

KUEUE_API = f"{c.KUEUE_GROUP}/{c.KUEUE_VERSION}"
WORKLOADS = {"apiGroups": [c.KUEUE_GROUP], "resources": [c.KUEUE_WORKLOADS], "verbs": ["list", "watch"]}


def kueue_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rules if c.KUEUE_GROUP in r.get("apiGroups", [])]


def test_workloads_are_readable_only_where_kueue_is_served() -> None:
    assert kueue_rules(one(render(), "ClusterRole")["rules"]) == []
    assert kueue_rules(one(render(extra=["--api-versions", KUEUE_API]), "ClusterRole")["rules"]) == [WORKLOADS]
    namespaced = render({"watch": {"namespaces": ["team-a", "team-b"]}}, extra=["--api-versions", KUEUE_API])
    roles = [r for r in find(namespaced, "Role") if r["metadata"].get("namespace") in ("team-a", "team-b")]
    assert len(roles) == 2 and all(kueue_rules(r["rules"]) == [WORKLOADS] for r in roles)
