"""Reward model then PPO-style RL (TRL GRPO) against it, on the tiny model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from finetune_api.constants import METRICS_FILE
from finetune_api.resource import parse_spec
from finetune_trainer.runner import Overrides, RunResult, run_job

QUIET = Overrides(serve_metrics=False, progress=False)


@pytest.fixture(scope="module")
def reward_run(make_spec: Callable[..., dict[str, Any]], toy_data_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    out = tmp_path_factory.mktemp("reward") / "artifact"
    spec = make_spec(
        out,
        dataset={"train": str(toy_data_dir / "preference.jsonl"), "format": "preference", "validationSplit": 0.25},
        method={"type": "full"},
        objective={"type": "reward"},
        hyperparameters={"maxSteps": 10, "batchSize": 8, "learningRate": 3e-3, "scheduler": "constant",
                         "warmupRatio": 0.0, "seed": 7},
    )
    return run_job(parse_spec(spec), overrides=QUIET)


def test_reward_model_ranks_held_out_pairs(reward_run: RunResult) -> None:
    m = reward_run.metrics
    # 12 held-out pairs never seen in training: chance is 0.5.
    assert m["tuned"]["accuracy"] >= 0.9
    assert m["tuned"]["rewardMargin"] > 0
    assert m["tuned"]["evalLoss"] < m["base"]["evalLoss"]
    out = Path(reward_run.output_uri)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id is not None
    assert json.loads((out / METRICS_FILE).read_text())["summary"]["rewardAccuracy"] == m["tuned"]["accuracy"]


def test_ppo_raises_reward_and_reports_kl(reward_run: RunResult, make_spec: Callable[..., dict[str, Any]],
                                          toy_data_dir: Path, tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path / "policy",
        dataset={"train": str(toy_data_dir / "prompt_completion.jsonl"), "format": "prompt_completion",
                 "validationSplit": 0.25},
        objective={"type": "ppo", "ppo": {"rewardModel": reward_run.output_uri, "klCoef": 0.05,
                                          "responseLength": 8, "ppoEpochs": 1, "temperature": 1.0}},
        hyperparameters={"maxSteps": 16, "batchSize": 8, "learningRate": 2e-2, "scheduler": "constant",
                         "warmupRatio": 0.0, "seed": 7},
    )
    m = run_job(parse_spec(spec), overrides=QUIET).metrics
    r = m["rollouts"]
    assert len(r["rewardCurve"]) == 16
    assert r["lastRewards"] > r["firstRewards"], r["rewardCurve"]
    assert m["tuned"]["heldOutReward"] > m["base"]["heldOutReward"]
    # KL to the starting policy is reported, and the policy did move away from it.
    assert r["finalKl"] > 0 and "finalKl" in m["summary"]
    assert m["objective"]["trainer"] == "trl.GRPOTrainer"
