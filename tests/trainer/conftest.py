"""Shared runs of the trainer: one real training run per method, reused by every test of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from harness.trainer_runs import method_spec


@pytest.fixture(scope="session")
def trained(make_spec: Callable[..., dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """`trained(method)` -> (spec, RunResult): trains once per method per session."""
    from finetune_api import parse_spec
    from finetune_trainer.runner import Overrides, run_job

    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"run-{name}")
            spec = parse_spec(method_spec(name, make_spec, out / "artifact"))
            result = run_job(spec, None, Overrides(progress=False, serve_metrics=False, workdir=out / "work"))
            cache[name] = (spec, result)
        return cache[name]

    return get
