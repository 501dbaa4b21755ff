"""The spec reaches the TRL/transformers config of every objective, checked on the built trainer.

The trainers are constructed for real (tiny model, toy data) but never trained: what is checked
is `trainer.args`, the config the trainer will use, not any dict of ours.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from finetune_api.resource import parse_spec

OBJECTIVES = ("sft", "dpo", "reward", "ppo")


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A reward model (1-output sequence classifier) from the tiny model, for objective ppo."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-reward")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def objective_spec(
    make_spec: Callable[..., dict[str, Any]], toy_data_dir: Path, tiny_reward_model_dir: Path, tmp_path: Path
) -> Callable[..., dict[str, Any]]:
    """`objective_spec(objective, **sections)`: a wire spec for that objective on the tiny model."""

    def build(objective: str, **sections: Any) -> dict[str, Any]:
        objective_section: dict[str, Any] = {"type": objective}
        if objective == "ppo":
            objective_section["ppo"] = {"rewardModel": str(tiny_reward_model_dir), "responseLength": 4}
        if objective != "sft":
            preference = {"train": str(toy_data_dir / "preference.jsonl"), "format": "preference"}
            sections["dataset"] = {**preference, **sections.get("dataset", {})}
        return make_spec(tmp_path / "out", objective=objective_section, **sections)

    return build


def built_trainer(spec_doc: dict[str, Any], workdir: Path) -> Any:
    """The trainer the objective's recipe builds for this spec (not trained)."""
    from finetune_trainer.recipes import RecipeContext
    from finetune_trainer.runner import recipe_module

    spec = parse_spec(spec_doc)
    ctx = RecipeContext(spec=spec, output_uri=spec.output.uri, workdir=workdir, stage=workdir / "artifact",
                        progress=False)
    recipe = recipe_module(spec.objective.type)
    return recipe.build_trainer(ctx, recipe.setup(ctx))


def trainer_args(spec_doc: dict[str, Any], workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`args` of the trainer the recipe builds for this spec.

    FSDP and DeepSpeed trainers cannot finish construction in one CPU process (the Trainer: "fsdp
    only works in distributed training"; GRPO's DeepSpeed reward model: no process group), after
    they took their args: those are read off the trainer object then (tests/distributed trains
    both for real with two processes).
    """
    import transformers

    made: list[Any] = []
    original = transformers.Trainer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "__init__", init)
    environ = dict(os.environ)  # the args set ACCELERATE_USE_DEEPSPEED / _FSDP for the process
    try:
        return built_trainer(spec_doc, workdir).args
    except Exception:
        args = getattr(made[-1], "args", None) if made else None
        if args is None or not (args.fsdp or args.deepspeed):
            raise
        return args
    finally:
        # DeepSpeed/FSDP settings are process-global: undone so that the next trainer is built as
        # in a fresh process (a ZeRO-3 config would partition every model loaded after it).
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)
        os.environ.clear()
        os.environ.update(environ)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_warmup_ratio_reaches_every_objective(
    objective: str, objective_spec: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """hyperparameters.warmupRatio 0.2 warms the learning rate up over 20% of the steps."""
    spec = objective_spec(objective, hyperparameters={"warmupRatio": 0.2, "scheduler": "linear"})
    trainer = built_trainer(spec, tmp_path / "work")
    assert trainer.args.get_warmup_steps(100) == 20


def _config_classes() -> dict[str, type]:
    from trl import DPOConfig, GRPOConfig, RewardConfig, SFTConfig

    return {"sft": SFTConfig, "dpo": DPOConfig, "reward": RewardConfig, "ppo": GRPOConfig}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_shared_arguments_are_taken_by_every_config_class(objective: str, make_spec: Callable[..., dict[str, Any]],
                                                         tmp_path: Path) -> None:
    """Pinned against the installed transformers/TRL: every shared name is an argument of every
    objective's config class, without a deprecation (build_config would refuse it)."""
    import dataclasses

    from finetune_trainer import config

    spec = parse_spec(make_spec(tmp_path / "out", hyperparameters={"gradientCheckpointing": True}))
    shared = config.shared_training_args(spec, tmp_path, config.resolve_precision(spec))
    cls = _config_classes()[objective]
    assert set(shared) <= {f.name for f in dataclasses.fields(cls)}
    cfg = config.build_config(cls, shared, {})
    assert cfg.activation_checkpointing is True and cfg.gradient_checkpointing is True


def test_renamed_or_unknown_argument_fails_at_build_time(make_spec: Callable[..., dict[str, Any]],
                                                         tmp_path: Path) -> None:
    from finetune_trainer import config
    from trl import DPOConfig

    spec = parse_spec(make_spec(tmp_path / "out"))
    shared = config.shared_training_args(spec, tmp_path, config.resolve_precision(spec))
    # warmup_ratio: removed in transformers 5 (the bug that dropped warmup for dpo/reward/ppo).
    with pytest.raises(TypeError, match=r"DPOConfig \(transformers .*\) has no argument warmup_ratio"):
        config.build_config(DPOConfig, shared, {"warmup_ratio": 0.1})
    # gradient_checkpointing: still accepted, deprecated for activation_checkpointing.
    renamed = {k: v for k, v in shared.items() if k != "activation_checkpointing"}
    with pytest.raises(TypeError, match="argument gradient_checkpointing is deprecated"):
        config.build_config(DPOConfig, renamed, {"gradient_checkpointing": True})
    with pytest.raises(TypeError, match="learning_rate set by both"):
        config.build_config(DPOConfig, shared, {"learning_rate": 1.0})


# --- every field of the spec that a training config carries, on the built trainer ---------------

#: Sections of the spec whose fields the training config carries (nested models are walked).
SECTIONS = ("hyperparameters", "checkpointing", "distributed", "evaluation")


def _zero(args: Any) -> dict[str, Any]:
    return dict(args.hf_deepspeed_config.config["zero_optimization"])


#: field path -> (variant, non-default spec value, read from trainer.args, expected). A variant is
#: a spec that can hold the value (fsdp and deepspeed settings need their strategy).
CARRIED: dict[str, tuple[str, Any, Callable[[Any], Any], Any]] = {
    "hyperparameters.epochs": ("ddp", 3.0, lambda a: a.num_train_epochs, 3.0),
    "hyperparameters.max_steps": ("ddp", 7, lambda a: a.max_steps, 7),
    "hyperparameters.batch_size": ("ddp", 6, lambda a: (a.per_device_train_batch_size, a.per_device_eval_batch_size),
                                   (6, 6)),
    "hyperparameters.gradient_accumulation": ("ddp", 3, lambda a: a.gradient_accumulation_steps, 3),
    "hyperparameters.learning_rate": ("ddp", 0.0123, lambda a: a.learning_rate, 0.0123),
    "hyperparameters.scheduler": ("ddp", "polynomial", lambda a: a.lr_scheduler_type, "polynomial"),
    "hyperparameters.warmup_ratio": ("ddp", 0.2, lambda a: a.get_warmup_steps(100), 20),
    "hyperparameters.weight_decay": ("ddp", 0.05, lambda a: a.weight_decay, 0.05),
    "hyperparameters.optimizer": ("ddp", "sgd", lambda a: a.optim, "sgd"),
    "hyperparameters.max_grad_norm": ("ddp", 0.5, lambda a: a.max_grad_norm, 0.5),
    "hyperparameters.gradient_checkpointing": ("ddp", True, lambda a: (a.activation_checkpointing,
                                                                       a.gradient_checkpointing), (True, True)),
    "hyperparameters.seed": ("ddp", 123, lambda a: (a.seed, a.data_seed), (123, 123)),
    "checkpointing.every_steps": ("ddp", 17, lambda a: a.save_steps, 17),
    "checkpointing.keep": ("ddp", 5, lambda a: a.save_total_limit, 5),
    "evaluation.every_steps": ("ddp", 4, lambda a: (a.eval_strategy, a.eval_steps), ("steps", 4)),
    "distributed.timeout_seconds": ("ddp", 99, lambda a: a.ddp_timeout, 99),
    "distributed.strategy": ("fsdp", "fsdp", lambda a: bool(a.fsdp), True),
    "distributed.fsdp.cpu_ram_efficient_loading": ("fsdp", False, lambda a: a.fsdp_config["cpu_ram_efficient_loading"],
                                                   False),
    "distributed.fsdp.reshard_after_forward": ("fsdp", False, lambda a: a.fsdp_config["reshard_after_forward"], False),
    "distributed.deepspeed.zero_stage": ("deepspeed", 3, lambda a: _zero(a)["stage"], 3),
    "distributed.deepspeed.offload_optimizer": ("deepspeed", True,
                                                lambda a: _zero(a).get("offload_optimizer", {}).get("device"), "cpu"),
    "distributed.deepspeed.offload_params": ("deepspeed", True,
                                             lambda a: _zero(a).get("offload_param", {}).get("device"), "cpu"),
}

#: Fields no training config carries, and why.
NOT_CARRIED = {
    "checkpointing.resume": "decides train(resume_from_checkpoint=...) (recipes/base.py resume_from)",
    "evaluation.metrics": "which of the recipe's own held-out evaluations run (evaluation/), not the Trainer's",
    "evaluation.generation_samples": "prompts answered by evaluation/generation.py, not by the Trainer",
    "evaluation.max_new_tokens": "answer length of evaluation/generation.py, not a Trainer setting",
    "evaluation.baseline": "whether base.evaluate_baseline runs before training",
}
#: Fields one objective's config does not carry, and why.
NOT_CARRIED_BY = {
    "ppo": {"evaluation.every_steps": "GRPOTrainer gets no eval dataset: held-out prompts are scored "
                                      "by the reward model before and after training"},
}


def _model_of(annotation: Any) -> Any:
    """The pydantic model in a field's annotation (`Model` or `Model | None`), else None."""
    from pydantic import BaseModel

    models = [t for t in (annotation, *typing.get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel)]
    return models[0] if models else None


def _leaves(model: Any, prefix: str) -> list[str]:
    """Dotted paths of every field under a pydantic model, nested models walked."""
    out = []
    for name, info in model.model_fields.items():
        nested = _model_of(info.annotation)
        out.extend(_leaves(nested, f"{prefix}{name}.") if nested else [f"{prefix}{name}"])
    return out


def _spec_fields() -> list[str]:
    from finetune_api.spec import FineTuneJobSpec

    sections = FineTuneJobSpec.model_fields
    return [leaf for s in SECTIONS for leaf in _leaves(_model_of(sections[s].annotation), f"{s}.")]


def _default(path: str) -> Any:
    from finetune_api.spec import FineTuneJobSpec

    model: Any = FineTuneJobSpec
    *parents, last = path.split(".")
    for name in parents:
        model = _model_of(model.model_fields[name].annotation)
    return model.model_fields[last].get_default(call_default_factory=True)


def _wire(path: str, value: Any) -> dict[str, Any]:
    """{"hyperparameters": {"warmupRatio": 0.2}} for ("hyperparameters.warmup_ratio", 0.2)."""
    from pydantic.alias_generators import to_camel

    doc: dict[str, Any] = {}
    *parents, last = path.split(".")
    node = doc
    for name in parents:
        node = node.setdefault(to_camel(name), {})
    node[to_camel(last)] = value
    return doc


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_field_is_carried_or_listed(objective: str) -> None:
    """A new field of those sections fails here until it reaches the config or is listed with its reason."""
    fields = _spec_fields()
    listed = set(CARRIED) | set(NOT_CARRIED) | set(NOT_CARRIED_BY.get(objective, {}))
    assert sorted(set(fields) - listed) == [], "add the field to CARRIED or NOT_CARRIED (with why)"
    assert sorted(listed - set(fields)) == [], "listed paths that are no field of the spec"
    assert not set(CARRIED) & set(NOT_CARRIED), "a field is either carried or not"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_field_reaches_the_trainer(
    objective: str, objective_spec: Callable[..., dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every carried field, set to a non-default value in the spec, is in trainer.args of the
    trainer that objective's recipe builds (one trainer per strategy variant)."""
    carried = {p: c for p, c in CARRIED.items() if p not in NOT_CARRIED_BY.get(objective, {})}
    for path, (_, value, _, _) in carried.items():
        assert value != _default(path), f"{path}: {value!r} is the default, the test would prove nothing"
    wrong = {}
    for variant in ("ddp", "fsdp", "deepspeed"):
        fields = {p: c for p, c in carried.items() if c[0] == variant}
        doc: dict[str, Any] = {"distributed": {"strategy": variant}}
        for path, (_, value, _, _) in fields.items():
            doc = _merge(doc, _wire(path, value))
        # make_spec merges each section over its own defaults (maxSteps, batchSize...).
        args = trainer_args(objective_spec(objective, **doc), tmp_path / variant, monkeypatch)
        for path, (_, _, read, expected) in fields.items():
            if read(args) != expected:
                wrong[path] = (read(args), expected)
    assert wrong == {}
