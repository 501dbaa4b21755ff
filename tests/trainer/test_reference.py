"""Our lora recipe gives, step for step, the loss of a plain TRL SFTTrainer script."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from finetune_api import parse_spec
from finetune_trainer.runner import Overrides, run_job

SEED = 11
STEPS = 8


def _plain_trl(model_dir: Path, train_file: Path, eval_file: Path, out: Path) -> list[float]:
    """What a user would write by hand with TRL (no finetune_trainer code)."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = load_dataset("json", data_files={"train": str(train_file), "eval": str(eval_file)})
    args = SFTConfig(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=1.0, seed=SEED, data_seed=SEED, bf16=False, use_cpu=True, gradient_checkpointing=False,
        logging_steps=1, report_to="none", max_length=64, save_strategy="no", disable_tqdm=True,
    )
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"],
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_lora_recipe_matches_plain_trl_step_for_step(
    tiny_model_dir: Path, toy_rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in toy_rows[:40]))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in toy_rows[40:]))
    spec = parse_spec({
        "model": {"uri": str(tiny_model_dir)},
        "dataset": {"train": str(train_file), "validation": str(eval_file), "format": "prompt_completion",
                    "maxSeqLength": 64},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "hyperparameters": {"maxSteps": STEPS, "batchSize": 4, "learningRate": 5e-3, "scheduler": "cosine",
                            "warmupRatio": 0.1, "seed": SEED},
        "resources": {"gpusPerNode": 0},
        "evaluation": {"baseline": False},
        "output": {"uri": str(tmp_path / "ours")},
    })
    ours = run_job(spec, None, Overrides(progress=False, serve_metrics=False, workdir=tmp_path / "work"))
    our_losses = [h["loss"] for h in ours.recipe.trainer.state.log_history if "loss" in h]
    reference = _plain_trl(tiny_model_dir, train_file, eval_file, tmp_path / "trl")
    assert len(our_losses) == len(reference) == STEPS
    for step, (a, b) in enumerate(zip(our_losses, reference, strict=True), start=1):
        assert abs(a - b) <= 1e-4, f"step {step}: ours {a} vs TRL {b}\nours {our_losses}\ntrl  {reference}"
    assert our_losses[-1] < our_losses[0]
