"""Spec -> TRL/transformers configuration objects.

TRL's SFTConfig defaults to bf16=True and gradient checkpointing on; both are wrong on a CPU
(bf16 autocast is emulated and ~20x slower, see ML-FINDINGS). Every such default is set here from
the spec, never left to the library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from finetune_api.spec import FineTuneJobSpec

from . import distributed


@dataclass(frozen=True)
class Precision:
    """What dtype the run uses, decided once from the spec and the hardware."""

    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    bf16: bool
    fp16: bool


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(spec: FineTuneJobSpec) -> Precision:
    """fp32 on CPU; bf16 only on a CUDA device that supports it (unless the spec says otherwise)."""
    on_cuda = torch.cuda.is_available() and spec.resources.gpus_per_node > 0
    requested = spec.model.dtype
    if requested == "auto":
        requested = "bfloat16" if on_cuda and _cuda_bf16() else "float32"
    if not on_cuda and requested != "float32":
        # Half precision on CPU is emulated; it is only slower, never what the user wants.
        requested = "float32"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    return Precision(
        device="cuda" if on_cuda else "cpu",
        dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )


def total_steps_hint(spec: FineTuneJobSpec, train_rows: int, world_size: int = 1) -> int:
    """Optimizer steps the run will take (used by AdaLoRA's total_step and the progress bar)."""
    hp = spec.hyperparameters
    if hp.max_steps is not None:
        return hp.max_steps
    per_step = hp.batch_size * hp.gradient_accumulation * world_size
    steps_per_epoch = max(1, -(-train_rows // per_step))
    return max(1, int(steps_per_epoch * hp.epochs + 0.999999))


def sft_config(
    spec: FineTuneJobSpec,
    output_dir: Path,
    precision: Precision,
    *,
    max_steps: int | None = None,
    has_eval: bool = True,
    extra: dict[str, Any] | None = None,
) -> Any:
    """The SFTConfig for a run; `max_steps` overrides the spec (CLI --max-steps)."""
    from trl import SFTConfig

    hp = spec.hyperparameters
    steps = max_steps if max_steps is not None else hp.max_steps
    eval_every = spec.evaluation.every_steps
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": hp.epochs,
        "max_steps": steps if steps is not None else -1,
        "per_device_train_batch_size": hp.batch_size,
        "per_device_eval_batch_size": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": hp.scheduler,
        # transformers 5 reads a float < 1 in warmup_steps as a ratio of the total steps.
        "warmup_steps": float(hp.warmup_ratio),
        "weight_decay": hp.weight_decay,
        "optim": hp.optimizer,
        "max_grad_norm": hp.max_grad_norm,
        "gradient_checkpointing": hp.gradient_checkpointing,
        "seed": hp.seed,
        "data_seed": hp.seed,
        "bf16": precision.bf16,
        "fp16": precision.fp16,
        "use_cpu": precision.device == "cpu",
        "logging_steps": 1,
        "logging_strategy": "steps",
        "report_to": "none",
        "disable_tqdm": True,  # our own progress bar (progress.py) shows step, loss, tokens/s, ETA
        "save_strategy": "steps",
        "save_steps": spec.checkpointing.every_steps,
        "save_total_limit": spec.checkpointing.keep,
        "eval_strategy": "steps" if (eval_every and has_eval) else "no",
        "eval_steps": eval_every,
        "max_length": spec.dataset.max_seq_length,
        "packing": spec.dataset.packing,
        "packing_strategy": "bfd",
        # Datasets arrive tokenized with labels (data.py builds the loss masks itself).
        "dataset_kwargs": {},
        "remove_unused_columns": True,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
        "save_only_model": False,
    }
    # DDP / FSDP2 / DeepSpeed settings from spec.distributed (distributed.py).
    kwargs.update(distributed.training_args_kwargs(spec))
    if extra:
        kwargs.update(extra)
    return SFTConfig(**kwargs)
