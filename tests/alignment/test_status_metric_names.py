"""status.metrics carries only the names of finetune_api.status.StatusMetric (fast, no model)."""

from __future__ import annotations

import pytest
from finetune_api.status import StatusMetric


def test_only_status_metric_names_reach_the_termination_message(caplog: pytest.LogCaptureFixture) -> None:
    from finetune_trainer.entrypoint import summary_metrics

    out = summary_metrics({"tuned": {"evalLoss": 0.5, "perplexity": 1.6}, "train": {"steps": 3},
                           "summary": {"rewardMargin": 0.8, "rewardMarginTypo": 0.9}})
    assert out == {StatusMetric.EVAL_LOSS: 0.5, StatusMetric.PERPLEXITY: 1.6, StatusMetric.STEPS: 3.0,
                   StatusMetric.REWARD_MARGIN: 0.8}
    assert "'rewardMarginTypo' is not a StatusMetric name" in caplog.text


def test_generation_and_continual_headlines_are_status_metric_names() -> None:
    from finetune_trainer import continual
    from finetune_trainer.evaluation import generation

    assert set(generation.headline(dict.fromkeys(generation.HEADLINE, 1.0))) <= set(StatusMetric)
    section = {"earlierTaskLossBefore": 1.0, "earlierTaskLossAfter": 1.2, "forgetting": 0.2, "distanceFromStart": 3.0}
    assert set(continual.summary(section)) == set(section)
