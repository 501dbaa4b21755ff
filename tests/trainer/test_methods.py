"""Every method really fine-tunes: loss drops, the right parameters train, the artifact reloads.

One 20-step run per method on the tiny Llama (see tests/trainer/conftest.py), shared by the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_trainer.models import keep_4bit_layout_on_cpu
from harness.trainer_runs import LORA_FAMILY, METHODS, QUANT

METHOD_NAMES = list(METHODS)


def _losses(result: Any) -> list[float]:
    return [h["loss"] for h in result.recipe.trainer.state.log_history if "loss" in h]


def _batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    texts = ["What color is the apple? The apple is red.", "What color is the sky?"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def _load_base(spec: Any, name: str) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if name == "qlora4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8,
        )
    elif name == "qlora8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(spec.model.uri, dtype=torch.float32, **kwargs)
    # The tiny model's rows are shorter than bitsandbytes' CPU inference block (AVX512-BF16 CPUs).
    keep_4bit_layout_on_cpu(base)
    return base


def _reference_peft_config(name: str, tokenizer_dir: Path) -> Any:
    """The method's config built straight from PEFT's classes, independently of methods.py."""
    import peft

    if name in ("lora", "qlora4", "qlora8", "dora"):
        return peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                               target_modules="all-linear", use_dora=name == "dora")
    if name == "adalora":
        return peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=8, target_r=4, tinit=2, tfinal=4, deltaT=1,
                                  lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", total_step=20)
    if name == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM")
    if name == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
    if name == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                       prompt_tuning_init_text="Name the color.",
                                       tokenizer_name_or_path=str(tokenizer_dir))
    if name == "ptuning":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=32)
    raise AssertionError(name)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_goes_down(trained: Any, name: str) -> None:
    _spec, result = trained(name)
    losses = _losses(result)
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.01, f"{name}: loss did not drop: {losses}"
    assert result.metrics["tuned"]["evalLoss"] < result.metrics["base"]["evalLoss"], result.metrics


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_trainable_parameters_match_peft(trained: Any, name: str, tiny_model_dir: Path) -> None:
    spec, result = trained(name)
    counted = result.metrics["method"]["trainableParameters"]
    base = _load_base(spec, name)
    if name == "full":
        expected = sum(p.numel() for p in base.parameters())
    else:
        import peft

        expected, _ = peft.get_peft_model(base, _reference_peft_config(name, tiny_model_dir)).get_nb_trainable_parameters()
    assert counted == expected
    if name in QUANT:
        import bitsandbytes as bnb

        kind = bnb.nn.Linear4bit if name == "qlora4" else bnb.nn.Linear8bitLt
        assert any(isinstance(m, kind) for m in result.recipe.model.modules()), "base weights not quantized"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_artifact_reloads_with_same_logits(trained: Any, name: str) -> None:
    spec, result = trained(name)
    out = Path(spec.output.uri)
    tokenizer = result.recipe.tokenizer
    batch = _batch(tokenizer)
    in_memory = _logits(result.recipe.model, batch)
    if name == "full":
        from transformers import AutoModelForCausalLM

        assert (out / "model.safetensors").is_file()
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    else:
        from peft import PeftModel

        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
        reloaded = PeftModel.from_pretrained(_load_base(spec, name), out)
    # Quantized layers compute in a different order after a reload; the rest is bit-exact.
    atol = 2e-2 if name in QUANT else 1e-5
    torch.testing.assert_close(_logits(reloaded, batch), in_memory, atol=atol, rtol=0)


@pytest.mark.parametrize("name", LORA_FAMILY)
def test_merged_model_matches_adapter(trained: Any, name: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec, result = trained(name)
    out = Path(spec.output.uri)
    batch = _batch(result.recipe.tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    # The merge is into full-precision base weights, so compare with the adapter on those weights.
    fp_base = AutoModelForCausalLM.from_pretrained(spec.model.uri, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(fp_base, out)
    torch.testing.assert_close(_logits(merged, batch), _logits(adapter, batch), atol=1e-4, rtol=0)


def test_adalora_really_reallocates_ranks(trained: Any) -> None:
    _spec, result = trained("adalora")
    model = result.recipe.model
    config = model.peft_config["default"]
    assert config.rank_pattern, "update_and_allocate never ran: AdaLoRA trained as plain LoRA"
    ranks = {name: int(sum(mask)) for name, mask in config.rank_pattern.items()}
    assert all(r <= 8 for r in ranks.values())
    assert sum(ranks.values()) < 8 * len(ranks), f"no rank was pruned: {ranks}"
    # The masks are applied to the trained weights: pruned singular values are zero.
    zeros = sum(int((m.lora_E["default"] == 0).sum()) for m in model.modules() if hasattr(m, "lora_E") and "default" in m.lora_E)
    assert zeros == sum(8 - r for r in ranks.values())


@pytest.mark.parametrize("name", ["lora", "prefix"])
def test_base_scored_after_training_equals_base_scored_before(trained: Any, name: str, tmp_path: Path) -> None:
    """With a PEFT method the base evaluation runs after train() (adapter disabled) so that it
    does not delay the first step: its figures are those of the same evaluation before training."""
    from finetune_trainer.recipes import RecipeContext, sft

    spec, result = trained(name)
    after = result.metrics["base"]
    history = result.recipe.trainer.state.log_history
    scored = [i for i, h in enumerate(history) if "base_loss" in h]
    steps = [i for i, h in enumerate(history) if "loss" in h]
    assert len(scored) == 1 and scored[0] > steps[-1], "the base was scored before the first step"
    ctx = RecipeContext(spec=spec, output_uri=spec.output.uri, workdir=tmp_path, stage=tmp_path / "stage",
                        progress=False)
    s = sft.setup(ctx)
    trainer = sft.build_trainer(ctx, s)
    before = sft.evaluate(s, trainer, base=True)  # untrained: what the run scored before this change
    assert set(before) == set(after)
    for key in before:
        assert after[key] == pytest.approx(before[key], rel=1e-6, abs=0), key
    # And the base is not the tuned model: the figure is not the tuned one scored twice.
    assert result.metrics["tuned"]["evalLoss"] < after["evalLoss"]
