"""The memory plan against published measurements and against the trainer's own peak on CPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from finetune_api.quantity import parse_bytes
from finetune_trainer import memory_plan
from finetune_trainer.memory_plan import Setup, estimate

GIB = 2**30
MLP = ("gate_proj", "up_proj", "down_proj")


def _llama(**kw: Any) -> memory_plan.ModelShape:
    from transformers import LlamaConfig

    return memory_plan.shape_of(LlamaConfig(tie_word_embeddings=False, **kw))


@pytest.fixture(scope="module")
def llama31_8b() -> memory_plan.ModelShape:
    # Meta-Llama-3.1-8B config.json
    return _llama(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256)


@pytest.fixture(scope="module")
def llama31_70b() -> memory_plan.ModelShape:
    # Meta-Llama-3.1-70B config.json
    return _llama(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=128256)


def test_parameter_counts_are_the_published_ones(llama31_8b: memory_plan.ModelShape,
                                                 llama31_70b: memory_plan.ModelShape) -> None:
    # Counted on the meta device from the configs: 8.03B and 70.55B, as the model cards say (8B, 70B).
    assert llama31_8b.params == 8_030_261_248
    assert 70.5e9 < llama31_70b.params < 70.6e9


# Source: pytorch/torchtune README.md, "Memory and training speed":
#   "For ease of comparison, all the below numbers are provided for batch size 2 (without gradient
#   accumulation), a dataset packed to sequence length 2048, and torch compile enabled."
#   | Llama 3.1 8B | LoRA | 1x 4090 |  16.2 GiB | 3083 |
#   | Llama 3.1 8B | QLoRA | 1x 4090 | 7.4 GiB | 2413  |
#   | Llama 3.1 70B | LoRA | 8x A100 | 27.6 GiB  | 3497  |
# Each row's settings are those of its torchtune config (recipes/configs/llama3_1/):
#   8B_lora_single_device.yaml: lora_attn_modules ['q_proj', 'v_proj', 'output_proj'],
#     apply_lora_to_mlp True, lora_rank 8, lora_dropout 0.0, dtype bf16, AdamW,
#     enable_activation_checkpointing True, loss LinearCrossEntropyLoss (no logits held);
#   8B_qlora_single_device.yaml: lora_attn_modules ['q_proj', 'v_proj', 'k_proj', 'output_proj'],
#     apply_lora_to_mlp True, lora_rank 8, lora_dropout 0.0, NF4 (torchao, double-quantized
#     scalers), activation checkpointing, loss CEWithChunkedOutputLoss (bf16 logits held);
#   70B_lora.yaml (8 GPUs, FSDP): lora_attn_modules ['q_proj', 'v_proj', 'output_proj'],
#     apply_lora_to_mlp True, lora_rank 16, lora_dropout 0.0, activation checkpointing,
#     CEWithChunkedOutputLoss.
PUBLISHED = [
    ("llama31_8b", "LoRA 1x 4090", 16.2,
     dict(lora_r=8, lora_targets=("q_proj", "v_proj", "o_proj", *MLP), logit_bytes=0)),
    ("llama31_8b", "QLoRA 1x 4090", 7.4,
     dict(quant_bits=4, lora_r=8, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", *MLP), logit_bytes=2)),
    ("llama31_70b", "LoRA 8x A100", 27.6,
     dict(lora_r=16, lora_targets=("q_proj", "v_proj", "o_proj", *MLP), logit_bytes=2, world_size=8,
          strategy="fsdp")),
]


@pytest.mark.parametrize(("model", "row", "gib", "settings"), PUBLISHED, ids=[f"{m}-{r}" for m, r, _, _ in PUBLISHED])
def test_estimate_within_25_percent_of_published_peaks(request: pytest.FixtureRequest, model: str, row: str,
                                                       gib: float, settings: dict[str, Any]) -> None:
    shape = request.getfixturevalue(model)
    setup = Setup(shape, batch_size=2, seq_len=2048, lora_dropout=False, gradient_checkpointing=True, **settings)
    peak = estimate(setup).peak_bytes / GIB
    assert 0.75 * gib <= peak <= 1.25 * gib, f"{model} {row}: estimated {peak:.1f} GiB, published {gib} GiB"


def test_qlora_65b_fits_one_48gb_gpu() -> None:
    """QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314), abstract: "an efficient finetuning approach
    that reduces memory usage enough to finetune a 65B parameter model on a single 48GB GPU". Its
    setup (section 4 and Figure 6): LoRA r=64 on every linear layer, dropout 0.05 for 65B, NF4 with
    double quantization, adapters in BFloat16, gradient checkpointing, batch size 1 and sequence
    length 512, and paged optimizers, whose state moves to CPU RAM when the GPU runs short (modelled
    as offloaded). A bound, not a measurement: the peak must stay under 48 GB."""
    shape = _llama(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                   vocab_size=32000)  # LLaMA-65B
    plan = estimate(Setup(shape, batch_size=1, seq_len=512, quant_bits=4, double_quant=True, lora_r=64,
                          adapter_bytes=2.0, offload_optimizer=True, gradient_checkpointing=True))
    assert 30e9 < plan.weights < 40e9  # 4-bit blocks, 16-bit embeddings and head
    assert plan.weights < plan.peak_bytes < 48e9, memory_plan.gib(plan.peak_bytes)
    # ... and the same model in 16-bit with LoRA (no quantization) does not.
    assert not estimate(replace(plan.setup, quant_bits=None)).fits(48 * 10**9)


def test_more_gpus_with_sharding_need_less_each(llama31_8b: memory_plan.ModelShape) -> None:
    full = Setup(llama31_8b, batch_size=1, seq_len=1024, method="full", gradient_checkpointing=True)
    one = estimate(full).peak_bytes
    zero2 = estimate(replace(full, world_size=8, strategy="deepspeed", zero_stage=2)).peak_bytes
    fsdp = estimate(replace(full, world_size=8, strategy="fsdp")).peak_bytes
    ddp = estimate(replace(full, world_size=8)).peak_bytes
    assert ddp == one and fsdp < zero2 < one * 1.5  # ZeRO-2 keeps full weights but fp32 master states
    assert estimate(replace(full, batch_size=4)).activations == 4 * estimate(full).activations
    assert estimate(replace(full, gradient_checkpointing=False)).activations > 5 * estimate(full).activations


# --- against the trainer's own measured peak on CPU ---------------------------------------------------


class PeakProbe:
    """A TrainerCallback that measures the CPU allocator's peak over the first training steps.

    torch's profiler counts, with profile_memory, the bytes allocated while it runs; the weights
    (allocated before) are added from the model. Steps 1 and 2 include the optimizer state's creation.
    """

    def __init__(self, trace: Path) -> None:
        self.trace = trace
        self.prof: Any = None
        self.param_bytes = 0
        self.peak_bytes = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        probe = self

        class _Cb(TrainerCallback):  # type: ignore[misc]
            def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                if probe.prof is None:
                    from torch.profiler import ProfilerActivity, profile

                    probe.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                    probe.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                    probe.prof.__enter__()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if probe.prof is not None and state.global_step == 2:
                    probe.prof.__exit__(None, None, None)
                    probe.prof.export_chrome_trace(str(probe.trace))
                    probe.finish()

        return _Cb()

    def finish(self) -> None:
        events = json.loads(self.trace.read_text())["traceEvents"]
        mem = sorted((e["ts"], e["args"]) for e in events if e.get("name") == "[memory]")
        base = mem[0][1]["Total Allocated"] - mem[0][1]["Bytes"]
        self.peak_bytes = self.param_bytes + max(a["Total Allocated"] for _, a in mem) - base


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Bigger than the tiny model, so that weights, optimizer, activations and the loss all weigh."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("small-llama")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("method", "checkpointing"), [("full", False), ("lora", False), ("full", True)])
def test_estimate_within_25_percent_of_the_trainers_measured_cpu_peak(
        small_model_dir: Path, tmp_path: Path, method: str, checkpointing: bool) -> None:
    from finetune_api.resource import parse_spec
    from finetune_trainer.runner import Overrides, run_job
    from transformers import AutoConfig

    rows = [{"text": "The sky is blue and the grass is green. " * 16}] * 32  # every row fills 128 tokens
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = parse_spec({
        "model": {"uri": str(small_model_dir)},
        "dataset": {"train": str(data), "format": "text", "maxSeqLength": 128, "validationSplit": 0.25},
        "method": {"type": method},
        "hyperparameters": {"maxSteps": 2, "batchSize": 8, "gradientCheckpointing": checkpointing},
        "evaluation": {"baseline": False}, "resources": {"gpusPerNode": 0},
        "output": {"uri": str(tmp_path / "out")},
    })
    probe = PeakProbe(tmp_path / "trace.json")
    run_job(spec, overrides=Overrides(progress=False, serve_metrics=False, callbacks=[probe.callback()]))
    assert probe.peak_bytes > 0
    shape = memory_plan.shape_of(AutoConfig.from_pretrained(small_model_dir))
    plan = estimate(memory_plan.setup_from_spec(spec, shape, 128, on_gpu=False))
    ratio = plan.peak_bytes / probe.peak_bytes
    assert 0.75 <= ratio <= 1.25, (f"estimated {memory_plan.gib(plan.peak_bytes)}, "
                                   f"measured {memory_plan.gib(probe.peak_bytes)}")


def test_spec_to_setup(make_spec: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    from finetune_api.resource import parse_spec

    spec = parse_spec(make_spec(tmp_path, method={"type": "qlora", "lora": {"r": 32, "targetModules": ["q_proj"]}},
                                model={"quantization": {"bits": 4}}, resources={"gpusPerNode": 4, "nodes": 2},
                                hyperparameters={"batchSize": 3, "gradientCheckpointing": True}))
    shape = memory_plan.ModelShape(params=1000, block_linear_params=800, hidden=8, intermediate=16, layers=2,
                                   kv_dim=8, vocab=10, block_linears=((8, 8, "q_proj"), (8, 8, "v_proj")))
    s = memory_plan.setup_from_spec(spec, shape)
    assert (s.quant_bits, s.method, s.lora_r, s.lora_targets, s.world_size) == (4, "lora", 32, ("q_proj",), 8)
    assert (s.batch_size, s.seq_len, s.gradient_checkpointing, s.weight_bytes) == (3, 64, True, 2.0)
    assert estimate(s).trainable_params == 2 * 32 * (8 + 8)
    assert parse_bytes("80Gi") == 80 * GIB and parse_bytes("40G") == 40 * 10**9
