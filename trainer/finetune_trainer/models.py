"""Loading the base model and its tokenizer from the spec.

Sources: a local folder (`/abs`, `./relative`, `file://`), `s3://` or `pvc://` (copied locally by
the storage layer), or a Hugging Face id read through the local cache only when HF_HUB_OFFLINE is
set (tests and air-gapped clusters). `ggufFile` loads a GGUF file inside the folder, dequantized.
QLoRA loads the base weights with bitsandbytes (4-bit NF4/FP4 or 8-bit) and prepares them for k-bit
training (frozen, norms in fp32, input grads for checkpointing).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from finetune_api.spec import FineTuneJobSpec, ModelSpec

from . import attention, uris
from .config import Precision
from .errors import ConfigError, TrainerError, TransientError, is_network_failure


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    #: What the manifest records as the base model's identity.
    identity: dict[str, Any] = field(default_factory=dict)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _location(uri: str, workdir: Path, what: str) -> tuple[str, dict[str, Any]]:
    """(path or hub id, from_pretrained kwargs) for a model or tokenizer URI."""
    path = uris.resolve(uri, workdir / what)
    if path is not None:
        if not path.exists():
            raise ConfigError(f"{what} {uri}: no such file or folder")
        return str(path), {}
    kwargs: dict[str, Any] = {}
    if _offline():
        kwargs["local_files_only"] = True
    return uris.hf_id(uri), kwargs


def load_error(what: str, exc: OSError) -> TrainerError:
    """A failed from_pretrained: retryable when the hub could not be reached (DNS, refused,
    timeout), else a permanent ConfigError (no such model, not in the offline cache)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_network_failure(exc):
        return TransientError(f"{what}: cannot reach the model hub (will be retried): {first}")
    return ConfigError(f"{what}: cannot load: {exc}")


def quantization_config(spec: ModelSpec, precision: Precision) -> Any:
    from transformers import BitsAndBytesConfig

    q = spec.quantization
    assert q is not None
    compute = {
        "auto": torch.bfloat16 if precision.device == "cuda" and precision.bf16 else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[q.compute_dtype]
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_tokenizer(spec: ModelSpec, workdir: Path, model_path: str | None = None) -> Any:
    """`model_path`: the model's folder, already fetched; the tokenizer is read from it when the
    spec names no tokenizer of its own (instead of downloading the model a second time)."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any]
    if model_path is not None and spec.tokenizer is None and os.path.isdir(model_path):
        where, kwargs = model_path, {}
    else:
        where, kwargs = _location(spec.tokenizer or spec.uri, workdir, "tokenizer")
    if spec.gguf_file and spec.tokenizer is None:
        kwargs["gguf_file"] = spec.gguf_file
    if spec.revision and spec.tokenizer is None:
        kwargs["revision"] = spec.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=spec.trust_remote_code, **kwargs)
    except OSError as exc:
        raise load_error(f"tokenizer {spec.tokenizer or spec.uri}", exc) from None
    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    if tokenizer.pad_token is None:
        # Padding tokens carry label -100, so reusing EOS for padding does not teach anything wrong.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: FineTuneJobSpec, precision: Precision, workdir: Path) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    m = spec.model
    where, kwargs = _location(m.uri, workdir, "model")
    if m.gguf_file:
        kwargs["gguf_file"] = m.gguf_file
    if m.revision:
        kwargs["revision"] = m.revision
    if m.quantization is not None:
        kwargs["quantization_config"] = quantization_config(m, precision)
        if precision.device == "cuda":
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=precision.dtype, trust_remote_code=m.trust_remote_code, **kwargs
        )
    except OSError as exc:
        raise load_error(f"model {m.uri}", exc) from None
    if spec.dataset.packing and getattr(model.config, "_attn_implementation", None) == "sdpa":
        # Padding-free packed rows: SDPA per example instead of over the whole row (attention.py).
        model.set_attn_implementation(attention.register())
    if m.quantization is not None:
        from peft import prepare_model_for_kbit_training

        keep_4bit_layout_on_cpu(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.hyperparameters.gradient_checkpointing
        )
    tokenizer = load_tokenizer(m, workdir, model_path=where)
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity(m, where, model))


def keep_4bit_layout_on_cpu(model: Any) -> None:
    """Keep bitsandbytes' 4-bit weights in their training layout on CPUs with AVX512-BF16.

    On such CPUs (Sapphire Rapids and later) a `Linear4bit` forward in eval mode without grad
    repacks its weight in place into an inference-only layout: that fails for rows shorter than
    its block (`shape '[32, 0]' is invalid`) and leaves a repacked weight behind for the training
    steps that follow the baseline evaluation. Training wants the one layout throughout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def identity(m: ModelSpec, where: str, model: Any) -> dict[str, Any]:
    """The base model as the manifest names it: URI, revision and a hash of its config."""
    out: dict[str, Any] = {"uri": m.uri, "architecture": type(model).__name__}
    if m.revision:
        out["revision"] = m.revision
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        out["commit"] = commit
    if m.gguf_file:
        out["ggufFile"] = m.gguf_file
    config_file = Path(where) / "config.json"
    if config_file.is_file():
        out["configSha256"] = hashlib.sha256(config_file.read_bytes()).hexdigest()
    if m.quantization is not None:
        out["quantization"] = m.quantization.wire()
    return out
