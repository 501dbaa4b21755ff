"""Saving the artifact locally, then publishing it with manifest.json written last.

Layout of an artifact (under the output URI):
  adapter_model.safetensors, adapter_config.json   PEFT methods with save "adapter"
  model.safetensors (or shards), config.json ...   full fine-tuning
  tokenizer files                                  always
  merged/                                          LoRA-family with save "merged": base + adapter
  metrics.json                                     base and tuned evalLoss/perplexity, training
  manifest.json                                    LAST: every file's sha256 and size, the spec,
                                                   library versions, base model identity
Publishing goes through `finetune_trainer.storage.publish`, which uploads every file before the
manifest, so a prefix with a manifest is complete.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from finetune_api.constants import MERGED_DIR, METRICS_FILE
from finetune_api.spec import LORA_FAMILY, FineTuneJobSpec
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


def save_model(model: Any, tokenizer: Any, stage: Path, spec: FineTuneJobSpec) -> None:
    """The trained weights (adapter or full model) and the tokenizer, into `stage`."""
    stage.mkdir(parents=True, exist_ok=True)
    save = spec.output.save or []
    if spec.method.type == "full" or "adapter" in save:
        model.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)


def save_merged(adapter_dir: Path, base_loader: Any, stage: Path, tokenizer: Any) -> Path:
    """Base + adapter as one full model under stage/merged/.

    The base is loaded afresh in full precision (`base_loader()`), so QLoRA adapters merge into
    dequantized weights and the trained model in memory is left untouched.
    """
    from peft import PeftModel

    base = base_loader()
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out = stage / MERGED_DIR
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def wants_merged(spec: FineTuneJobSpec) -> bool:
    return spec.method.type in LORA_FAMILY and "merged" in (spec.output.save or [])


def write_metrics(stage: Path, metrics: dict[str, Any]) -> Path:
    path = stage / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def publish(stage: Path, output_uri: str, spec: FineTuneJobSpec, base_model: dict[str, Any]) -> tuple[Manifest, Artifact]:
    """Every staged file to the output URI, then manifest.json."""
    return storage.publish(
        stage, output_uri, kind="artifact", spec=spec.wire(), base_model=base_model, versions=versions()
    )
