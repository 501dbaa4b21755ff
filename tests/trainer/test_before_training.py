"""recipes.base.evaluate_before_training: when the evaluations before training run (fast, no model).

The Trainer cannot evaluate before train() in a distributed run (DDP: no gradient averaging after
it; DeepSpeed, FSDP2: errors). tests/distributed runs the real recipes there and compares the base
loss and the loss trajectory with one process's; these tests pin the scheduling.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from finetune_trainer.recipes import base
from transformers import TrainerControl, TrainerState


class FakeTrainer:
    """What evaluate_before_training reads of a Trainer, and a train() that only starts."""

    def __init__(self, *, deepspeed: bool = False, fsdp: bool = False, world_size: int = 1) -> None:
        self.is_deepspeed_enabled = deepspeed
        self.is_fsdp_enabled = fsdp
        self.args = SimpleNamespace(world_size=world_size)
        self.callbacks: list[Any] = []

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def train(self, resumed_step: int = 0) -> None:
        state = TrainerState()
        state.global_step = resumed_step  # a resumed run's state comes from its checkpoint
        control = TrainerControl()
        for callback in self.callbacks:
            callback.on_train_begin(None, state, control)


def evaluations(calls: list[str]) -> dict[str, Any]:
    def make(name: str) -> Any:
        def run() -> dict[str, float]:
            calls.append(name)
            return {"evalLoss": float(len(calls))}
        return run
    return {"base": make("base"), "earlier": make("earlier")}


def test_in_one_process_without_deepspeed_or_fsdp_they_run_at_once() -> None:
    calls: list[str] = []
    trainer = FakeTrainer()
    results = base.evaluate_before_training(trainer, evaluations(calls))
    assert calls == ["base", "earlier"]
    assert results == {"base": {"evalLoss": 1.0}, "earlier": {"evalLoss": 2.0}}
    assert trainer.callbacks == []


@pytest.mark.parametrize("kind", [{"deepspeed": True}, {"fsdp": True}, {"world_size": 2}], ids=["deepspeed", "fsdp", "ddp"])
def test_in_a_distributed_run_they_run_when_training_starts(kind: dict[str, Any]) -> None:
    calls: list[str] = []
    trainer = FakeTrainer(**kind)
    results = base.evaluate_before_training(trainer, evaluations(calls))
    assert calls == [] and results == {}  # Trainer.evaluate would fail here
    trainer.train()
    assert calls == ["base", "earlier"]
    assert results == {"base": {"evalLoss": 1.0}, "earlier": {"evalLoss": 2.0}}
    trainer.train()  # once only (a second train() is not "before training")
    assert calls == ["base", "earlier"]


def test_a_resumed_run_skips_what_needs_the_starting_weights(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    trainer = FakeTrainer(deepspeed=True)
    results = base.evaluate_before_training(trainer, evaluations(calls), survive_resume=("base",))
    with caplog.at_level(logging.WARNING):
        trainer.train(resumed_step=3)
    # The base (PEFT adapter disabled) is unchanged by a checkpoint; the earlier-task loss is not.
    assert calls == ["base"] and set(results) == {"base"}
    assert "earlier: not evaluated" in caplog.text and "step 3" in caplog.text


def test_nothing_asked_nothing_registered() -> None:
    trainer = FakeTrainer(deepspeed=True)
    assert base.evaluate_before_training(trainer, {}) == {}
    assert trainer.callbacks == []


def test_in_one_process_what_training_cannot_change_runs_after_it() -> None:
    calls: list[str] = []
    trainer = FakeTrainer()
    results = base.evaluate_before_training(trainer, evaluations(calls), after_training=("base",))
    assert calls == ["earlier"] and results == {"earlier": {"evalLoss": 1.0}}  # not before the first step
    trainer.train()
    assert results.finish() is results
    assert calls == ["earlier", "base"]
    assert results == {"earlier": {"evalLoss": 1.0}, "base": {"evalLoss": 2.0}}
    results.finish()  # once only
    assert calls == ["earlier", "base"]


def test_in_a_distributed_run_after_training_keeps_its_place_at_train_begin() -> None:
    calls: list[str] = []
    trainer = FakeTrainer(world_size=2)
    results = base.evaluate_before_training(trainer, evaluations(calls), after_training=("base",))
    trainer.train()
    assert calls == ["base", "earlier"]
    results.finish()
    assert calls == ["base", "earlier"]
