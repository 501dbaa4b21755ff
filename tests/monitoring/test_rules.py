"""The chart's alerts under promtool: unit tests for every alert, the stall threshold, lint.

The rules are the rendered chart's PrometheusRule `spec.groups` (what prometheus-operator gives
Prometheus). alerts.test.yaml holds the promtool unit tests for the default values; the stall alert's
threshold is also checked for other values with generated tests, since its window is computed from
two chart values.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart.helm import helm_binary
from harness.cluster import TOOLS_BIN
from harness.prometheus import promtool

from .chart_rules import UNIT_TESTS, alert_names, rule_groups, write_rules

pytestmark = [
    pytest.mark.skipif(helm_binary() is None, reason="helm is not built (make tools)"),
    pytest.mark.skipif(not (TOOLS_BIN / "promtool").exists(), reason="promtool is not built (make tools)"),
]


def run_unit_tests(test_file: Path, tmp_path: Path, values: dict[str, Any] | None = None) -> str:
    write_rules(tmp_path / "rules.yaml", values)
    target = tmp_path / test_file.name
    if test_file.resolve() != target.resolve():
        shutil.copy(test_file, target)
    proc = promtool("test", "rules", target.name, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool test rules {target.name} failed:\n{out}"
    return out


def test_every_alert_passes_its_promtool_unit_tests(tmp_path: Path) -> None:
    out = run_unit_tests(UNIT_TESTS, tmp_path)
    assert "SUCCESS" in out


def test_every_chart_alert_has_a_firing_and_a_silent_unit_test() -> None:
    """A new alert in the chart without unit tests in alerts.test.yaml fails here."""
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    chart = set(alert_names(rule_groups()))
    assert len(chart) >= 5
    assert not chart - fires, f"chart alerts without a unit test where they fire: {sorted(chart - fires)}"
    assert not chart - silent, f"chart alerts without a unit test where they stay silent: {sorted(chart - silent)}"
    assert not (fires | silent) - chart, f"unit tests for alerts the chart does not have: {sorted((fires | silent) - chart)}"
    # Labels and annotations are checked for each alert at least once.
    annotated = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])
                 for a in case.get("exp_alerts") or [] if a.get("exp_annotations")}
    assert annotated == chart, f"alerts whose annotations no unit test checks: {sorted(chart - annotated)}"


def test_rules_pass_promtool_lint(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.yaml")
    proc = promtool("check", "rules", "--lint=all", "--lint-fatal", str(rules))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_names(rule_groups()))} rules found" in proc.stdout, proc.stdout


def stall_unit_test(timeout_s: int, scrape_s: int) -> dict[str, Any]:
    """A trainer scraped every `scrape_s` steps until about 10 minutes, then its step freezes. With a
    1-minute evaluation interval the alert must not fire before the last step + timeout, and must
    fire at the first evaluation from then on."""
    steps = 600 // scrape_s
    last_step = steps * scrape_s
    frozen = (last_step + timeout_s + 600) // scrape_s
    labels = '{namespace="ml", finetune_job="j", pod="j-0-a", node_rank="0"}'
    threshold = last_step + timeout_s
    return {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": f"{scrape_s}s",
            "input_series": [
                {"series": f"finetune_trainer_step{labels}", "values": f"0+1x{steps} {steps}x{frozen}"},
                {"series": f"finetune_trainer_total_steps{labels}", "values": f"100000x{steps + frozen + 1}"},
            ],
            "alert_rule_test": [
                # The last evaluation before the threshold, and the first one at or after it.
                {"eval_time": f"{(threshold - 1) // 60 * 60}s", "alertname": "FineTuneJobStalled", "exp_alerts": []},
                {"eval_time": f"{-(-threshold // 60) * 60}s", "alertname": "FineTuneJobStalled",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "ml", "finetune_job": "j"},
                                 "exp_annotations": {
                                     "summary": "FineTuneJob ml/j makes no progress",
                                     "description": f"The trainer has completed no optimizer step for {timeout_s} s "
                                     f"(operator.stallTimeoutSeconds) and is not done; it is at step {steps}. The "
                                     "operator marks the job Stalled and restarts its pods once. Check the trainer "
                                     "logs (data loader, NCCL hang, storage)."}}]},
            ],
        }],
    }


@pytest.mark.parametrize("timeout_s, interval", [(1800, "15s"), (600, "1m"), (3600, "30s"), (300, "1m30s")])
def test_stall_alert_fires_at_the_operator_stall_timeout(tmp_path: Path, timeout_s: int, interval: str) -> None:
    """Not double the timeout (the old window + `for`), and not before it either."""
    scrape_s = sum(int(n) * {"s": 1, "m": 60}[u] for n, u in re.findall(r"(\d+)([sm])", interval))
    values = {"operator": {"stallTimeoutSeconds": timeout_s},
              "metrics": {"trainerPodMonitor": {"interval": interval}}}
    groups = rule_groups(values)
    (stalled,) = [r for g in groups for r in g["rules"] if r.get("alert") == "FineTuneJobStalled"]
    assert f"[{timeout_s + scrape_s}s]" in stalled["expr"] and "for" not in stalled
    test_file = tmp_path / "stall.test.yaml"
    test_file.write_text(yaml.safe_dump(stall_unit_test(timeout_s, scrape_s)))
    run_unit_tests(test_file, tmp_path, values)
