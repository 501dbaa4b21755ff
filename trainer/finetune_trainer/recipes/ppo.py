"""RLHF policy optimisation (objective ppo) against a reward model trained with objective reward.

TRL 1.16 no longer ships PPOTrainer (neither in `trl` nor in `trl.experimental`). The closest
on-policy trainer that takes a reward model is GRPOTrainer: it samples a group of answers per
prompt from the current policy, scores them with the reward model, and optimises PPO's clipped
surrogate objective on group-normalised advantages (no value network), with a KL penalty toward
the starting policy. The spec maps onto it as:

  objective.ppo.klCoef         -> beta (KL penalty weight; the reference is the starting policy:
                                  the base with adapters disabled for PEFT, a frozen copy for full)
  objective.ppo.responseLength -> max_completion_length
  objective.ppo.ppoEpochs      -> num_iterations (optimisation passes over each batch of rollouts)
  objective.ppo.temperature    -> sampling temperature of rollouts

setup: policy + tokenizer, prompts from the dataset (any format that has prompts), reward model
       loaded from objective.ppo.rewardModel (a full model, merged/, or an adapter).
train: GRPOTrainer; mean reward and KL to the starting policy are logged each step.
save:  adapter or full policy, metrics: reward on held-out prompts before/after, KL, reward curve.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.constants import MERGED_DIR
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import StatusMetric, StatusMetrics

from .. import config, data, methods, models, preference, uris
from ..errors import ConfigError, DataError
from . import RecipeContext, RecipeResult, base

log = logging.getLogger(__name__)

GROUP_SIZES = (8, 4, 2)


@dataclass
class Setup:
    spec: FineTuneJobSpec
    precision: config.Precision
    loaded: models.LoadedModel
    train_prompts: Any  # datasets.Dataset {prompt}
    eval_prompts: list[Any]
    reward_model: Any
    reward_tokenizer: Any
    peft_config: Any | None


# --- prompts ------------------------------------------------------------------------------


def prompt_of(rec: dict[str, Any], fmt: str) -> Any:
    """The prompt of one canonical record (a string, or messages for chat data)."""
    if fmt in ("prompt_completion", "preference"):
        return rec.get("prompt") or None
    if fmt == "alpaca":
        return data.alpaca_prompt(rec["instruction"], rec.get("input", ""))
    if fmt == "messages":
        msgs = rec["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        return msgs[:last] or None
    raise DataError(f"dataset.format {fmt} has no prompts to answer; use prompt_completion, alpaca, messages or preference")


def load_prompts(spec: FineTuneJobSpec, ctx: RecipeContext) -> tuple[list[Any], list[Any]]:
    ds = spec.dataset
    if ds.format == "preference":
        pairs = preference.load_preference(ds, ctx.workdir, spec.hyperparameters.seed)
        return list(pairs.train["prompt"]), list(pairs.eval["prompt"])
    splits = data.load_splits(ds, ctx.workdir, spec.hyperparameters.seed)
    train = [p for p in (prompt_of(r, ds.format) for r in splits.train) if p]
    held = [p for p in (prompt_of(r, ds.format) for r in splits.eval) if p]
    if not train:
        raise DataError(f"{ds.train}: no row has a non-empty prompt (column {ds.fields.column('prompt')!r})")
    return train, held


# --- the reward model ---------------------------------------------------------------------


def load_reward_model(uri: str, workdir: Path, precision: config.Precision) -> tuple[Any, Any]:
    """A reward model artifact: full weights at the root or under merged/, or a PEFT adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = uris.resolve(uri, workdir / "reward-model")
    source: str = str(path) if path is not None else uris.hf_id(uri)
    if path is not None:
        if not path.exists():
            raise ConfigError(f"objective.ppo.rewardModel {uri}: no such file or folder")
        if (path / MERGED_DIR / "config.json").is_file():
            source = str(path / MERGED_DIR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        adapter = path is not None and Path(source, "adapter_config.json").is_file()
        if adapter:
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(
                source, num_labels=1, dtype=precision.dtype
            ).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=precision.dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"objective.ppo.rewardModel {uri}: cannot load a reward model: {exc}") from None
    if getattr(model.config, "num_labels", 1) != 1:
        raise ConfigError(f"objective.ppo.rewardModel {uri}: has {model.config.num_labels} outputs, a reward model has 1")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


# --- recipe -------------------------------------------------------------------------------


def setup(ctx: RecipeContext) -> Setup:
    import datasets
    from transformers import set_seed

    spec = ctx.spec
    if spec.objective.ppo is None:
        raise ConfigError("objective.ppo is missing (objective.type ppo needs objective.ppo.rewardModel)")
    precision = config.resolve_precision(spec)
    train, held = load_prompts(spec, ctx)
    reward_model, reward_tokenizer = load_reward_model(spec.objective.ppo.reward_model, ctx.workdir, precision)
    loaded = models.load_model(spec, precision, ctx.workdir)
    total = ctx.max_steps or config.total_steps_hint(spec, len(train))
    peft_cfg = base.peft_config(ctx, loaded.tokenizer, total)
    set_seed(spec.hyperparameters.seed)
    if peft_cfg is None:
        methods.apply(loaded.model, None)
    train_ds = datasets.Dataset.from_list([{"prompt": p} for p in train])
    return Setup(spec, precision, loaded, train_ds, held, reward_model, reward_tokenizer, peft_cfg)


def group_size(spec: FineTuneJobSpec) -> int:
    hp = spec.hyperparameters
    effective = hp.batch_size * hp.gradient_accumulation
    for g in GROUP_SIZES:
        if effective % g == 0:
            return g
    raise ConfigError(
        f"objective ppo samples groups of at least 2 answers per prompt: hyperparameters.batchSize * "
        f"gradientAccumulation ({effective}) must be even"
    )


def grpo_config(ctx: RecipeContext, s: Setup) -> Any:
    from trl import GRPOConfig

    ppo = s.spec.objective.ppo
    assert ppo is not None
    return config.build_config(
        GRPOConfig,
        # No eval_dataset: held-out prompts are scored by the reward model before and after (evaluate).
        config.shared_training_args(
            s.spec, ctx.workdir / "checkpoints", s.precision, max_steps=ctx.max_steps, has_eval=False
        ),
        {
            "beta": ppo.kl_coef,
            "num_iterations": ppo.ppo_epochs,
            "max_completion_length": ppo.response_length,
            "temperature": ppo.temperature,
            "num_generations": group_size(s.spec),
            "remove_unused_columns": False,
            "log_completions": False,
        },
    )


def build_trainer(ctx: RecipeContext, s: Setup) -> Any:
    from trl import GRPOTrainer

    return GRPOTrainer(
        model=s.loaded.model,
        reward_funcs=s.reward_model,
        args=grpo_config(ctx, s),
        train_dataset=s.train_prompts,
        processing_class=s.loaded.tokenizer,
        reward_processing_classes=s.reward_tokenizer,
        peft_config=s.peft_config,
        callbacks=base.training_callbacks(ctx, s.spec),
    )


def evaluate(s: Setup, trainer: Any, *, base: bool = False) -> dict[str, Any]:
    """Mean reward of greedy answers to the held-out prompts (base: with the adapter disabled)."""
    return {"heldOutReward": held_out_reward(s, trainer.model, disable_adapter=base)}


def held_out_reward(s: Setup, model: Any, *, disable_adapter: bool = False) -> float:
    """Mean reward-model score of greedy answers to the held-out prompts."""
    import contextlib

    from ..evaluation.generation import generate_answers, reward_model_judge

    if not s.eval_prompts:
        return float("nan")
    prompts = [preference.prompt_text(p, s.loaded.tokenizer) for p in s.eval_prompts]
    ctx = model.disable_adapter() if disable_adapter and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx:
        answers = generate_answers(model, s.loaded.tokenizer, prompts, max_new_tokens=s.spec.objective.ppo.response_length)  # type: ignore[union-attr]
    judge = reward_model_judge(s.reward_model, s.reward_tokenizer, max_length=s.spec.dataset.max_seq_length)
    return statistics.fmean(judge(prompts, answers))


def rollout_summary(trainer: Any) -> dict[str, Any]:
    """Reward and KL to the starting policy over the run, from the trainer's logs."""
    history = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [float(h["reward"]) for h in history]
    kls = [float(h["kl"]) for h in history if "kl" in h]
    k = max(1, len(rewards) // 4)
    out: dict[str, Any] = {
        "rewardCurve": rewards,
        "firstRewards": statistics.fmean(rewards[:k]) if rewards else None,
        "lastRewards": statistics.fmean(rewards[-k:]) if rewards else None,
    }
    if kls:
        out.update({"klCurve": kls, "finalKl": kls[-1], "meanKl": statistics.fmean(kls)})
    return out


def run(ctx: RecipeContext) -> RecipeResult:
    s = setup(ctx)
    trainer = build_trainer(ctx, s)
    # With a PEFT method the base is the policy with its adapter disabled: no checkpoint changes it.
    peft = hasattr(trainer.model, "disable_adapter")
    before = base.evaluate_baseline(
        s.spec, trainer, lambda: evaluate(s, trainer, base=True), survive_resume=("base",) if peft else ()
    )
    train_output = trainer.train(resume_from_checkpoint=base.resume_from(ctx, s.spec))
    metrics: dict[str, Any] = dict(before)
    metrics["train"] = base.train_summary(trainer, train_output)
    metrics["rollouts"] = rollout_summary(trainer)
    metrics["tuned"] = evaluate(s, trainer)
    metrics["method"] = base.method_section(s.spec, trainer.model)
    ppo = s.spec.objective.ppo
    assert ppo is not None
    metrics["objective"] = {"type": "ppo", "trainer": "trl.GRPOTrainer", "groupSize": group_size(s.spec), **ppo.wire()}
    summary: StatusMetrics = {StatusMetric.HELD_OUT_REWARD: metrics["tuned"]["heldOutReward"]}
    if "base" in metrics:
        summary[StatusMetric.BASE_HELD_OUT_REWARD] = metrics["base"]["heldOutReward"]
    for key in (StatusMetric.FINAL_KL, StatusMetric.LAST_REWARDS):
        if metrics["rollouts"].get(key) is not None:
            summary[key] = metrics["rollouts"][key]
    metrics["summary"] = summary
    base.save(ctx, trainer, s.loaded.tokenizer, base.causal_lm_base(ctx, s.precision))
    log.info("ppo (GRPO) rollouts: %s", json.dumps({k: v for k, v in metrics["rollouts"].items() if "Curve" not in k}))
    return RecipeResult(
        metrics=metrics, base_model=s.loaded.identity, model=trainer.model, tokenizer=s.loaded.tokenizer, trainer=trainer
    )
