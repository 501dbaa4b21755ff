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


def _jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_ppo_raises_reward_and_reports_kl(make_spec: Callable[..., dict[str, Any]], toy_data_dir: Path,
                                          tmp_path: Path) -> None:
    """A policy that answers "The <thing> is <color>." learns to say red, which the reward model prefers."""
    from harness.model_plugin import toy_facts

    hp = {"batchSize": 8, "scheduler": "constant", "warmupRatio": 0.0, "seed": 7}
    policy = tmp_path / "sft"
    run_job(parse_spec(make_spec(policy, method={"type": "full"},
                                 hyperparameters={**hp, "maxSteps": 30, "learningRate": 3e-3})), overrides=QUIET)
    prefs = _jsonl(tmp_path / "red.jsonl", [
        {"prompt": f"What color is the {t}?", "chosen": f" The {t} is red.",
         "rejected": f" The {t} is {c if c != 'red' else 'blue'}."} for t, c in toy_facts()])
    rm = tmp_path / "rm"
    run_job(parse_spec(make_spec(rm, dataset={"train": str(prefs), "format": "preference"}, method={"type": "full"},
                                 objective={"type": "reward"},
                                 hyperparameters={**hp, "maxSteps": 15, "learningRate": 3e-3})), overrides=QUIET)
    spec = make_spec(
        tmp_path / "policy",
        model={"uri": str(policy)},
        objective={"type": "ppo", "ppo": {"rewardModel": str(rm), "klCoef": 0.05,
                                          "responseLength": 8, "ppoEpochs": 1, "temperature": 1.0}},
        hyperparameters={**hp, "maxSteps": 16, "learningRate": 2e-2},
    )
    m = run_job(parse_spec(spec), overrides=QUIET).metrics
    r = m["rollouts"]
    print("PPO", json.dumps(r), m["base"], m["tuned"])
    assert len(r["rewardCurve"]) == 16
    assert r["lastRewards"] > r["firstRewards"] + 0.2, r["rewardCurve"]
    # Greedy answers to held-out prompts score higher with the reward model than the start's did.
    assert m["tuned"]["heldOutReward"] > m["base"]["heldOutReward"] + 0.3
    # KL to the starting policy is reported, and the policy did move away from it.
    assert r["finalKl"] > 0 and "finalKl" in m["summary"]
    assert m["objective"]["trainer"] == "trl.GRPOTrainer"
