"""What the operator and the trainer serve on /metrics: promtool's lint, and how many series.

The endpoints are the real servers (tests/chart/live_metrics.py), scraped over HTTP on loopback.
The series counts are the cardinality a platform team pays for: a fixed number per idle operator
that does not grow with jobs (no per-job labels), and a fixed number per trainer pod.
"""

from __future__ import annotations

import pytest
from chart.live_metrics import operator_metrics_text, scrape, trainer_metrics_text
from finetune_api.constants import Phase
from finetune_operator.cache import CHILD_TRIMS
from finetune_operator.metrics import RESTART_REASONS, OperatorMetrics
from harness.cluster import TOOLS_BIN
from harness.prometheus import promtool
from prometheus_client.parser import text_string_to_metric_families

needs_promtool = pytest.mark.skipif(not (TOOLS_BIN / "promtool").exists(), reason="promtool is not built (make tools)")

#: Series of an idle operator, per metric family. A new family needs its count here: the series a
#: platform team pays for are stated, not discovered.
OPERATOR_IDLE = {
    "finetune_operator_jobs": len(Phase.ALL),                      # one per phase
    "finetune_operator_reconcile_duration_seconds": 10 + 1 + 3,    # buckets, +Inf, _count _sum _created
    "finetune_operator_reconcile_errors": 0,                       # a kind appears with its first error
    "finetune_operator_workload_restarts": 2 * len(RESTART_REASONS),  # _total and _created per reason
    "finetune_operator_children_recreated": 2 * len(CHILD_TRIMS),     # _total and _created per kind
}
OPERATOR_IDLE_SERIES = sum(OPERATOR_IDLE.values())
#: Series of one trainer pod, per family (no labels of their own: the PodMonitor adds the target's).
TRAINER = {
    "finetune_trainer_step": 1, "finetune_trainer_total_steps": 1, "finetune_trainer_epoch": 1,
    "finetune_trainer_loss": 1, "finetune_trainer_eval_loss": 1, "finetune_trainer_learning_rate": 1,
    "finetune_trainer_tokens_per_second": 1, "finetune_trainer_gpu_memory_allocated_bytes": 1,
    "finetune_trainer_tokens_processed": 2,  # _total and _created
    "finetune_trainer_cache_size_bytes": 1,
    # The model cache's counters come from a custom collector: _total only.
    "finetune_trainer_cache_hits": 1, "finetune_trainer_cache_misses": 1,
    "finetune_trainer_cache_discarded": 1, "finetune_trainer_cache_evicted": 1,
}
TRAINER_SERIES = sum(TRAINER.values())


def series_by_family(text: str, prefix: str) -> dict[str, int]:
    """Series per metric family; a counter's or histogram's `_created` (its own family in the text
    format) counts with its family."""
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(prefix):
            name = family.name.removesuffix("_created")
            out[name] = out.get(name, 0) + len({(s.name, tuple(sorted(s.labels.items()))) for s in family.samples})
    return out


@needs_promtool
@pytest.mark.parametrize("who", ["operator", "trainer"])
def test_served_metrics_pass_promtool_check_metrics(who: str) -> None:
    text = operator_metrics_text() if who == "operator" else trainer_metrics_text()
    proc = promtool("check", "metrics", input=text)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), \
        f"promtool check metrics on the {who}'s /metrics:\n{proc.stdout}{proc.stderr}"


def test_idle_operator_series() -> None:
    assert series_by_family(operator_metrics_text(), "finetune_operator_") == OPERATOR_IDLE
    assert OPERATOR_IDLE_SERIES == 33


def test_operator_series_do_not_grow_with_jobs() -> None:
    """A thousand jobs in every phase, restarts of every reason and a reconcile error: the only new
    series are the error's kind (bounded by the exception types the operator can raise)."""
    metrics = OperatorMetrics()
    for i in range(1000):
        metrics.set_phase(f"ns-{i % 7}/job-{i}", Phase.ALL[i % len(Phase.ALL)])
        metrics.reconcile_duration.observe(0.01 * (i % 50))
    for reason in RESTART_REASONS:
        metrics.restarts.labels(reason=reason).inc()
    metrics.reconcile_errors.labels(kind="ApiException").inc()
    server = metrics.serve(0, "127.0.0.1")
    try:
        text = scrape(int(server.server_port))
    finally:
        server.shutdown()
        server.server_close()
    assert series_by_family(text, "finetune_operator_") == OPERATOR_IDLE | {"finetune_operator_reconcile_errors": 2}
    counts = {s.labels["phase"]: s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "finetune_operator_jobs"}
    assert sum(counts.values()) == 1000


def test_trainer_series_per_pod() -> None:
    assert series_by_family(trainer_metrics_text(), "finetune_trainer_") == TRAINER
    assert TRAINER_SERIES == 15
