"""Run under torchrun (or alone) by the distributed tests: one SFT training through the real recipe.

Writes, from rank 0, a JSON report the test checks: the world size the process group really had,
the loss of every logged step, and how many parameters were DTensor shards (FSDP2) while training.

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

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == 1 and model is not None:
            from finetune_trainer import distributed
            from torch.distributed.tensor import DTensor

            self.sharded = distributed.sharded_parameters(model)
            for p in model.parameters():
                self.total_numel += p.numel()
                self.local_numel += p.to_local().numel() if isinstance(p, DTensor) else p.numel()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main(spec_path: str, report_path: str) -> int:
    import torch.distributed as dist
    from finetune_api import parse_spec
    from finetune_trainer.recipes import RecipeContext, sft

    spec = parse_spec(json.loads(Path(spec_path).read_text()))
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RecipeContext(spec=spec, output_uri=spec.output.uri, workdir=Path(tmp), stage=Path(tmp) / "stage",
                            extra_callbacks=[recorder], progress=False)
        s = sft.setup(ctx)
        trainer = sft.build_trainer(ctx, s)
        trainer.train()
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            Path(report_path).write_text(json.dumps({
                "world_size": world,
                "losses": recorder.losses,
                "sharded_params": recorder.sharded[0],
                "params": recorder.sharded[1],
                "local_numel": recorder.local_numel,
                "total_numel": recorder.total_numel,
                "fsdp_enabled": bool(getattr(trainer, "is_fsdp_enabled", False)),
                "deepspeed_enabled": bool(getattr(trainer, "is_deepspeed_enabled", False)),
            }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
