"""Spec -> TRL/transformers configuration objects: the one way from the spec to a trainer's args.

`shared_training_args` decides every TrainingArguments field the objectives share; a recipe adds
only its own arguments and builds its TRL config class with `build_config`, which refuses names
the installed versions do not take. TRL's configs default to bf16 and gradient checkpointing on;
both are wrong on a CPU (bf16 autocast is emulated and ~20x slower, see ML-FINDINGS). Every such
default is set here from the spec, never left to the library.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from finetune_api.spec import FineTuneJobSpec

from . import distributed

C = TypeVar("C")


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


def shared_training_args(
    spec: FineTuneJobSpec,
    output_dir: Path,
    precision: Precision,
    *,
    max_steps: int | None = None,
    has_eval: bool = True,
    count_tokens: bool = True,
) -> dict[str, Any]:
    """The TrainingArguments every objective takes from the spec, as keyword arguments.

    `max_steps` overrides the spec (CLI --max-steps); `has_eval`: the trainer gets held-out
    data to evaluate every evaluation.everySteps; `count_tokens`: the batches hold input_ids
    the Trainer can count (not so for paired chosen/rejected batches).
    """
    hp = spec.hyperparameters
    steps = max_steps if max_steps is not None else hp.max_steps
    eval_every = spec.evaluation.every_steps if has_eval else None
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": hp.epochs,
        "max_steps": steps if steps is not None else -1,
        "per_device_train_batch_size": hp.batch_size,
        "per_device_eval_batch_size": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": hp.scheduler,
        # transformers 5 has no warmup_ratio: a float < 1 in warmup_steps is a ratio of the total steps.
        "warmup_steps": float(hp.warmup_ratio),
        "weight_decay": hp.weight_decay,
        "optim": hp.optimizer,
        "max_grad_norm": hp.max_grad_norm,
        "activation_checkpointing": hp.gradient_checkpointing,
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
        "eval_strategy": "steps" if eval_every else "no",
        "eval_steps": eval_every,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding" if count_tokens else "no",
        "save_only_model": False,
    }
    # DDP / FSDP2 / DeepSpeed settings from spec.distributed (distributed.py).
    kwargs.update(distributed.training_args_kwargs(spec))
    return kwargs


def build_config(config_cls: type[C], shared: Mapping[str, Any], own: Mapping[str, Any]) -> C:
    """`config_cls(**shared, **own)`, failing loudly on a name the installed version does not take.

    A TRL/transformers upgrade that renames or removes an argument must stop the build, not drop
    the setting: unknown names raise, and so does a deprecation warning that names one of ours
    (the old name still works, but only until the next release). `own` (the objective's own
    arguments) may not repeat a shared one.
    """
    import transformers
    import trl

    versions = f"transformers {transformers.__version__}, trl {trl.__version__}"
    clash = sorted(set(shared) & set(own))
    if clash:
        raise TypeError(f"{config_cls.__name__}: {', '.join(clash)} set by both the shared arguments and the recipe")
    kwargs = {**shared, **own}
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{config_cls.__name__} ({versions}) has no argument {', '.join(unknown)}: renamed or removed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = config_cls(**kwargs)
    for w in caught:
        named = [n for n in kwargs if f"`{n}`" in str(w.message)]
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and named:
            raise TypeError(f"{config_cls.__name__} ({versions}): argument {named[0]} is deprecated: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return cfg
