"""Trainer benchmarks (parent side): overhead vs plain TRL, packing vs padding, start-up.

Every run is a fresh child process (bench.trainer_worker); the two sides of a comparison
alternate in counterbalanced pairs (A B, B A, A B, ...) so that drifting machine load, and
whatever one run leaves behind for the next (page cache, dirty pages being written back), hit
both sides alike.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from . import fixtures
from .common import Child, run_children, summary

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def hyperparameters(max_steps: int | None, batch_size: int) -> dict[str, Any]:
    return {"max_steps": max_steps, "batch_size": batch_size, "learning_rate": 1e-3, "warmup_ratio": 0.1,
            "scheduler": "cosine", "seed": 7, "weight_decay": 0.0, "max_grad_norm": 1.0, "optimizer": "adamw_torch"}


def alternating(runs: int, sides: tuple[str, str]) -> list[tuple[int, str]]:
    """(pair index, side) in run order: A B, B A, A B, ... so that neither side always runs second."""
    a, b = sides
    return [(i, side) for i in range(runs) for side in ((a, b) if i % 2 == 0 else (b, a))]


def _fresh(run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return run_dir


def _worker(mode: str, cfg: dict[str, Any], run_dir: Path) -> tuple[list[str], Path, None]:
    """A trainer_worker child for run_children: its config (output under run_dir) written there."""
    (run_dir / "config.json").write_text(json.dumps({**cfg, "output": str(run_dir / "out")}))
    return ["-m", "bench.trainer_worker", mode, str(run_dir / "config.json")], run_dir / "run.log", None


def _drop_outputs(run_dir: Path) -> None:
    """Keep the log and result; drop the artifact and scratch (models can be large)."""
    shutil.rmtree(run_dir / "out", ignore_errors=True)
    shutil.rmtree(run_dir / "scratch", ignore_errors=True)


def _run(mode: str, cfg: dict[str, Any], workdir: Path, tag: str) -> Child:
    run_dir = _fresh(workdir / tag)
    child = run_children([_worker(mode, cfg, run_dir)])[0]
    _drop_outputs(run_dir)
    return child


def _run_lockstep(sides: dict[str, tuple[str, dict[str, Any]]], workdir: Path, tag: str, first: str) -> dict[str, Child]:
    """Two runs at once, their optimizer steps alternating one at a time (trainer_worker.Turns).

    sides: name -> (worker mode, config); `first` names the side that takes the first step."""
    pair_dir = _fresh(workdir / tag)
    names = list(sides)
    for name in names:
        os.mkfifo(pair_dir / f"turn-{name}")
    children = []
    for name, (mode, cfg) in sides.items():
        twin = names[1 - names.index(name)]
        turns = {"me": name, "twin": twin, "dir": str(pair_dir), "first": name == first,
                 "mine": str(pair_dir / f"turn-{name}"), "other": str(pair_dir / f"turn-{twin}")}
        run_dir = pair_dir / name
        run_dir.mkdir()
        children.append(_worker(mode, {**cfg, "turns": turns}, run_dir))
    done = run_children(children)
    for name in names:
        _drop_outputs(pair_dir / name)
    return dict(zip(names, done, strict=True))


def overhead(runs: int, steps: int, workdir: Path) -> dict[str, Any]:
    """Our lora recipe vs a plain TRL SFTTrainer script: tokens/s and peak RSS ratios, losses.

    Two designs, `runs` pairs each. Lock-step (the headline): both sides run at once and take
    turns every optimizer step, so both see the same machine; only each side's own turns count.
    Sequential: one whole process after the other, in counterbalanced pairs (each alone on the
    machine, but seconds apart, so shared-machine drift between them is part of the ratio)."""
    model = fixtures.model_dir("tiny")
    train, held = fixtures.facts_data()
    cfg = {"model": str(model), "train": str(train), "eval": str(held), "format": "prompt_completion",
           "max_length": 128, "hp": hyperparameters(steps, 8), "lora": LORA}
    pairs = [_run_lockstep({"ours": ("ours", cfg), "plain": ("plain", cfg)}, workdir, f"overhead-lockstep-{i}",
                           "ours" if i % 2 == 0 else "plain") for i in range(runs)]
    ours, plain = [p["ours"] for p in pairs], [p["plain"] for p in pairs]
    seq_ours: list[Child] = []
    seq_plain: list[Child] = []
    for i, side in alternating(runs, ("ours", "plain")):
        (seq_ours if side == "ours" else seq_plain).append(_run(side, cfg, workdir, f"overhead-{side}-{i}"))
    ours_losses, plain_losses = ours[0].result["losses"], plain[0].result["losses"]
    diffs = [abs(x - y) for x, y in zip(ours_losses, plain_losses, strict=False)]
    phase_names = sorted({k for c in ours for k in c.result["phases"]})
    everyone = (*ours, *plain, *seq_ours, *seq_plain)
    return {
        **_paired(ours, plain, ("ours", "plain"), "tokens_per_s_ratio"),
        "design": "lockstep",
        # Median optimizer-step time plain/ours: the same comparison without checkpoints and
        # slow outliers (both sides' steps are in the same seconds, so outliers hit both).
        "median_step_ratio": summary([statistics.median(b.result["step_s"]) / statistics.median(a.result["step_s"])
                                      for a, b in zip(ours, plain, strict=True)]),
        "sequential": _paired(seq_ours, seq_plain, ("ours", "plain"), "tokens_per_s_ratio"),
        "config": {"model": fixtures.MODELS["tiny"], "steps": steps, "batch_size": 8, "max_length": 128,
                   "lora": LORA, "rows": "facts (prompt/completion)"},
        "tokens_per_run": ours[0].result["tokens"],
        "losses_ours": ours_losses,
        "losses_plain": plain_losses,
        "loss_max_abs_diff": max(diffs) if diffs else None,
        "loss_runs_identical": all(c.result["losses"] == ours_losses for c in everyone),
        "eval_loss_ours": ours[0].result["eval_loss"],
        "eval_loss_plain": plain[0].result["eval_loss"],
        "ours_phases_s": {k: summary([c.result["phases"].get(k, 0.0) for c in ours]) for k in phase_names},
    }


def _paired(a: list[Child], b: list[Child], names: tuple[str, str], ratio: str) -> dict[str, Any]:
    """Throughput, CPU and memory of paired runs: each side's medians (keys prefixed with its
    name) and the per-pair ratio of tokens/s a/b under `ratio`."""
    pairs = list(zip(a, b, strict=True))
    x, y = names
    return {
        **_cpu_ratios(a, b),
        f"{x}_tokens_per_s": summary([c.result["tokens_per_s"] for c in a]),
        f"{y}_tokens_per_s": summary([c.result["tokens_per_s"] for c in b]),
        ratio: summary([p.result["tokens_per_s"] / q.result["tokens_per_s"] for p, q in pairs]),
        f"{x}_peak_rss_mib": summary([c.peak_rss_mib for c in a]),
        f"{y}_peak_rss_mib": summary([c.peak_rss_mib for c in b]),
        "peak_rss_ratio": summary([p.peak_rss_mib / q.peak_rss_mib for p, q in pairs]),
        f"{x}_wall_s": summary([c.wall_s for c in a]),
        f"{y}_wall_s": summary([c.wall_s for c in b]),
    }


def packing(runs: int, workdir: Path, rows: int = 384, padded_batch: int = 16) -> dict[str, Any]:
    """One epoch of variable-length chat data, packed (padding-free) vs padded batches, both
    through our recipe: the same real tokens either way; real tokens per second and eval loss."""
    model = fixtures.model_dir("tiny")
    train, held = fixtures.chat_data(rows)
    lengths = fixtures.token_lengths(train)
    max_length = 512
    mean = statistics.mean(lengths)
    # About as many real tokens per optimizer step on both sides, so the step counts (and so the
    # eval losses) are comparable: `padded_batch` rows padded vs rows of `max_length` packed.
    packed_batch = max(1, round(padded_batch * mean / max_length))
    base = {"model": str(model), "train": str(train), "eval": str(held), "format": "messages",
            "max_length": max_length, "lora": LORA}
    packed_cfg = {**base, "packing": True, "hp": hyperparameters(None, packed_batch)}
    padded_cfg = {**base, "packing": False, "hp": hyperparameters(None, padded_batch)}
    pairs = [_run_lockstep({"packed": ("ours", packed_cfg), "padded": ("ours", padded_cfg)}, workdir,
                           f"packing-lockstep-{i}", "packed" if i % 2 == 0 else "padded") for i in range(runs)]
    packed, padded = [p["packed"] for p in pairs], [p["padded"] for p in pairs]
    seq_packed: list[Child] = []
    seq_padded: list[Child] = []
    for i, side in alternating(runs, ("packed", "padded")):
        cfg = packed_cfg if side == "packed" else padded_cfg
        (seq_packed if side == "packed" else seq_padded).append(_run("ours", cfg, workdir, f"packing-{side}-{i}"))
    return {
        **_paired(packed, padded, ("packed", "padded"), "speedup"),
        "design": "lockstep",
        "sequential": _paired(seq_packed, seq_padded, ("packed", "padded"), "speedup"),
        "config": {"model": fixtures.MODELS["tiny"], "rows": len(lengths), "max_length": max_length,
                   "padded_batch": padded_batch, "packed_batch": packed_batch, "epochs": 1},
        "token_lengths": {"min": min(lengths), "median": statistics.median(lengths), "mean": round(mean, 1),
                          "max": max(lengths), "spread": round(max(lengths) / min(lengths), 1)},
        "real_tokens": {"packed": packed[0].result["tokens"], "padded": padded[0].result["tokens"],
                        "dataset": sum(lengths)},
        "steps": {"packed": packed[0].result["steps"], "padded": padded[0].result["steps"]},
        "eval_loss_packed": summary([c.result["eval_loss"] for c in (*packed, *seq_packed)]),
        "eval_loss_padded": summary([c.result["eval_loss"] for c in (*padded, *seq_padded)]),
        "base_eval_loss": packed[0].result["base_eval_loss"],
    }


def _cpu_ratios(a: list[Child], b: list[Child]) -> dict[str, Any]:
    """Tokens per CPU-second of each side and their ratio (absent for runs without CPU times)."""
    if not all("tokens_per_cpu_s" in c.result for c in (*a, *b)):
        return {}
    return {
        "a_tokens_per_cpu_s": summary([c.result["tokens_per_cpu_s"] for c in a]),
        "b_tokens_per_cpu_s": summary([c.result["tokens_per_cpu_s"] for c in b]),
        "tokens_per_cpu_s_ratio": summary([x.result["tokens_per_cpu_s"] / y.result["tokens_per_cpu_s"]
                                           for x, y in zip(a, b, strict=True)]),
    }


#: What the start-up marks mean, in order (seconds since the parent started the process).
STARTUP_MARKS = [
    ("imports", "imports done (torch, transformers, trl, peft, our packages)"),
    ("load_model_done", "model + tokenizer loaded"),
    ("prepare_sft_done", "data read, checked, tokenized"),
    ("build_trainer_done", "PEFT wrap + SFTTrainer built"),
    ("evaluate_done", "baseline eval of the base model"),
    ("train_begin", "trainer.train() entered (checkpoint restore check, dataloader)"),
    ("first_optimizer_step", "first optimizer step done"),
]


def startup(runs: int, workdir: Path, models: tuple[str, ...] = ("tiny", "100m"), profile: bool = True) -> dict[str, Any]:
    """Process start to the first optimizer step of our recipe; where the time goes. Each run starts
    as `finetune train` does (pod_startup: startup.begin before the heavy imports)."""
    train, held = fixtures.facts_data()
    out: dict[str, Any] = {}
    for name in models:
        model = fixtures.model_dir(name)
        cfg = {"model": str(model), "train": str(train), "eval": str(held), "format": "prompt_completion",
               "max_length": 128, "hp": hyperparameters(1, 4), "lora": LORA, "pod_startup": True}
        children = [_run("ours", cfg, workdir, f"startup-{name}-{i}") for i in range(runs)]
        marks = {k: summary([c.result["marks"][k] for c in children if k in c.result["marks"]])
                 for k, _ in STARTUP_MARKS if all(k in c.result["marks"] for c in children)}
        entry: dict[str, Any] = {
            "parameters": _parameters(model),
            "first_step_s": marks["first_optimizer_step"],
            "marks_s": marks,
            "peak_rss_mib": summary([c.peak_rss_mib for c in children]),
        }
        if profile:
            prof = workdir / f"startup-{name}-profile.txt"
            _run("ours", {**cfg, "profile": str(prof)}, workdir, f"startup-{name}-profiled")
            entry["profile"] = str(prof)
            entry["profile_top"] = _profile_top(prof)
        out[name] = entry
    return out


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                total += _numel(st.get_slice(k).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _profile_top(path: Path, lines: int = 45) -> str:
    """The head of a pyinstrument text profile (the big frames)."""
    try:
        return "\n".join(path.read_text().splitlines()[:lines])
    except OSError:
        return ""
