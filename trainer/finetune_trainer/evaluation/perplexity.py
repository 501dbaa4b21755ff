"""Held-out loss and perplexity, for the base model before training and the tuned model after.

The same Trainer evaluates both, on the same tokenized held-out split with the same loss masks,
so the two numbers are comparable. For PEFT models the base is the model with its adapter
disabled (`PeftModel.disable_adapter`, which also skips virtual tokens of prompt learning).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any


def perplexity(loss: float) -> float:
    # exp overflows past ~709; such a model is useless anyway, say so with inf.
    return math.exp(loss) if loss < 700 else math.inf


def section(loss: float) -> dict[str, float]:
    """One section of metrics.json (`base` or `tuned`)."""
    return {"evalLoss": float(loss), "perplexity": perplexity(float(loss))}


def evaluate(trainer: Any, *, base: bool = False) -> dict[str, float]:
    """evalLoss and perplexity of the trainer's model on its eval split (base: adapter disabled)."""
    model = trainer.model
    ctx = model.disable_adapter() if base and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx:
        out = trainer.evaluate(metric_key_prefix="base" if base else "eval")
    key = "base_loss" if base else "eval_loss"
    return section(out[key])
