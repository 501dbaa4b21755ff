"""What every recipe shares: the callbacks list and the resume point (the single place where
checkpointing is wired), the baseline evaluation before training, the save of the trained model,
and the `train` and `method` sections of metrics.json."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from finetune_api import layout
from finetune_api.constants import Env
from finetune_api.spec import FineTuneJobSpec
from transformers import TrainerCallback

from .. import config, methods, models, output, startup
from ..progress import ProgressCallback
from . import RecipeContext

log = logging.getLogger(__name__)


def run_checkpoints_uri(output_uri: str, override: str | None = None) -> str:
    """Where this run's checkpoints go: the override (RecipeContext.checkpoint_uri), else
    $FINETUNE_CHECKPOINT_URI (set by the operator), else the layout's <output>/checkpoints."""
    return override or os.environ.get(Env.CHECKPOINT_URI) or layout.checkpoints_uri(output_uri)


def _checkpointing() -> Any | None:
    """The storage layer's checkpointing module, once it exists in this tree."""
    if importlib.util.find_spec("finetune_trainer.checkpointing") is None:
        return None
    from .. import checkpointing

    return checkpointing


def peft_config(ctx: RecipeContext, tokenizer: Any, total_steps: int) -> Any | None:
    """The method's PEFT config (None for full fine-tuning) for a run of `total_steps` steps."""
    # Prompt-tuning init text is tokenized by PEFT from a path: hand it exactly our tokenizer.
    tokenizer_dir = ctx.workdir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    return methods.peft_config(ctx.spec, total_steps=total_steps, tokenizer_path=str(tokenizer_dir))


class StartupOver(TrainerCallback):  # type: ignore[misc]
    """The first trainer built ends start-up (startup.settle): the model, data and trainer exist,
    and `train()` is about to run the trainer's own `gc.collect()`."""

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        startup.settle()


def training_callbacks(ctx: RecipeContext, spec: FineTuneJobSpec) -> list[Any]:
    """Callbacks of every recipe's trainer: start-up's end, method needs, progress, metrics,
    checkpoint publishing."""
    out: list[Any] = [StartupOver(), *methods.callbacks(spec)]
    if ctx.progress:
        out.append(ProgressCallback())
    out.extend(ctx.extra_callbacks)
    ckpt = _checkpointing()
    if ckpt is not None and hasattr(ckpt, "checkpoint_callbacks"):
        out.extend(ckpt.checkpoint_callbacks(spec, run_checkpoints_uri(ctx.output_uri, ctx.checkpoint_uri)))
    return out


def resume_from(ctx: RecipeContext, spec: FineTuneJobSpec) -> str | None:
    """The local checkpoint folder to resume from (resume: auto), or None to start fresh."""
    if spec.checkpointing.resume != "auto":
        return None
    ckpt = _checkpointing()
    if ckpt is None or not hasattr(ckpt, "restore_latest"):
        return None
    restored: Path | None = ckpt.restore_latest(run_checkpoints_uri(ctx.output_uri, ctx.checkpoint_uri), ctx.workdir / "restored")
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


def method_section(spec: FineTuneJobSpec, model: Any) -> dict[str, Any]:
    """The `method` section of metrics.json: how much of the model was trained."""
    trainable, all_params = methods.trainable_parameters(model)
    return {"type": spec.method.type, "trainableParameters": trainable, "totalParameters": all_params}


def save(ctx: RecipeContext, trainer: Any, tokenizer: Any, load_base: Callable[[], Any]) -> None:
    """The trained model (adapter or full weights) and tokenizer into ctx.stage, plus merged/ when
    output.save asks for it: the adapter merged into a fresh full-precision base (`load_base()`).

    Every rank comes here: under ZeRO-3 saving gathers the weights (output.save_weights).
    """
    spec = ctx.spec
    model = trainer.model
    wrote = output.save_model(model, tokenizer, ctx.stage, spec, trainer)
    if not output.wants_merged(spec):
        return
    adapter_dir = ctx.stage
    if "adapter" not in (spec.output.save or []):
        adapter_dir = ctx.workdir / "adapter"
        wrote = output.save_weights(model, adapter_dir, trainer)
    if wrote:  # ZeRO-3: only the main process holds the gathered adapter (and publishes)
        output.save_merged(adapter_dir, load_base, ctx.stage, tokenizer)


def causal_lm_base(ctx: RecipeContext, precision: config.Precision) -> Callable[[], Any]:
    """`load_base` for `save` of a causal-LM policy: the base model in full precision, also for
    QLoRA (quantized weights cannot hold the merged sum)."""

    def load() -> Any:
        full_precision = ctx.spec.model_copy(deep=True)
        full_precision.model.quantization = None
        return models.load_model(full_precision, precision, ctx.workdir).model

    return load


class BeforeTraining(dict[str, Any]):
    """name -> result of the evaluations of the starting weights (see evaluate_before_training);
    `finish()` runs, after train(), the ones that were left for then."""

    def __init__(self) -> None:
        super().__init__()
        self.after: dict[str, Callable[[], Any]] = {}

    def finish(self) -> BeforeTraining:
        """Run the evaluations left for after train() (call it once train() has returned)."""
        for name, evaluate in self.after.items():
            self[name] = evaluate()
        self.after = {}
        return self


def evaluate_baseline(
    spec: FineTuneJobSpec,
    trainer: Any,
    evaluate_base: Callable[[], Any],
    *,
    more: dict[str, Callable[[], Any]] | None = None,
    survive_resume: Collection[str] = (),
    after_training: Collection[str] = (),
) -> BeforeTraining:
    """The one baseline evaluation of every recipe, before training (now, once train() has
    wrapped the model, or after train() for names in `after_training`: see
    evaluate_before_training): `evaluate_base()`, the recipe's `evaluate(s, trainer, base=True)`,
    as "base" when evaluation.baseline is on, and `more` evaluations of the starting weights."""
    evaluations: dict[str, Callable[[], Any]] = {}
    if spec.evaluation.baseline:
        evaluations["base"] = evaluate_base
    evaluations.update(more or {})
    return evaluate_before_training(trainer, evaluations, survive_resume=survive_resume,
                                    after_training=after_training)


def evaluate_before_training(
    trainer: Any, evaluations: dict[str, Callable[[], Any]], *, survive_resume: Collection[str] = (),
    after_training: Collection[str] = (),
) -> BeforeTraining:
    """Run `evaluations` (name -> function) on the model as it is before training; name -> result.

    transformers 5.24 with accelerate 1.15 cannot evaluate before `train()` in a distributed run,
    on any device:
    - DDP (more than one process): evaluation_loop prepares the model with
      `prepare_model(evaluation_mode=True)`, which marks it `_is_accelerate_prepared` without
      wrapping it; train() then gets the bare model back from prepare (accelerate's guard against
      double wrapping), so it is never wrapped in DistributedDataParallel: gradients are not
      averaged and every rank trains its own copy on its share of the data (no error raised).
    - DeepSpeed: evaluation_loop builds an inference engine (ZeRO-2: "ZeRO inference only makes
      sense with ZeRO Stage 3"; ZeRO-3: train() then fails with "'NoneType' object has no
      attribute 'backward'", accelerate's training engine was never made).
    - FSDP2: evaluation_loop prepares the model without an optimizer, which accelerate refuses
      ("a model and optimizer must be passed together").
    There the evaluations run at the start of `train()` instead (on_train_begin): the Trainer has
    then wrapped the model and evaluates it the way it does during training, and no step has been
    taken, so the numbers are those of an evaluation before `train()`. The returned dict is filled
    then. In one process without DeepSpeed/FSDP every evaluation runs now.

    Except when `train()` resumed from a checkpoint: its weights are loaded by on_train_begin, so
    an evaluation of the starting weights is skipped (logged), unless its name is in
    `survive_resume` (e.g. the base model with the PEFT adapter disabled, which no checkpoint
    changes).

    Names in `after_training` are evaluations that training cannot change either (the base with
    the PEFT adapter disabled, scored deterministically, e.g. a held-out loss): in one process
    they are left for `finish()` after train(), so they do not delay the first optimizer step
    (the same numbers; tests/trainer/test_methods.py compares them). In a distributed run they
    keep their place at on_train_begin.
    """
    results = BeforeTraining()
    if not evaluations:
        return results
    if not deferred(trainer):
        for name, evaluate in evaluations.items():
            if name in after_training:
                results.after[name] = evaluate
            else:
                results[name] = evaluate()
        return results
    trainer.add_callback(_EvaluateAtTrainBegin(evaluations, results, frozenset(survive_resume)))
    return results


def deferred(trainer: Any) -> bool:
    """Whether evaluations before training must wait for train() to wrap the model (see above)."""
    return bool(
        getattr(trainer, "is_deepspeed_enabled", False)
        or getattr(trainer, "is_fsdp_enabled", False)
        or trainer.args.world_size > 1
    )


class _EvaluateAtTrainBegin(TrainerCallback):  # type: ignore[misc]
    """Runs the evaluations once, at the first on_train_begin (after the other callbacks' own)."""

    def __init__(self, evaluations: dict[str, Callable[[], Any]], results: dict[str, Any],
                 survive_resume: frozenset[str]) -> None:
        self.evaluations = evaluations
        self.results = results
        self.survive_resume = survive_resume
        self.done = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.done:
            return control
        self.done = True
        resumed = state.global_step > 0  # a checkpoint's weights are loaded by now
        for name, evaluate in self.evaluations.items():
            if resumed and name not in self.survive_resume:
                log.warning(
                    "%s: not evaluated; in a distributed run it runs once train() has started, and this run "
                    "resumed from step %d, whose weights are not the starting ones", name, state.global_step,
                )
                continue
            self.results[name] = evaluate()
        return control
