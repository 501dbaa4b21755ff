"""Run one FineTuneJob spec in this process: dispatch to the objective's recipe, publish the result.

`run_job` is what both `finetune run` (a manifest on this machine) and `finetune train` (the
container entry point) call.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api.constants import SCRATCH_DIR
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import Artifact, Manifest

from . import distributed, output, storage, uris
from .metrics import MetricsCallback, TrainerMetrics
from .recipes import RecipeContext, RecipeResult

log = logging.getLogger(__name__)


@dataclass
class Overrides:
    """Settings of one run that are not part of the spec."""

    max_steps: int | None = None
    #: Parent of the scratch folder (default: /scratch in pods, else the system temp dir).
    workdir: Path | None = None
    keep_workdir: bool = False
    progress: bool = True
    #: Serve the Prometheus endpoint; port None = $FINETUNE_METRICS_PORT or the default port.
    serve_metrics: bool = True
    metrics_port: int | None = None
    callbacks: list[Any] = field(default_factory=list)


@dataclass
class RunResult:
    output_uri: str
    artifact: Artifact | None  # None on ranks other than 0 (they do not publish)
    manifest: Manifest | None
    metrics: dict[str, Any]
    recipe: RecipeResult
    metrics_port: int | None = None


def recipe_module(objective: str) -> Any:
    return importlib.import_module(f"finetune_trainer.recipes.{objective}")


def _scratch(parent: Path | None) -> Path:
    if parent is None and os.path.isdir(SCRATCH_DIR) and os.access(SCRATCH_DIR, os.W_OK):
        parent = Path(SCRATCH_DIR)
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="finetune-", dir=parent))


def run_job(spec: FineTuneJobSpec, output_uri: str | None = None, overrides: Overrides | None = None) -> RunResult:
    """Train as the spec says and publish the artifact to `output_uri` (default spec.output.uri)."""
    o = overrides or Overrides()
    dest = output_uri or spec.output.uri
    if uris.is_local(dest):
        uris.local_path(dest).mkdir(parents=True, exist_ok=True)
    # Fail before any training time is spent when the output cannot be written.
    storage.check_writable(dest)
    recipe = recipe_module(spec.objective.type)
    workdir = _scratch(o.workdir)
    metrics = TrainerMetrics()
    port = None
    if o.serve_metrics:
        try:
            port = metrics.serve(o.metrics_port)
        except OSError as exc:  # a busy port on a laptop must not stop a local run
            log.warning("metrics endpoint not started: %s", exc)
    try:
        ctx = RecipeContext(
            spec=spec,
            output_uri=dest,
            workdir=workdir,
            stage=workdir / "artifact",
            max_steps=o.max_steps,
            extra_callbacks=[MetricsCallback(metrics), *o.callbacks],
            progress=o.progress,
        )
        result: RecipeResult = recipe.run(ctx)
        if not distributed.is_main_process():
            # Under torchrun, global rank 0 publishes the one artifact; the other ranks are done.
            return RunResult(dest, None, None, result.metrics, result, port)
        output.write_metrics(ctx.stage, result.metrics)
        manifest, artifact = output.publish(ctx.stage, dest, spec, result.base_model)
        return RunResult(dest, artifact, manifest, result.metrics, result, port)
    finally:
        metrics.close()
        if not o.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
