"""GPU check: LoRA, QLoRA 4-bit, DoRA, and full fine-tuning with DeepSpeed ZeRO-3 and with FSDP2.

A real-architecture ~1.1B Llama (TinyLlama's shape) with random weights, bf16, ~50 steps each on
random tokens, through the trainer's own pieces (methods.peft_config, models.quantization_config,
distributed.training_args_kwargs). Records tokens/s, MFU and peak GPU memory per run.

    bench/gpu_check.sh                      # on one H200: all runs, ~6 minutes
    python bench/gpu_check.py --tiny --cpu  # smoke test of the code path on a CPU (tests)

Each run is its own `torchrun --nproc-per-node 1` process (FSDP and DeepSpeed need a process
group; a fresh process also gives a clean peak-memory reading). MFU = 6 * parameters * tokens/s
/ peak; for PEFT runs this overstates the work done (no weight gradients for frozen layers) and
is reported as the conventional figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

H200_BF16_DENSE_FLOPS = 989e12
RUNS: dict[str, dict[str, Any]] = {
    "lora": {"method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}},
    "qlora-4bit": {"method": {"type": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
                   "quantization": {"bits": 4}},
    "dora": {"method": {"type": "dora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}},
    "full-zero3": {"method": {"type": "full"}, "distributed": {"strategy": "deepspeed", "deepspeed": {"zeroStage": 3}}},
    "full-fsdp": {"method": {"type": "full"}, "distributed": {"strategy": "fsdp"}},
}


def model_config(tiny: bool) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    # TinyLlama-1.1B's shape: 1.10e9 parameters.
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                       tie_word_embeddings=False)


def make_model(folder: Path, tiny: bool, cpu: bool) -> None:
    """Random weights saved once, so every run (and QLoRA's quantized load) starts the same."""
    import torch
    from transformers import LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    dtype = torch.float32 if cpu else torch.bfloat16
    model = LlamaForCausalLM(model_config(tiny)).to(dtype)
    model.save_pretrained(folder)


def spec_for(name: str, model_dir: Path, out: Path, args: argparse.Namespace) -> Any:
    from finetune_api import parse_spec

    run = RUNS[name]
    wire: dict[str, Any] = {
        "model": {"uri": str(model_dir), "dtype": "float32" if args.cpu else "bfloat16"},
        "dataset": {"train": str(out / "unused.jsonl"), "format": "text", "maxSeqLength": args.seq},
        "method": run["method"],
        "hyperparameters": {"maxSteps": args.steps, "batchSize": args.batch, "learningRate": 1e-4},
        "resources": {"gpusPerNode": 0 if args.cpu else 1},
        "output": {"uri": str(out)},
    }
    if "quantization" in run:
        wire["model"]["quantization"] = run["quantization"]
    if "distributed" in run:
        wire["distributed"] = run["distributed"]
    return parse_spec(wire)


class RandomTokens:
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": self.ids[i] * 0 + 1}


def one_run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration in this (torchrun) process; returns its measurements."""
    import torch
    from finetune_trainer import config, distributed, methods, models
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    out = Path(args.workdir) / name
    spec = spec_for(name, Path(args.model_dir), out, args)
    precision = config.resolve_precision(spec)
    # TrainingArguments first: with ZeRO-3 it must exist before the model is built.
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to="none", bf16=precision.bf16, use_cpu=precision.device == "cpu", disable_tqdm=True,
        dataloader_num_workers=0, **distributed.training_args_kwargs(spec),
    )
    load: dict[str, Any] = {"dtype": precision.dtype}
    quant = models.quantization_config(spec.model, precision) if spec.model.quantization else None
    if quant is not None:
        load["quantization_config"] = quant
        if precision.device == "cuda":
            load["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **load)
    params = _count(args.tiny)  # the dense model's size (4-bit layers report packed sizes)
    peft_cfg = methods.peft_config(spec, total_steps=args.steps, tokenizer_path="")
    model = methods.apply(model, peft_cfg)
    trainable, _ = methods.trainable_parameters(model)

    class Clock(TrainerCallback):
        """Times the steps after warm-up (compilation, allocator growth)."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.timed = 0

        def on_step_begin(self, a: Any, state: Any, c: Any, **kw: Any) -> None:
            if state.global_step == args.warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_step_end(self, a: Any, state: Any, c: Any, **kw: Any) -> None:
            if self.start is not None:
                self.timed += 1

    clock = Clock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    vocab = model_config(args.tiny).vocab_size
    trainer = Trainer(model=model, args=targs, train_dataset=RandomTokens(args.steps * args.batch, args.seq, vocab),
                      callbacks=[clock])
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - (clock.start or time.perf_counter())
    tokens_per_s = clock.timed * args.batch * args.seq / elapsed if elapsed > 0 else 0.0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "run": name,
        "strategy": spec.distributed.strategy,
        "method": spec.method.type,
        "parameters": params,
        "trainable_parameters": trainable,
        "steps": trainer.state.global_step,
        "timed_steps": clock.timed,
        "tokens_per_second": round(tokens_per_s, 1),
        "mfu": round(6 * params * tokens_per_s / H200_BF16_DENSE_FLOPS, 4),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
        "deepspeed": bool(getattr(trainer, "is_deepspeed_enabled", False)),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def _count(tiny: bool) -> int:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(model_config(tiny)).parameters())


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | method | strategy | params | trainable | tokens/s | MFU | peak GiB | loss first -> last | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | | | | | | | | | failed: {r['error'][:120]} |")
            continue
        lines.append(
            f"| {r['run']} | {r['method']} | {r['strategy']} | {r['parameters'] / 1e9:.2f}B | "
            f"{r['trainable_parameters'] / 1e6:.1f}M | {r['tokens_per_second']:,.0f} | {r['mfu']:.1%} | "
            f"{r['peak_gpu_memory_gib'] or 'n/a'} | {r['first_loss'] or 0:.3f} -> {r['last_loss'] or 0:.3f} | ok |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="A tiny Llama instead of 1.1B (smoke test).")
    p.add_argument("--cpu", action="store_true", help="Run on CPU (smoke test; fp32, gloo).")
    p.add_argument("--runs", default=",".join(RUNS), help="Comma-separated subset of: " + ", ".join(RUNS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--timeout", type=int, default=150, help="Seconds per run.")
    p.add_argument("--workdir", default="/tmp/gpu-check")
    p.add_argument("--out", default=str(Path(__file__).with_name("gpu_results.json")))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: the run a torchrun child does
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model_dir = args.model_dir or str(Path(args.workdir) / "model")
    if args.one:
        result = one_run(args.one, args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.workdir, f"{args.one}.json").write_text(json.dumps(result))
        return 0

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    make_model(Path(args.model_dir), args.tiny, args.cpu)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.cpu:
        env.update({"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})
    results = []
    passthrough = [*(["--tiny"] if args.tiny else []), *(["--cpu"] if args.cpu else []),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--workdir", args.workdir]
    for name in args.runs.split(","):
        result_file = Path(args.workdir, f"{name}.json")
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               __file__, *passthrough, "--one", name, "--model-dir", args.model_dir]
        started = time.time()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            log = f"timed out after {args.timeout}s\n{exc.stdout or ''}{exc.stderr or ''}"
        if result_file.exists():  # judged by the result, not torchrun's status (DeepSpeed exit aborts)
            result = json.loads(result_file.read_text())
            result["wall_seconds"] = round(time.time() - started, 1)
        else:
            tail = [line for line in log.splitlines() if line.strip()][-3:]
            result = {"run": name, "error": " | ".join(tail)}
            Path(args.workdir, f"{name}.log").write_text(log)
        print(json.dumps(result), flush=True)
        results.append(result)
    doc = {"model": "random Llama " + ("tiny" if args.tiny else "1.1B (TinyLlama shape)"), "steps": args.steps,
           "batch": args.batch, "seq": args.seq, "peak_flops": H200_BF16_DENSE_FLOPS, "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(table(results))
    print(table(results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
