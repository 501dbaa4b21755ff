"""Small FineTuneJob manifests for the operator tests."""

from __future__ import annotations

import copy
from typing import Any

from finetune_api import API_VERSION, KIND


def job_manifest(name: str, namespace: str = "default", **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny-llama"},
        "dataset": {"train": "s3://data/train.jsonl", "format": "prompt_completion"},
        "method": {"type": "lora"},
        "hyperparameters": {"maxSteps": 20},
        "resources": {"gpusPerNode": 1, "cpu": "2", "memory": "4Gi"},
        "output": {"uri": "s3://out/run-1", "credentialsSecret": {"name": "s3-creds"}},
        # The preflight (on by default) reads real data; these jobs name none and test other things.
        # Its own tests pass preflight={"enabled": True} (tests/operator/test_operator_preflight*.py).
        "preflight": {"enabled": False},
    }
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": copy.deepcopy(spec),
    }
