"""Supervised fine-tuning (objective sft) with TRL's SFTTrainer, for every method.

setup: model + tokenizer, tokenized data with loss masks, the method's PEFT wrapper.
train: SFTTrainer with settings from config.py; the base model is evaluated first (held-out
       loss, and answers to held-out prompts when evaluation.metrics asks for generation metrics;
       in a distributed run the loss once train() has wrapped the model; with a PEFT method in
       one process the loss after train(), adapter disabled; see base.evaluate_before_training).
save:  adapter or full model + tokenizer (+ merged/), and the metrics for metrics.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import StatusMetrics

from .. import config, continual, data, methods, models
from ..evaluation import generation, perplexity
from . import RecipeContext, RecipeResult, base

log = logging.getLogger(__name__)


@dataclass
class Setup:
    spec: FineTuneJobSpec
    precision: config.Precision
    loaded: models.LoadedModel
    data: data.SftData
    model: Any  # the model to train (PeftModel or the base model itself)
    total_steps: int
    continual: Any = None  # continual.SftContinual, set by build_trainer


def setup(ctx: RecipeContext) -> Setup:
    from transformers import set_seed

    spec = ctx.spec
    precision = config.resolve_precision(spec)
    loaded = models.load_model(spec, precision, ctx.workdir)
    sft_data = data.prepare_sft(spec.dataset, loaded.tokenizer, ctx.workdir, spec.hyperparameters.seed)
    total = ctx.max_steps or config.total_steps_hint(spec, len(sft_data.train))
    peft_cfg = base.peft_config(ctx, loaded.tokenizer, total)
    set_seed(spec.hyperparameters.seed)
    # objective.continual: start from the earlier artifact instead (else methods.apply).
    model = continual.start_model(spec, loaded, peft_cfg, ctx.workdir)
    trainable, all_params = methods.trainable_parameters(model)
    log.info("method %s: %d of %d parameters trainable", spec.method.type, trainable, all_params)
    return Setup(spec, precision, loaded, sft_data, model, total)


def build_trainer(ctx: RecipeContext, s: Setup) -> Any:
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    spec = s.spec
    args = config.build_config(
        SFTConfig,
        config.shared_training_args(spec, ctx.workdir / "checkpoints", s.precision, max_steps=ctx.max_steps),
        {
            "max_length": spec.dataset.max_seq_length,
            "packing": spec.dataset.packing,
            "packing_strategy": "bfd",
            # Datasets arrive tokenized with labels (data.py builds the loss masks itself).
            "dataset_kwargs": {},
            "remove_unused_columns": True,
        },
    )
    # objective.continual: replay rows mixed in, and the l2/ewc penalty in the loss (no-op without it).
    s.continual = continual.for_sft(spec, s.model, s.loaded.tokenizer, s.data.train, ctx.workdir, SFTTrainer)
    trainer = s.continual.trainer_cls(
        model=s.model,
        args=args,
        train_dataset=s.continual.train,
        eval_dataset=s.data.eval,
        processing_class=s.loaded.tokenizer,
        callbacks=base.training_callbacks(ctx, spec),
    )
    # With disable_tqdm the Trainer prints every log dict; our progress bar replaces that.
    trainer.remove_callback(PrinterCallback)
    return trainer


def evaluate(s: Setup, trainer: Any, *, base: bool = False) -> dict[str, Any]:
    """Held-out loss and perplexity (base: with the PEFT adapter disabled)."""
    return perplexity.evaluate(trainer, base=base)


def save(ctx: RecipeContext, s: Setup, trainer: Any) -> None:
    base.save(ctx, trainer, s.loaded.tokenizer, base.causal_lm_base(ctx, s.precision))


def run(ctx: RecipeContext) -> RecipeResult:
    s = setup(ctx)
    trainer = build_trainer(ctx, s)
    # bleu/rouge/win_rate/accuracy/f1 on held-out prompts (a no-op unless evaluation asks for them).
    gen = generation.GenerationEval.from_records(s.spec, s.loaded.tokenizer, s.data.eval_records)
    metrics: dict[str, Any] = {}
    more: dict[str, Any] = {}
    if s.continual.earlier_eval is not None:  # objective.continual with replay: forgetting is measured
        more["earlier"] = lambda: continual.earlier_loss(trainer, s.continual)
    # With a PEFT method the base is the model with its adapter disabled: no checkpoint and no
    # step changes it, and its held-out loss is deterministic, so in one process it is scored
    # after train() (the same numbers) instead of delaying the first step.
    peft = hasattr(trainer.model, "disable_adapter")
    before = base.evaluate_baseline(s.spec, trainer, lambda: evaluate(s, trainer, base=True), more=more,
                                    survive_resume=("base",) if peft else (),
                                    after_training=("base",) if peft else ())
    gen.answer_base(trainer.model)
    train_output = trainer.train(resume_from_checkpoint=base.resume_from(ctx, s.spec))
    before.finish()
    if "base" in before:
        metrics["base"] = before["base"]
    summary: StatusMetrics = {}
    if s.spec.objective.continual is not None:
        metrics["continual"] = continual.report(
            s.continual, before.get("earlier"), continual.earlier_loss(trainer, s.continual)
        )
        summary.update(continual.summary(metrics["continual"]))
    metrics["train"] = base.train_summary(trainer, train_output)
    metrics["tuned"] = evaluate(s, trainer)
    generation_metrics = gen.score_tuned(trainer.model)
    if generation_metrics:
        metrics["generation"] = generation_metrics
        summary.update(generation.headline(generation_metrics))
    if summary:
        metrics["summary"] = summary
    metrics["method"] = base.method_section(s.spec, trainer.model)
    save(ctx, s, trainer)
    return RecipeResult(
        metrics=metrics, base_model=s.loaded.identity, model=trainer.model, tokenizer=s.loaded.tokenizer, trainer=trainer
    )
