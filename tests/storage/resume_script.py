"""A small HF Trainer run with CheckpointSync, driven as a subprocess by the resume tests.

Prints `STEP n` after every optimizer step (flushed) so the test can preempt it at a chosen
step; CheckpointSync exits with ExitCode.PREEMPTED after SIGTERM. On success it
writes the final weights and the per-step losses to --result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from finetune_trainer.checkpointing import CheckpointSync, restore_latest
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

VOCAB, LENGTH, ROWS = 96, 24, 64


class TokenRows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Fixed random sequences (a repeated pattern per row, so the loss really falls)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        base = torch.randint(0, VOCAB, (ROWS, 6), generator=g)
        self.ids = base.repeat(1, LENGTH // 6)

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "labels": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
        }


class Report(TrainerCallback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        print(f"STEP {state.global_step}", flush=True)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoints", required=True)
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--result", required=True, type=Path)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--save-steps", type=int, default=5)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()

    torch.manual_seed(a.seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(a.workdir / "hf"),
        max_steps=a.max_steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        warmup_steps=3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=a.save_steps,
        save_total_limit=2,
        seed=a.seed,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    sync = CheckpointSync(a.checkpoints, keep=a.keep)
    report = Report()
    trainer = Trainer(model=model, args=args, train_dataset=TokenRows(), callbacks=[sync, report])
    resume = restore_latest(a.checkpoints, a.workdir / "restore")
    print(f"RESUME {resume.name.rsplit('-', 1)[-1] if resume else 'none'}", flush=True)
    # On SIGTERM, CheckpointSync publishes a checkpoint and raises SystemExit(ExitCode.PREEMPTED).
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, a.result.with_suffix(".pt"))
    a.result.write_text(json.dumps({"losses": report.losses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
