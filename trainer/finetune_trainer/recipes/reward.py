"""Reward model (objective reward) with TRL's RewardTrainer: a sequence-classification head
(one output, the reward) trained so that chosen answers score above rejected ones.

setup: AutoModelForSequenceClassification(num_labels=1) from the base model (the new `score` head
       is trained in full; with a PEFT method PEFT keeps it in modules_to_save), pad token id set
       (the head reads the last non-pad token), checked preference pairs.
train: RewardTrainer (Bradley-Terry loss); held-out accuracy and margin before and after.
save:  the reward model (adapter, or full weights) + tokenizer; with a LoRA-family method also
       merged/ when asked (base.save). `objective.ppo.rewardModel` points at this artifact (root or merged/).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import StatusMetric, StatusMetrics

from .. import config, methods, models, preference, uris
from ..errors import ConfigError
from . import RecipeContext, RecipeResult, base

log = logging.getLogger(__name__)

SEQ_CLS = "SEQ_CLS"


@dataclass
class Setup:
    spec: FineTuneJobSpec
    precision: config.Precision
    model: Any
    tokenizer: Any
    identity: dict[str, Any]
    data: preference.PreferenceData
    peft_config: Any | None


def load_reward_base(spec: FineTuneJobSpec, precision: config.Precision, ctx: RecipeContext) -> tuple[Any, Any, dict[str, Any]]:
    """The base model with a fresh 1-output classification head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    m = spec.model
    if m.quantization is not None:
        raise ConfigError("objective.type reward does not support model.quantization (qlora); use lora")
    where = uris.resolve(m.uri, ctx.workdir / "model")
    source = str(where) if where is not None else uris.hf_id(m.uri)
    tokenizer = models.load_tokenizer(m, ctx.workdir)
    kwargs: dict[str, Any] = {}
    if m.revision:
        kwargs["revision"] = m.revision
    if m.gguf_file:
        kwargs["gguf_file"] = m.gguf_file
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=precision.dtype, trust_remote_code=m.trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {m.uri}: cannot load as a sequence-classification reward model: {exc}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, models.identity(m, source, model)


def setup(ctx: RecipeContext) -> Setup:
    from transformers import set_seed

    spec = ctx.spec
    precision = config.resolve_precision(spec)
    pairs = preference.load_preference(spec.dataset, ctx.workdir, spec.hyperparameters.seed)
    set_seed(spec.hyperparameters.seed)  # the new head is initialised here
    model, tokenizer, identity = load_reward_base(spec, precision, ctx)
    total = ctx.max_steps or config.total_steps_hint(spec, len(pairs.train))
    peft_cfg = base.peft_config(ctx, tokenizer, total)
    if peft_cfg is not None:
        # A classification task: PEFT then trains and saves the new head (score) in full.
        peft_cfg.task_type = SEQ_CLS
    else:
        methods.apply(model, None)
    return Setup(spec, precision, model, tokenizer, identity, pairs, peft_cfg)


def build_trainer(ctx: RecipeContext, s: Setup) -> Any:
    from trl import RewardConfig, RewardTrainer

    args = config.build_config(
        RewardConfig,
        # Pairs arrive as chosen_ids/rejected_ids: the Trainer cannot count input tokens (it warns each step).
        config.shared_training_args(
            s.spec, ctx.workdir / "checkpoints", s.precision, max_steps=ctx.max_steps, count_tokens=False
        ),
        {"max_length": s.spec.dataset.max_seq_length, "remove_unused_columns": False},
    )
    return RewardTrainer(
        model=s.model,
        args=args,
        train_dataset=s.data.train,
        eval_dataset=s.data.eval,
        processing_class=s.tokenizer,
        peft_config=s.peft_config,
        callbacks=base.training_callbacks(ctx, s.spec),
    )


def evaluate(s: Setup, trainer: Any, *, base: bool = False) -> dict[str, Any]:
    """Held-out pairwise accuracy (chosen scored above rejected), mean margin and loss.

    Before training (base) the head is the freshly initialised one: the numbers of an untrained
    reward model.
    """
    out = trainer.evaluate(metric_key_prefix="eval")  # TRL logs its metrics under eval_
    return {
        "evalLoss": float(out["eval_loss"]),
        "accuracy": float(out["eval_accuracy"]),
        "rewardMargin": float(out["eval_margin"]),
    }


def save(ctx: RecipeContext, s: Setup, trainer: Any) -> None:
    def load_base() -> Any:
        # The fresh head is replaced by the trained one saved with the adapter (modules_to_save).
        return load_reward_base(ctx.spec, s.precision, ctx)[0]

    base.save(ctx, trainer, s.tokenizer, load_base)


def run(ctx: RecipeContext) -> RecipeResult:
    s = setup(ctx)
    trainer = build_trainer(ctx, s)
    metrics: dict[str, Any] = {}
    before = base.evaluate_baseline(s.spec, trainer, lambda: evaluate(s, trainer, base=True))
    train_output = trainer.train(resume_from_checkpoint=base.resume_from(ctx, s.spec))
    metrics.update(before)
    metrics["train"] = base.train_summary(trainer, train_output)
    metrics["tuned"] = evaluate(s, trainer)
    metrics["method"] = base.method_section(s.spec, trainer.model)
    summary: StatusMetrics = {StatusMetric.REWARD_ACCURACY: metrics["tuned"]["accuracy"],
                              StatusMetric.REWARD_MARGIN: metrics["tuned"]["rewardMargin"]}
    if "base" in metrics:
        summary[StatusMetric.BASE_REWARD_ACCURACY] = metrics["base"]["accuracy"]
    metrics["summary"] = summary
    save(ctx, s, trainer)
    return RecipeResult(metrics=metrics, base_model=s.identity, model=trainer.model, tokenizer=s.tokenizer, trainer=trainer)
