"""The methods the trainer tests train, with their spec blocks (shared by tests/trainer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Per method: the spec's method block and a learning rate that moves the tiny model in 20 steps.
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "full": ({"type": "full"}, 3e-3),
    "lora": ({"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}, 1e-2),
    "qlora4": ({"type": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}, 1e-2),
    "qlora8": ({"type": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}, 1e-2),
    "dora": ({"type": "dora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}, 1e-2),
    "adalora": ({"type": "adalora", "adalora": {"initR": 8, "targetR": 4, "tinit": 2, "tfinal": 4, "deltaT": 1,
                                                "alpha": 16, "dropout": 0.0}}, 1e-2),
    "ia3": ({"type": "ia3"}, 3e-2),
    "prefix": ({"type": "prefix", "promptLearning": {"numVirtualTokens": 8}}, 3e-2),
    "prompt": ({"type": "prompt", "promptLearning": {"numVirtualTokens": 8, "initText": "Name the color."}}, 3e-2),
    "ptuning": ({"type": "ptuning", "promptLearning": {"numVirtualTokens": 8, "encoderHiddenSize": 32}}, 1e-2),
}
QUANT = {"qlora4": {"bits": 4, "quantType": "nf4", "doubleQuant": True}, "qlora8": {"bits": 8}}
LORA_FAMILY = ("lora", "qlora4", "qlora8", "dora", "adalora")
STEPS = 20


def method_spec(name: str, make_spec: Callable[..., dict[str, Any]], out: Path) -> dict[str, Any]:
    method, lr = METHODS[name]
    spec = make_spec(out, method=method, hyperparameters={"maxSteps": STEPS, "learningRate": lr})
    if name in QUANT:
        spec["model"] = {**spec["model"], "quantization": QUANT[name]}
    if name in LORA_FAMILY:
        spec["output"] = {**spec["output"], "save": ["adapter", "merged"]}
    return spec

