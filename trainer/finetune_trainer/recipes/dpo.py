"""Direct preference optimisation (objective dpo) with TRL's DPOTrainer, for every method.

setup: model + tokenizer, checked preference pairs (preference.py), the method's PEFT config.
train: DPOTrainer with beta / loss type / label smoothing from objective.preference. With a PEFT
       method the trainer wraps the base model itself and scores the reference with the adapter
       disabled, so there is no second copy of the model; full fine-tuning keeps a frozen copy.
       Held-out pairs are evaluated before and after: DPO reward margin and preference accuracy.
save:  adapter or full model + tokenizer (+ merged/), metrics for metrics.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import StatusMetric, StatusMetrics

from .. import config, methods, models, preference
from ..errors import ConfigError
from . import RecipeContext, RecipeResult, base

log = logging.getLogger(__name__)


@dataclass
class Setup:
    spec: FineTuneJobSpec
    precision: config.Precision
    loaded: models.LoadedModel
    data: preference.PreferenceData
    peft_config: Any | None


def setup(ctx: RecipeContext) -> Setup:
    from transformers import set_seed

    spec = ctx.spec
    precision = config.resolve_precision(spec)
    pairs = preference.load_preference(spec.dataset, ctx.workdir, spec.hyperparameters.seed)
    loaded = models.load_model(spec, precision, ctx.workdir)
    total = ctx.max_steps or config.total_steps_hint(spec, len(pairs.train))
    peft_cfg = base.peft_config(ctx, loaded.tokenizer, total)
    set_seed(spec.hyperparameters.seed)
    if peft_cfg is None:
        methods.apply(loaded.model, None)
    return Setup(spec, precision, loaded, pairs, peft_cfg)


def dpo_config(ctx: RecipeContext, s: Setup) -> Any:
    from trl import DPOConfig

    p = s.spec.objective.preference
    if p is None:
        raise ConfigError("objective.preference is missing (the API fills it for type dpo)")
    if p.label_smoothing > 0 and p.loss_type not in ("robust", "sigmoid", "exo_pair"):
        raise ConfigError(f"objective.preference.labelSmoothing applies to lossType robust or sigmoid, not {p.loss_type}")
    return config.build_config(
        DPOConfig,
        config.shared_training_args(s.spec, ctx.workdir / "checkpoints", s.precision, max_steps=ctx.max_steps),
        {
            "beta": p.beta,
            "loss_type": [p.loss_type],
            "label_smoothing": p.label_smoothing,
            "max_length": s.spec.dataset.max_seq_length,
            "remove_unused_columns": False,
        },
    )


def build_trainer(ctx: RecipeContext, s: Setup) -> Any:
    from trl import DPOTrainer

    return DPOTrainer(
        model=s.loaded.model,
        ref_model=None,  # PEFT: the base with adapters disabled; full: TRL keeps a frozen copy
        args=dpo_config(ctx, s),
        train_dataset=s.data.train,
        eval_dataset=s.data.eval,
        processing_class=s.loaded.tokenizer,
        peft_config=s.peft_config,
        callbacks=base.training_callbacks(ctx, s.spec),
    )


def evaluate(s: Setup, trainer: Any, *, base: bool = False) -> dict[str, Any]:
    """DPO reward margin, preference accuracy and loss on the held-out pairs.

    Before training (base) the policy is the starting model: a fresh adapter changes nothing yet.
    """
    # TRL adds its own metrics under "eval_" whatever metric_key_prefix says.
    prefix = "eval"
    out = trainer.evaluate(metric_key_prefix=prefix)
    return {
        "evalLoss": float(out[f"{prefix}_loss"]),
        "rewardMargin": float(out[f"{prefix}_rewards/margins"]),
        "preferenceAccuracy": float(out[f"{prefix}_rewards/accuracies"]),
        "chosenLogp": float(out[f"{prefix}_logps/chosen"]),
        "rejectedLogp": float(out[f"{prefix}_logps/rejected"]),
    }


def summary(metrics: dict[str, Any]) -> StatusMetrics:
    """Headline numbers for the termination message (status.metrics)."""
    from ..evaluation import generation

    out: StatusMetrics = {}
    tuned, before = metrics.get("tuned", {}), metrics.get("base", {})
    for key, name, base_name in (
        ("rewardMargin", StatusMetric.REWARD_MARGIN, StatusMetric.BASE_REWARD_MARGIN),
        ("preferenceAccuracy", StatusMetric.PREFERENCE_ACCURACY, StatusMetric.BASE_PREFERENCE_ACCURACY),
    ):
        if key in tuned:
            out[name] = tuned[key]
        if key in before:
            out[base_name] = before[key]
    out.update(generation.headline(metrics.get("generation", {})))
    return out


def run(ctx: RecipeContext) -> RecipeResult:
    from ..evaluation import generation

    s = setup(ctx)
    trainer = build_trainer(ctx, s)
    gen = generation.GenerationEval.from_preference(s.spec, s.loaded.tokenizer, s.data)
    metrics: dict[str, Any] = {}
    before = base.evaluate_baseline(s.spec, trainer, lambda: evaluate(s, trainer, base=True))
    gen.answer_base(trainer.model)
    train_output = trainer.train(resume_from_checkpoint=base.resume_from(ctx, s.spec))
    metrics.update(before)
    metrics["train"] = base.train_summary(trainer, train_output)
    metrics["tuned"] = evaluate(s, trainer)
    generation_metrics = gen.score_tuned(trainer.model)
    if generation_metrics:
        metrics["generation"] = generation_metrics
    metrics["method"] = base.method_section(s.spec, trainer.model)
    metrics["objective"] = {"type": "dpo", **(s.spec.objective.preference.wire() if s.spec.objective.preference else {})}
    metrics["summary"] = summary(metrics)
    base.save(ctx, trainer, s.loaded.tokenizer, base.causal_lm_base(ctx, s.precision))
    return RecipeResult(
        metrics=metrics, base_model=s.loaded.identity, model=trainer.model, tokenizer=s.loaded.tokenizer, trainer=trainer
    )
