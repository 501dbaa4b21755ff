"""Run one FineTuneJob spec in this process: dispatch to the objective's recipe, publish the result.

`run_job` is what both `finetune run` (a manifest on this machine) and `finetune train` (the
container entry point) call.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api.constants import MANIFEST_FILE, METRICS_FILE, SCRATCH_DIR
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import Artifact, Manifest

from . import distributed, output, storage
from .errors import ConfigError
from .metrics import MetricsCallback, TrainerMetrics
from .recipes import Recipe, RecipeContext, RecipeResult, dpo, ppo, reward, sft
from .recipes.base import run_checkpoints_uri

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
    recipe: RecipeResult | None  # None when an earlier run had already published (reused)
    metrics_port: int | None = None
    #: Where this run's checkpoints are published (status.lastCheckpoint is read from there).
    checkpoints_uri: str | None = None
    #: True when the output already held this spec's complete artifact: nothing was trained.
    reused: bool = False


def _comparable(spec_doc: dict[str, Any]) -> dict[str, Any]:
    """A spec's wire form without output.uri (`--output` / $FINETUNE_OUTPUT_URI may move it)."""
    doc = dict(spec_doc)
    doc["output"] = {k: v for k, v in dict(doc.get("output") or {}).items() if k != "uri"}
    return doc


def finished_run(spec: FineTuneJobSpec, dest: str) -> RunResult | None:
    """With resume: auto, the complete artifact an earlier run of this spec left at `dest`.

    A finished job is never silently retrained: the same spec gets the existing artifact back
    (a pod retried after it published must report success, not train again); a different spec
    is a permanent error naming the URI, since overwriting another job's artifact loses it.
    """
    manifest = storage.read_manifest(dest)
    if manifest is None or manifest.kind != "artifact":
        return None
    old, new = _comparable(manifest.spec), _comparable(spec.wire())
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(
            f"{dest} already holds a complete artifact ({MANIFEST_FILE}, created {manifest.created_at}) "
            f"of a different spec (differs in: {', '.join(changed)}); publish to another output URI, "
            "delete it, or set checkpointing.resume: never to train from scratch and replace it"
        )
    artifact = storage.artifact_of(dest)
    raw = storage.read_file(dest, METRICS_FILE)
    metrics = json.loads(raw) if raw else {}
    log.info("%s already holds the complete artifact of this spec: not retraining", dest)
    return RunResult(dest, artifact, manifest, metrics, None, reused=True, checkpoints_uri=run_checkpoints_uri(dest))


#: The recipe of each objective; typed as the contract, so mypy checks every module against it.
RECIPES: dict[str, Recipe] = {"sft": sft, "dpo": dpo, "reward": reward, "ppo": ppo}


def recipe_module(objective: str) -> Recipe:
    return RECIPES[objective]


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
    # Fail before any training time is spent when the output cannot be written (a local output's
    # folder is made there, so that a read-only filesystem or a file in its place is named).
    storage.check_writable(dest)
    # Every rank decides alike (the same manifest), so none trains alone.
    if spec.checkpointing.resume == "auto":
        done = finished_run(spec, dest)
        if done is not None:
            return done
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
        return RunResult(dest, artifact, manifest, result.metrics, result, port, checkpoints_uri=run_checkpoints_uri(ctx.output_uri, ctx.checkpoint_uri))
    finally:
        metrics.close()
        if not o.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
