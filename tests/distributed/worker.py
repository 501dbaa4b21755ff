"""Run under torchrun (or alone) by the distributed tests: one training through the real recipe's `run`.

Every rank runs what a pod's process runs (runner.run_job less publishing): the objective's recipe,
with its evaluations before and after training, and its save (collective under ZeRO-3 and FSDP2).
Writes, from rank 0, a JSON report the test checks: the world size the process group really had,
the loss of every logged step, the recipe's metrics (base and tuned evaluations), how many
parameters were DTensor shards (FSDP2) while training, what each rank held of the ZeRO-3
partitioned parameters, and what the recipe's save wrote against the trained weights.

    python worker.py SPEC_JSON REPORT_JSON
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.sharded: tuple[int, int] = (0, 0)
        self.local_numel = 0
        self.total_numel = 0
        # DeepSpeed ZeRO-3 on this rank: parameters it manages, their full size, the part held here.
        self.zero3 = {"params": 0, "full_numel": 0, "partition_numel": 0}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == 1 and model is not None:
            from finetune_trainer import distributed
            from torch.distributed.tensor import DTensor

            self.sharded = distributed.sharded_parameters(model)
            for p in model.parameters():
                self.total_numel += p.numel()
                self.local_numel += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                if hasattr(p, "ds_numel") and hasattr(p, "ds_status"):
                    self.zero3["params"] += 1
                    self.zero3["full_numel"] += int(p.ds_numel)
                    self.zero3["partition_numel"] += int(p.ds_tensor.numel())

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def trained_weights(model: Any) -> dict[str, Any]:
    """Full copies of the trained parameters on every rank (ZeRO-3, FSDP2: gathered, collectively)."""
    import contextlib

    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    gather: Any = contextlib.nullcontext()
    if any(hasattr(p, "ds_numel") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for name, p in model.named_parameters() if p.requires_grad}


def load_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def merged_report(merged: Path, base: Path) -> dict[str, Any] | None:
    """merged/ against the base model: complete, nothing empty, and which tensors the merge changed."""
    if not merged.is_dir():
        return None
    tensors, base_tensors = load_tensors(merged), load_tensors(base)
    return {
        "tensors": len(tensors),
        "base_tensors": len(base_tensors),
        "empty": sum(int(t.numel() == 0) for t in tensors.values()),
        "same_shapes": all(n in tensors and tensors[n].shape == t.shape for n, t in base_tensors.items()),
        "changed": sorted(n for n, t in tensors.items()
                          if n in base_tensors and t.shape == base_tensors[n].shape and not t.equal(base_tensors[n])),
    }


def saved_report(stage: Path, trained: dict[str, Any], base: Path) -> dict[str, Any]:
    """What the artifact holds: tensors, their total size, empty ones, and how far from the trained weights."""
    tensors = load_tensors(stage)
    # Saved names drop PEFT's adapter name ("default") and may drop a "base_model.model." prefix.
    by_suffix = {name.replace(".default", ""): value for name, value in trained.items()}
    diffs, matched = [], 0
    for name, value in tensors.items():
        ref = by_suffix.get(name) if name in by_suffix else next(
            (v for n, v in by_suffix.items() if n.endswith("." + name) or name.endswith("." + n)), None)
        if ref is not None and ref.shape == value.shape:
            matched += 1
            diffs.append(float((ref.float() - value.float()).abs().max()))
    return {
        "files": sorted(p.name for p in stage.iterdir()),
        "tensors": len(tensors),
        "numel": sum(int(t.numel()) for t in tensors.values()),
        "empty": sum(int(t.numel() == 0) for t in tensors.values()),
        "matched_trained": matched,
        "max_abs_diff_trained": max(diffs) if diffs else None,
        "merged": merged_report(stage / "merged", base),
    }


def main(spec_path: str, report_path: str) -> int:
    import torch.distributed as dist
    from finetune_api import parse_spec
    from finetune_trainer.recipes import RecipeContext
    from finetune_trainer.runner import recipe_module

    spec = parse_spec(json.loads(Path(spec_path).read_text()))
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RecipeContext(spec=spec, output_uri=spec.output.uri, workdir=Path(tmp), stage=Path(tmp) / "stage",
                            extra_callbacks=[recorder], progress=False)
        # What a pod's process runs (runner.run_job, less publishing): evaluations, training, save.
        result = recipe_module(spec.objective.type).run(ctx)
        trainer = result.trainer
        trained = trained_weights(trainer.model)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        # Per rank: what it held of ZeRO-3 parameters, and the weight files it wrote into its stage.
        # And a checksum of its trained weights: the ranks' copies must be the same (DDP that never
        # wrapped the model trains a different copy on each rank).
        mine = {**recorder.zero3, "weight_files": sorted(
            str(f.relative_to(ctx.stage)) for f in ctx.stage.rglob("*.safetensors")),
            "trained_sum": sum(float(t.double().sum()) for t in trained.values())}
        ranks = [mine]
        if world > 1:
            ranks = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(ranks, mine)
        if rank == 0:
            Path(report_path).write_text(json.dumps({
                "world_size": world,
                # What accelerate's state believes (1 on CPU DeepSpeed without distributed.enable_cpu_deepspeed).
                "accelerate_processes": int(trainer.accelerator.num_processes),
                "losses": recorder.losses,
                "metrics": result.metrics,
                "sharded_params": recorder.sharded[0],
                "params": recorder.sharded[1],
                "local_numel": recorder.local_numel,
                "total_numel": recorder.total_numel,
                "fsdp_enabled": bool(getattr(trainer, "is_fsdp_enabled", False)),
                "deepspeed_enabled": bool(getattr(trainer, "is_deepspeed_enabled", False)),
                "ranks": ranks,
                "saved": saved_report(ctx.stage, trained, Path(spec.model.uri)),
            }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
