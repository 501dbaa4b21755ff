"""One builder per method: the spec's parameter block -> PEFT's own config class.

`full` trains every weight (no PEFT). LoRA-family methods default to every linear layer
("all-linear", which leaves lm_head alone); IA3 defaults to PEFT's per-architecture modules.
AdaLoRA needs `total_step` and a callback that calls `update_and_allocate` after each optimizer
step (the Trainer never does; without it AdaLoRA silently trains as plain LoRA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune_api.spec import FineTuneJobSpec, MethodSpec
from transformers import TrainerCallback

from .errors import ConfigError

CAUSAL_LM = "CAUSAL_LM"


def lora(m: MethodSpec, **_: Any) -> Any:
    from peft import LoraConfig

    p = m.lora
    assert p is not None
    return LoraConfig(
        task_type=CAUSAL_LM,
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=p.target_modules or "all-linear",
        modules_to_save=p.modules_to_save,
        use_rslora=p.rs_lora,
        use_dora=m.type == "dora",
        bias=p.bias,
    )


def adalora(m: MethodSpec, *, total_steps: int, **_: Any) -> Any:
    from peft import AdaLoraConfig

    p = m.adalora
    assert p is not None
    if p.tinit >= total_steps - p.tfinal:
        raise ConfigError(
            f"method.adalora: tinit ({p.tinit}) + tfinal ({p.tfinal}) leave no steps for rank allocation "
            f"in a run of {total_steps} steps"
        )
    return AdaLoraConfig(
        task_type=CAUSAL_LM,
        init_r=p.init_r,
        target_r=p.target_r,
        tinit=p.tinit,
        tfinal=p.tfinal,
        deltaT=p.delta_t,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=p.target_modules or "all-linear",
        orth_reg_weight=p.orth_reg_weight,
        total_step=total_steps,
    )


def ia3(m: MethodSpec, **_: Any) -> Any:
    from peft import IA3Config

    p = m.ia3
    assert p is not None
    return IA3Config(task_type=CAUSAL_LM, target_modules=p.target_modules, feedforward_modules=p.feedforward_modules)


def prefix(m: MethodSpec, **_: Any) -> Any:
    from peft import PrefixTuningConfig

    p = m.prompt_learning
    assert p is not None
    kwargs: dict[str, Any] = {"prefix_projection": p.prefix_projection}
    if p.encoder_hidden_size is not None:
        kwargs["encoder_hidden_size"] = p.encoder_hidden_size
    return PrefixTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens, **kwargs)


def prompt(m: MethodSpec, *, tokenizer_path: str, **_: Any) -> Any:
    from peft import PromptTuningConfig

    p = m.prompt_learning
    assert p is not None
    if p.init_text is None:
        return PromptTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens)
    return PromptTuningConfig(
        task_type=CAUSAL_LM,
        num_virtual_tokens=p.num_virtual_tokens,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=p.init_text,
        tokenizer_name_or_path=tokenizer_path,
    )


def ptuning(m: MethodSpec, **_: Any) -> Any:
    from peft import PromptEncoderConfig

    p = m.prompt_learning
    assert p is not None
    kwargs: dict[str, Any] = {}
    if p.encoder_hidden_size is not None:
        kwargs["encoder_hidden_size"] = p.encoder_hidden_size
    return PromptEncoderConfig(task_type=CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens, **kwargs)


BUILDERS: dict[str, Callable[..., Any]] = {
    "lora": lora,
    "qlora": lora,
    "dora": lora,
    "adalora": adalora,
    "ia3": ia3,
    "prefix": prefix,
    "prompt": prompt,
    "ptuning": ptuning,
}


def peft_config(spec: FineTuneJobSpec, *, total_steps: int, tokenizer_path: str) -> Any | None:
    """PEFT config for the spec's method, or None for full fine-tuning."""
    if spec.method.type == "full":
        return None
    return BUILDERS[spec.method.type](spec.method, total_steps=total_steps, tokenizer_path=tokenizer_path)


def apply(model: Any, config: Any | None) -> Any:
    """The model to train: wrapped by PEFT, or itself (all weights trainable) for full."""
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, config)


class AdaLoraAllocator(TrainerCallback):  # type: ignore[misc]
    """Reallocates AdaLoRA's rank budget after every optimizer step, before gradients are zeroed."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        target = model
        while target is not None and not hasattr(target, "base_model"):
            target = getattr(target, "module", None)  # unwrap DDP
        if target is None:
            raise RuntimeError("AdaLoRA callback: the trained model is not a PeftModel")
        # global_step is incremented after this event, so this is the step being finished.
        target.base_model.update_and_allocate(state.global_step)


def callbacks(spec: FineTuneJobSpec) -> list[Any]:
    """Trainer callbacks the method needs."""
    return [AdaLoraAllocator()] if spec.method.type == "adalora" else []


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT's print_trainable_parameters counts them."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
