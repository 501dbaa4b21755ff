"""The chart's Grafana dashboard, structurally: what Grafana needs to import it and show it right.

The queries themselves run against a real Prometheus in test_live.py; here the JSON as the chart
ships it (the ConfigMap's data) is checked: schema version, unique panel ids, every query on the
datasource variable, no namespace written into a query, variables defined, units and legends set,
panels on the grid without overlap.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from chart.helm import helm_binary

from .chart_rules import dashboard, panels

pytestmark = pytest.mark.skipif(helm_binary() is None, reason="helm is not built (make tools)")

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return dashboard()


def test_dashboard_identity_and_schema(board: dict[str, Any]) -> None:
    assert board["uid"] == "finetune-operator" and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36  # Grafana 9+
    assert "id" not in board or board["id"] is None  # an id would clash with the importing Grafana's


def test_panel_ids_are_unique_and_panels_do_not_overlap(board: dict[str, Any]) -> None:
    all_panels = list(panels(board["panels"]))
    ids = [p.get("id") for p in all_panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for p in all_panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (p["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_uses_the_datasource_variable_and_no_fixed_namespace(board: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    queried = [p for p in panels(board["panels"]) if p["type"] != "row"]
    assert queried
    for p in queried:
        assert p["datasource"] == DATASOURCE, p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t.get("datasource", DATASOURCE) == DATASOURCE, p["title"]
            expr = t["expr"]
            # Namespaces and jobs come from the variables, never written in.
            for label in ("namespace", "finetune_job", "pod"):
                for value in re.findall(rf'\b{label}\s*=~?\s*"([^"]*)"', expr):
                    assert value.startswith("$"), f"{p['title']!r} fixes {label}={value!r}: {expr}"
            for used in re.findall(r"\$(\w+)", expr):
                assert used in variables, f"{p['title']!r} uses undefined ${used}"
    for name in ("namespace", "job"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DATASOURCE
        assert var["includeAll"] and var["multi"] and var["allValue"] == ".*"


def test_units_and_legends(board: dict[str, Any]) -> None:
    for p in panels(board["panels"]):
        if p["type"] == "row":
            continue
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit, f"{p['title']!r} has no unit"
        for t in p["targets"]:
            assert t.get("legendFormat"), f"{p['title']!r} {t['refId']} has no legend"
            # A legend names the series by labels the query keeps.
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t["legendFormat"]):
                by = re.findall(r"\bby\s*\(([^)]*)\)", t["expr"])
                assert any(label in [x.strip() for x in g.split(",")] for g in by), \
                    f"{p['title']!r}: legend {{{{{label}}}}} but the query keeps no such label: {t['expr']}"
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels(board["panels"]) if p["type"] != "row"}
    assert units["Reconcile latency"] == "s" and units["ETA"] == "s" and units["GPU memory allocated"] == "bytes"
    assert units["Progress"] == "percentunit" and units["Tokens per second"] == "suffix: tok/s"
