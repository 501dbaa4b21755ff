"""Saving the artifact locally, then publishing it with manifest.json written last.

Layout of an artifact (under the output URI):
  adapter_model.safetensors, adapter_config.json   PEFT methods with save "adapter"
  model.safetensors (or shards), config.json ...   full fine-tuning
  tokenizer files                                  always
  merged/                                          PEFT (not prompt learning) with save "merged"
  metrics.json                                     base and tuned evalLoss/perplexity, training
  manifest.json                                    LAST: every file's sha256 and size, the spec,
                                                   library versions, base model identity
Publishing goes through `finetune_trainer.storage.publish`, which uploads every file before the
manifest, so a prefix with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune_api.constants import MERGED_DIR, METRICS_FILE
from finetune_api.spec import PROMPT_LEARNING, FineTuneJobSpec
from finetune_api.status import Artifact, Manifest

from . import storage

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "safetensors")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in (*LIBRARIES, "finetune-operator"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def save_model(model: Any, tokenizer: Any, stage: Path, spec: FineTuneJobSpec, trainer: Any = None) -> bool:
    """The trained weights (adapter or full model) and the tokenizer, into `stage`.

    False where this rank wrote no weights although they were due (ZeRO-3, not the main process).
    """
    stage.mkdir(parents=True, exist_ok=True)
    save = spec.output.save or []
    wrote = True
    if spec.method.type == "full" or "adapter" in save:
        wrote = save_weights(model, stage, trainer)
    tokenizer.save_pretrained(stage)
    return wrote


def save_weights(model: Any, directory: Path, trainer: Any = None) -> bool:
    """`model.save_pretrained(directory)`; False where this rank wrote nothing (see below).

    Where each rank holds only part of every parameter, save_pretrained of the model cannot write
    the artifact: under DeepSpeed ZeRO-3 it writes empty tensors (deepspeed 0.19, transformers
    5.24); under FSDP2 (DTensor shards) it fails on CPU ("Attempted to access the data pointer on
    an invalid python storage", torch 2.14) and would otherwise write one rank's shards. The
    Trainer's save_model gathers the full weights instead (ZeRO-3:
    stage3_gather_16bit_weights_on_model_save; FSDP2: state_dict_type FULL_STATE_DICT, both set by
    distributed.py): a collective, so every rank must come here, and only the main process writes.
    """
    if trainer is None or not sharded(model):
        model.save_pretrained(directory, safe_serialization=True)
        return True
    trainer.save_model(str(directory))
    # The Trainer also pickles its TrainingArguments there: not part of an artifact.
    (directory / "training_args.bin").unlink(missing_ok=True)
    return bool(trainer.args.should_save)


def sharded(model: Any) -> bool:
    """Whether the model's parameters are split across ranks (DeepSpeed ZeRO-3, FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_numel") or isinstance(p, DTensor) for p in model.parameters())


def save_merged(adapter_dir: Path, base_loader: Any, stage: Path, tokenizer: Any) -> Path:
    """Base + adapter as one full model under stage/merged/.

    The base is loaded afresh in full precision (`base_loader()`), so QLoRA adapters merge into
    dequantized weights and the trained model in memory is left untouched.
    """
    from peft import PeftModel

    with _without_zero3_init():
        base = base_loader()
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out = stage / MERGED_DIR
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def _without_zero3_init() -> Iterator[None]:
    """Build models in full, in this process alone, also while a DeepSpeed ZeRO-3 run is configured.

    transformers 5.24 builds every model under deepspeed.zero.Init while its global ZeRO-3 config
    is set (integrations/deepspeed.py, is_deepspeed_zero3_enabled): that partitions the weights
    with a collective the other ranks never join, and the merge (main process only) would hang.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None  # what unset_hf_deepspeed_config() does
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def wants_merged(spec: FineTuneJobSpec) -> bool:
    """Whether merged/ (base + adapter as full weights) is due: any PEFT method the API lets merge
    (all but prompt learning, whose virtual tokens cannot be merged; it rejects those)."""
    return spec.method.is_peft and spec.method.type not in PROMPT_LEARNING and "merged" in (spec.output.save or [])


def write_metrics(stage: Path, metrics: dict[str, Any]) -> Path:
    path = stage / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def publish(stage: Path, output_uri: str, spec: FineTuneJobSpec, base_model: dict[str, Any]) -> tuple[Manifest, Artifact]:
    """Every staged file to the output URI, then manifest.json."""
    return storage.publish(
        stage, output_uri, kind="artifact", spec=spec.wire(), base_model=base_model, versions=versions()
    )
