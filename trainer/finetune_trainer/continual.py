"""Continual fine-tuning: replay of earlier data, and a pull toward the starting weights.

Three pieces, each usable alone:

- `mix_replay(new, earlier, ratio, seed)`: a training set in which `ratio` of the rows are drawn
  (seeded) from the earlier task's data, the rest being all of the new data.
- `WeightAnchor`: the trainable weights at the start, and the penalty
  `weight * sum_i F_i * (theta_i - theta0_i)^2` with F = 1 (`l2`) or the diagonal empirical Fisher
  estimated on replay data (`ewc`). The Fisher is rescaled to mean 1 over all trainable
  weights, so `weight` means the same order of pull for l2 and ewc; EWC only redistributes it
  toward the weights that mattered for the earlier task.
- `with_weight_penalty(TrainerClass)`: a subclass of any transformers/TRL trainer whose loss
  includes the anchor's penalty (logged as `continual_penalty`).

`build_continual(spec, model, earlier_train, collator)` wires the spec's `objective.continual`
block into these: the SFT recipe calls it once and gets the mixed dataset and the trainer class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from finetune_api.status import StatusMetric, StatusMetrics

from .errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

PENALTY_LOG_KEY = "continual_penalty"


# --- Replay ---------------------------------------------------------------------------------


def replay_count(new_rows: int, earlier_rows: int, ratio: float) -> int:
    """Earlier rows to add so they are `ratio` of the mixed set: r / (n + r) = ratio."""
    if not 0 < ratio < 1:
        raise ValueError(f"replay ratio must be in (0, 1), got {ratio}")
    if earlier_rows == 0:
        raise ValueError("replay data is empty")
    return max(1, round(ratio * new_rows / (1 - ratio)))


def replay_indices(earlier_rows: int, count: int, seed: int) -> list[int]:
    """`count` indices into the earlier data: a seeded permutation, repeated if it is too short."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < count:
        out.extend(torch.randperm(earlier_rows, generator=gen).tolist())
    return out[:count]


def mix_replay(new: Any, earlier: Any, ratio: float, seed: int) -> Any:
    """New data plus a seeded `ratio` share of earlier rows, shuffled together.

    Works on `datasets.Dataset` (both with the same columns, e.g. both tokenised by the same
    pipeline) and on plain lists of rows.
    """
    count = replay_count(len(new), len(earlier), ratio)
    picks = replay_indices(len(earlier), count, seed)
    if isinstance(new, list):
        mixed = list(new) + [earlier[i] for i in picks]
        order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        return [mixed[i] for i in order]
    from datasets import concatenate_datasets

    common = [c for c in new.column_names if c in set(earlier.column_names)]
    drop_new = [c for c in new.column_names if c not in common]
    drop_old = [c for c in earlier.column_names if c not in common]
    if set(drop_new) & {"input_ids", "labels"} or set(drop_old) & {"input_ids", "labels"}:
        raise ValueError(
            f"replay data columns {earlier.column_names} do not match the new data {new.column_names}"
        )
    parts = [new.remove_columns(drop_new), earlier.select(picks).remove_columns(drop_old)]
    parts[1] = parts[1].cast(parts[0].features)
    return concatenate_datasets(parts).shuffle(seed=seed)


# --- Regularisation toward the starting weights ----------------------------------------------


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class WeightAnchor:
    """Starting values of the trainable weights and their importance (1 for l2, Fisher for ewc)."""

    kind: Literal["l2", "ewc"]
    weight: float
    params: list[torch.nn.Parameter]
    names: list[str]
    start: list[torch.Tensor]
    importance: list[torch.Tensor] | None  # None means 1 everywhere (l2)

    @classmethod
    def capture(
        cls,
        model: torch.nn.Module,
        kind: Literal["l2", "ewc"],
        weight: float,
        importance: dict[str, torch.Tensor] | None = None,
    ) -> WeightAnchor:
        named = _trainable(model)
        if not named:
            raise ValueError("the model has no trainable parameters to regularise")
        if kind == "ewc" and importance is None:
            raise ValueError("ewc needs a Fisher estimate (importance)")
        return cls(
            kind=kind,
            weight=weight,
            params=[p for _, p in named],
            names=[n for n, _ in named],
            start=[p.detach().clone() for _, p in named],
            importance=[importance[n] for n, _ in named] if importance is not None else None,
        )

    def penalty(self) -> torch.Tensor:
        """weight * sum F * (theta - theta0)^2, differentiable in the current weights."""
        total = self.params[0].new_zeros((), dtype=torch.float32)
        for i, (param, start) in enumerate(zip(self.params, self.start, strict=True)):
            diff = (param.float() - start.to(param.device, torch.float32)) ** 2
            if self.importance is not None:
                diff = diff * self.importance[i].to(param.device)
            total = total + diff.sum()
        return self.weight * total

    def distance(self) -> float:
        """Plain L2 distance of the trainable weights from the start (for reports)."""
        with torch.no_grad():
            sq = sum(
                float(((p.float() - s.to(p.device).float()) ** 2).sum())
                for p, s in zip(self.params, self.start, strict=True)
            )
        return math.sqrt(sq)


def estimate_fisher(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    collator: Any,
    samples: int,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher E[(d loss / d theta)^2] of the trainable weights, one example at a
    time over the first `samples` examples, rescaled to mean 1 (see the module doc)."""
    named = _trainable(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    used = 0
    try:
        for example in list(examples)[:samples]:
            batch = collator([example])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            if loss is None or not torch.isfinite(loss):
                continue
            loss.backward()
            for n, p in named:
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
            used += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if used == 0:
        raise ValueError("no replay example gave a finite loss; cannot estimate the Fisher")
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = total / (used * count)
    if mean <= 0:
        raise ValueError("the Fisher estimate is zero everywhere (do the replay examples carry loss?)")
    return {n: f / used / mean for n, f in fisher.items()}


def with_weight_penalty(trainer_cls: type[T], anchor: WeightAnchor) -> type[T]:
    """A subclass of `trainer_cls` whose training loss adds `anchor.penalty()`.

    The Trainer divides a micro-batch loss by the accumulation steps unless the loss is already
    normalised over the whole accumulated batch; the penalty is scaled the same way, so it counts
    once per optimizer step either way.
    """

    class Penalized(trainer_cls):  # type: ignore[misc, valid-type]
        _anchor = anchor

        def compute_loss(  # type: ignore[no-untyped-def]
            self, model, inputs, return_outputs=False, num_items_in_batch=None
        ):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if not model.training:
                return result
            loss, outputs = result if return_outputs else (result, None)
            penalty = self._anchor.penalty()
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (
                    getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
                ) or getattr(self, "compute_loss_func", None) is not None
            steps = getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
            if scaled:
                penalty = penalty / steps
            self._penalty_sum = getattr(self, "_penalty_sum", 0.0) + float(penalty.detach()) * (
                steps if scaled else 1
            )
            self._penalty_n = getattr(self, "_penalty_n", 0) + 1
            loss = loss + penalty.to(loss.dtype)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if getattr(self, "_penalty_n", 0) and "loss" in logs:
                logs[PENALTY_LOG_KEY] = self._penalty_sum / self._penalty_n
                self._penalty_sum, self._penalty_n = 0.0, 0
            super().log(logs, *args, **kwargs)

    Penalized.__name__ = f"{trainer_cls.__name__}WithWeightPenalty"
    Penalized.__qualname__ = Penalized.__name__
    return Penalized


# --- Forgetting --------------------------------------------------------------------------------


def forgetting_report(before: float, after: float) -> dict[str, float]:
    """Loss on the earlier task's held-out data before and after, and the rise (forgetting)."""
    return {
        "earlier_task_loss_before": before,
        "earlier_task_loss_after": after,
        "forgetting": after - before,
    }


# --- Wiring from the spec ----------------------------------------------------------------------


@dataclass
class ContinualSetup:
    """What a recipe needs from `objective.continual`: the (mixed) training set and trainer class."""

    train: Any
    trainer_cls: type
    anchor: WeightAnchor | None


def build_continual(
    continual: Any,
    model: torch.nn.Module,
    trainer_cls: type,
    train: Any,
    earlier_train: Any | None,
    collator: Any,
    seed: int,
) -> ContinualSetup:
    """Apply a spec's `objective.continual` (replay and regularisation) to a recipe's pieces.

    `model` must already be the trainable model (PEFT wrapped if any): the anchor captures
    exactly the weights the optimizer will move. `earlier_train` is the replay data prepared the
    same way as `train` (None when the spec has no replay).
    """
    mixed = train
    if continual.replay is not None:
        if earlier_train is None:
            raise ValueError("objective.continual.replay is set but no replay data was prepared")
        mixed = mix_replay(train, earlier_train, continual.replay.ratio, seed)
    anchor: WeightAnchor | None = None
    reg = continual.regularization
    if reg is not None and reg.weight > 0:
        importance = None
        if reg.type == "ewc":
            if earlier_train is None:
                raise ValueError("objective.continual.regularization ewc needs replay data for the Fisher")
            importance = estimate_fisher(model, _rows(earlier_train), collator, reg.fisher_samples)
        anchor = WeightAnchor.capture(model, reg.type, reg.weight, importance)
        trainer_cls = with_weight_penalty(trainer_cls, anchor)
    return ContinualSetup(train=mixed, trainer_cls=trainer_cls, anchor=anchor)


def _rows(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return data
    keep = [c for c in data.column_names if c in ("input_ids", "attention_mask", "labels", "completion_mask")]
    return [dict(row) for row in data.select_columns(keep)]


# --- The SFT recipe's entry points ---------------------------------------------------------------


def start_model(spec: Any, loaded: Any, peft_cfg: Any | None, workdir: Path) -> Any:
    """The model to train. Without `objective.continual`: `methods.apply` (base + method). With it,
    training starts from the earlier artifact at `continual.fromArtifact`:

    - an adapter folder (adapter_config.json): with a PEFT method, that adapter is trained further
      (it must be the same PEFT type); with full, it is merged into the base and every weight trains;
    - a full model folder (config.json): loaded in place of the base, then the method is applied.
    """
    from . import methods, uris

    cont = spec.objective.continual
    if cont is None:
        return methods.apply(loaded.model, peft_cfg)
    path = uris.resolve(cont.from_artifact, workdir / "continual")
    if path is None or not path.is_dir():
        raise ConfigError(
            f"objective.continual.fromArtifact {cont.from_artifact}: not a folder of a saved model"
        )
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        kind = PeftConfig.from_pretrained(str(path)).peft_type
        if peft_cfg is None:
            model = PeftModel.from_pretrained(loaded.model, str(path)).merge_and_unload()
            return methods.apply(model, None)
        if kind != peft_cfg.peft_type:
            raise ConfigError(
                f"objective.continual.fromArtifact {cont.from_artifact}: holds a {kind} adapter but "
                f"method.type is {spec.method.type}"
            )
        log.info("continual: training the adapter at %s further", cont.from_artifact)
        return PeftModel.from_pretrained(loaded.model, str(path), is_trainable=True)
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=loaded.model.dtype)
        loaded.model = model
        return methods.apply(model, peft_cfg)
    raise ConfigError(
        f"objective.continual.fromArtifact {cont.from_artifact}: neither an adapter (adapter_config.json) "
        "nor a full model (config.json)"
    )


@dataclass
class SftContinual:
    """The continual pieces of an SFT run: training set, trainer class, earlier held-out data."""

    train: Any
    trainer_cls: type
    anchor: WeightAnchor | None
    earlier_eval: Any | None
    replay_rows: int = 0


def _collate_one(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    # One example at a time: no padding needed.
    return {
        "input_ids": torch.tensor([rows[0]["input_ids"]]),
        "labels": torch.tensor([rows[0]["labels"]]),
    }


def for_sft(
    spec: Any, model: torch.nn.Module, tokenizer: Any, train: Any, workdir: Path, trainer_cls: type
) -> SftContinual:
    """Replay, regularisation and the earlier task's held-out split for the SFT recipe.

    The replay data (same format as the new data) is split as data.load_splits splits any data:
    its train part is what gets replayed, its held-out part measures forgetting.
    """
    from . import data

    cont = spec.objective.continual
    if cont is None:
        return SftContinual(train, trainer_cls, None, None)
    earlier_train = earlier_eval = None
    if cont.replay is not None:
        earlier_ds = spec.dataset.model_copy(
            update={
                "train": cont.replay.data,
                "validation": None,
                "max_samples": None,
                "validation_split": spec.dataset.validation_split or 0.1,
            }
        )
        splits = data.load_splits(earlier_ds, workdir, spec.hyperparameters.seed)
        earlier_train = data.tokenize_rows(splits.train, tokenizer, earlier_ds, "replay")
        earlier_eval = data.tokenize_rows(splits.eval, tokenizer, earlier_ds, "replay validation")
    setup = build_continual(
        cont, model, trainer_cls, train, earlier_train, _collate_one, spec.hyperparameters.seed
    )
    added = len(setup.train) - len(train)
    log.info(
        "continual: %d replay rows mixed into %d new rows; regularisation %s",
        added,
        len(train),
        cont.regularization.type if cont.regularization else "none",
    )
    return SftContinual(setup.train, setup.trainer_cls, setup.anchor, earlier_eval, added)


def earlier_loss(trainer: Any, cont: SftContinual) -> float | None:
    """Loss on the earlier task's held-out data (None without replay data)."""
    if cont.earlier_eval is None:
        return None
    out = trainer.evaluate(eval_dataset=cont.earlier_eval, metric_key_prefix="earlier")
    return float(out["earlier_loss"])


def report(cont: SftContinual, before: float | None, after: float | None) -> dict[str, Any]:
    """The `continual` section of metrics.json."""
    out: dict[str, Any] = {"replayRows": cont.replay_rows}
    if cont.anchor is not None:
        out["regularization"] = cont.anchor.kind
        out["distanceFromStart"] = cont.anchor.distance()
    if before is not None and after is not None:
        r = forgetting_report(before, after)
        out.update(
            {
                "earlierTaskLossBefore": r["earlier_task_loss_before"],
                "earlierTaskLossAfter": r["earlier_task_loss_after"],
                "forgetting": r["forgetting"],
            }
        )
    return out


def summary(section: dict[str, Any]) -> StatusMetrics:
    """Headline numbers of the `continual` section for the termination message."""
    keys = (StatusMetric.EARLIER_TASK_LOSS_BEFORE, StatusMetric.EARLIER_TASK_LOSS_AFTER, StatusMetric.FORGETTING,
            StatusMetric.DISTANCE_FROM_START)
    return {k: float(section[k]) for k in keys if isinstance(section.get(k), (int, float))}
