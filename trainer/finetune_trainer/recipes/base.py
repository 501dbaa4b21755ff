"""What every recipe shares: the callbacks list and the resume point (the single place where
checkpointing is wired), and the training summary that goes into metrics.json."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from finetune_api.constants import CHECKPOINTS_DIR, Env
from finetune_api.spec import FineTuneJobSpec

from .. import methods
from ..progress import ProgressCallback
from . import RecipeContext


def checkpoint_uri(ctx: RecipeContext) -> str:
    return checkpoints_uri_for(ctx.output_uri, ctx.checkpoint_uri)


def checkpoints_uri_for(output_uri: str, override: str | None = None) -> str:
    """Where checkpoints go: the override, $FINETUNE_CHECKPOINT_URI, else <output>/checkpoints."""
    return override or os.environ.get(Env.CHECKPOINT_URI) or f"{output_uri.rstrip('/')}/{CHECKPOINTS_DIR}"


def _checkpointing() -> Any | None:
    """The storage layer's checkpointing module, once it exists in this tree."""
    if importlib.util.find_spec("finetune_trainer.checkpointing") is None:
        return None
    from .. import checkpointing

    return checkpointing


def training_callbacks(ctx: RecipeContext, spec: FineTuneJobSpec) -> list[Any]:
    """Callbacks of every recipe's trainer: method needs, progress, metrics, checkpoint publishing."""
    out: list[Any] = [*methods.callbacks(spec)]
    if ctx.progress:
        out.append(ProgressCallback())
    out.extend(ctx.extra_callbacks)
    ckpt = _checkpointing()
    if ckpt is not None and hasattr(ckpt, "checkpoint_callbacks"):
        out.extend(ckpt.checkpoint_callbacks(spec, checkpoint_uri(ctx)))
    return out


def resume_from(ctx: RecipeContext, spec: FineTuneJobSpec) -> str | None:
    """The local checkpoint folder to resume from (resume: auto), or None to start fresh."""
    if spec.checkpointing.resume != "auto":
        return None
    ckpt = _checkpointing()
    if ckpt is None or not hasattr(ckpt, "restore_latest"):
        return None
    restored: Path | None = ckpt.restore_latest(checkpoint_uri(ctx), ctx.workdir / "restored")
    return str(restored) if restored is not None else None


def train_summary(trainer: Any, train_output: Any) -> dict[str, Any]:
    """The `train` section of metrics.json."""
    m = dict(train_output.metrics)
    state = trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    tokens = int(state.num_input_tokens_seen or 0)
    runtime = float(m.get("train_runtime", 0.0))
    return {
        "steps": int(state.global_step),
        "epochs": float(state.epoch or 0.0),
        "firstLoss": losses[0] if losses else None,
        "finalLoss": losses[-1] if losses else None,
        "meanLoss": float(m.get("train_loss", 0.0)),
        "tokens": tokens,
        "runtimeSeconds": runtime,
        "tokensPerSecond": tokens / runtime if runtime > 0 else 0.0,
    }
