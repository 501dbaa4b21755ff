"""A LoRA reward model saved as adapter and merged/ (recipes/base.save, the one save of every recipe)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from finetune_api.constants import MERGED_DIR
from finetune_api.resource import parse_spec
from finetune_trainer.runner import Overrides, run_job


def test_lora_reward_model_merged_scores_as_the_adapter(make_spec: Callable[..., dict[str, Any]],
                                                       toy_data_dir: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "reward"
    spec = make_spec(
        out,
        dataset={"train": str(toy_data_dir / "preference.jsonl"), "format": "preference"},
        objective={"type": "reward"},
        hyperparameters={"maxSteps": 4},
        evaluation={"baseline": False},
    )
    spec["output"]["save"] = ["adapter", "merged"]
    run_job(parse_spec(spec), overrides=Overrides(serve_metrics=False, progress=False))
    tokenizer = AutoTokenizer.from_pretrained(out / MERGED_DIR)
    batch = tokenizer(["What color is the sky? The sky is blue.", "What color is the fox? I do not know."],
                      return_tensors="pt", padding=True)
    merged = AutoModelForSequenceClassification.from_pretrained(out / MERGED_DIR, dtype=torch.float32).eval()
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_scores = merged(**batch).logits
        adapter_scores = adapter(**batch).logits
    assert merged_scores.shape == (2, 1)
    # The trained head (modules_to_save) is in merged/, not a freshly initialised one.
    torch.testing.assert_close(merged_scores, adapter_scores, atol=1e-4, rtol=0)
