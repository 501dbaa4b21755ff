"""Packed rows without a variable-length kernel: SDPA per example (finetune_trainer.attention)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_api.resource import parse_spec
from finetune_trainer import attention
from finetune_trainer.runner import Overrides, run_job
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_segments_are_the_examples_of_a_flattened_row() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    assert attention.segments(pos) == [(0, 3), (3, 5), (5, 6), (6, 10)]
    # Not a packed row: one example, a real batch dimension, or no positions at all.
    assert attention.segments(torch.tensor([[0, 1, 2, 3]])) is None
    assert attention.segments(torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]])) is None
    assert attention.segments(None) is None


def _forward_backward(model_dir: Path, impl: str, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.set_attn_implementation(impl)
    model.train()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_packed_sdpa_computes_what_the_masked_row_computes(tiny_model_dir: Path, tiny_tokenizer_dir: Path) -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    texts = [("What color is the apple? The apple is red. " * (i % 4 + 1)).strip() for i in range(6)]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collator([{"input_ids": x} for x in ids])
    assert attention.segments(batch["position_ids"]) is not None
    name = attention.register()
    masked_logits, masked_grads = _forward_backward(tiny_model_dir, "sdpa", batch)
    packed_logits, packed_grads = _forward_backward(tiny_model_dir, name, batch)
    torch.testing.assert_close(packed_logits, masked_logits, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == masked_grads.keys() and packed_grads
    for key, grad in masked_grads.items():
        torch.testing.assert_close(packed_grads[key], grad, atol=1e-5, rtol=1e-4)
    # And each example gets the logits it has alone (no attention across examples).
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    start = 0
    with torch.no_grad():
        for x in ids:
            alone = model(input_ids=torch.tensor([x])).logits[0]
            torch.testing.assert_close(packed_logits[0, start:start + len(x)], alone, atol=1e-5, rtol=0)
            start += len(x)


@pytest.mark.parametrize("packing", [True, False])
def test_a_packing_run_trains_with_per_example_attention(
    packing: bool, make_spec: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    spec = parse_spec(make_spec(tmp_path / "out", dataset={"packing": packing},
                                hyperparameters={"maxSteps": 3, "batchSize": 4}))
    result = run_job(spec, overrides=Overrides(progress=False, serve_metrics=False, workdir=tmp_path / "scratch"))
    assert result.recipe is not None
    model = result.recipe.trainer.model
    assert model.config._attn_implementation == ("sdpa_packed" if packing else "sdpa")
    assert result.metrics["train"]["steps"] == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.recipe.trainer.state.log_history if "loss" in h)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() or any((tmp_path / "out").rglob("*.safetensors"))


def test_a_row_is_split_once_per_forward_and_again_when_its_positions_change() -> None:
    pos = torch.tensor([[0, 1, 0, 1, 2]])
    assert attention._segments_once(pos) == [(0, 2), (2, 5)]
    assert attention._segments_once(pos) is attention._segments_once(pos)  # later layers: no new split
    pos[0, 3:] = torch.tensor([0, 1])  # written in place: the same tensor now holds three examples
    assert attention._segments_once(pos) == [(0, 2), (2, 3), (3, 5)]
    assert attention._segments_once(torch.tensor([[0, 1, 2]])) is None
