"""`finetune train`: the trainer container's entry point.

Reads the spec JSON the operator mounts ($FINETUNE_SPEC_PATH), validates it with the same API
model, trains, publishes to $FINETUNE_OUTPUT_URI (default spec.output.uri), and writes the
termination message. Exit codes: 0 success; 42 (ExitCode.PERMANENT) for a bad spec, bad data or
denied access (the Job fails at once); 43 when preempted after a checkpoint (the checkpointing
module exits with it); anything else is retried by the Job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

from finetune_api import ManifestError, parse_spec
from finetune_api.constants import ExitCode, Reason
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import Checkpoint, StatusMetric, StatusMetrics, TerminationMessage

from . import termination
from .errors import PermanentError, exit_code_for

log = logging.getLogger("finetune_trainer")

#: Final metrics copied into the termination message (status.metrics): section, key -> name.
_SUMMARY = (("tuned", "evalLoss", StatusMetric.EVAL_LOSS), ("tuned", "perplexity", StatusMetric.PERPLEXITY),
            ("base", "evalLoss", StatusMetric.BASE_EVAL_LOSS), ("train", "finalLoss", StatusMetric.LOSS),
            ("train", "tokensPerSecond", StatusMetric.TOKENS_PER_SECOND), ("train", "steps", StatusMetric.STEPS))


def read_spec(path: str | None) -> FineTuneJobSpec:
    from .errors import ConfigError

    if not path:
        raise ConfigError("FINETUNE_SPEC_PATH is not set: the operator mounts the spec there")
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such spec file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    try:
        return parse_spec(doc)
    except ManifestError as exc:
        raise ConfigError(f"{path}: " + "; ".join(exc.lines)) from None


def summary_metrics(metrics: dict[str, dict[str, Any]]) -> StatusMetrics:
    """status.metrics from metrics.json: only numbers, only names of StatusMetric."""
    out: StatusMetrics = {}
    for section, key, name in _SUMMARY:
        value = metrics.get(section, {}).get(key)
        if isinstance(value, (int, float)):
            out[name] = float(value)
    # Recipes put their own headline numbers (reward margin, win-rate, forgetting...) in `summary`.
    for raw, value in metrics.get("summary", {}).items():
        try:
            name = StatusMetric(raw)
        except ValueError:
            log.warning("summary metric %r is not a StatusMetric name: not reported in status.metrics", raw)
            continue
        if isinstance(value, (int, float)) and name not in out:
            out[name] = float(value)
    return out


def _last_checkpoint(checkpoints_uri: str | None) -> Checkpoint | None:
    """The newest complete checkpoint, for status.lastCheckpoint. The artifact is out already:
    a failed listing only leaves the field empty, it must not fail the job."""
    if not checkpoints_uri:
        return None
    from .checkpointing import latest_checkpoint

    try:
        return latest_checkpoint(checkpoints_uri)
    except Exception as exc:
        log.warning("cannot list checkpoints at %s for status.lastCheckpoint: %s", checkpoints_uri, exc)
        return None


def _model_cache(spec: FineTuneJobSpec | None) -> Literal["hit", "miss", "refetched"] | None:
    """status.modelCache: how this process got the base model through the shared cache."""
    if spec is None:
        return None
    from . import cache

    return cache.outcome(spec.model.uri)


def main(argv: list[str]) -> int:
    from finetune_api.constants import Env

    parser = argparse.ArgumentParser(prog="finetune train", description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, help="Override hyperparameters.maxSteps.")
    args = parser.parse_args(argv)
    spec: FineTuneJobSpec | None = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # World size > 1: re-run this entry point under torchrun, one process per GPU.
        from . import launcher

        launched = launcher.maybe_launch(argv)
        if launched is not None:
            return launched
        spec = read_spec(os.environ.get(Env.SPEC_PATH))
        from . import startup

        startup.begin(spec)  # before the heavy imports below: unused libraries out, the model read ahead
        from .runner import Overrides, run_job

        result = run_job(spec, os.environ.get(Env.OUTPUT_URI) or None,
                         Overrides(max_steps=args.max_steps, progress=sys.stderr.isatty()))
    except BaseException as exc:
        if isinstance(exc, SystemExit):  # e.g. the preemption handler's exit 43
            raise
        code = exit_code_for(exc)
        reason = getattr(exc, "reason", None) or (Reason.PERMANENT_ERROR if code == ExitCode.PERMANENT else Reason.FAILED)
        if isinstance(exc, PermanentError) or code == ExitCode.PERMANENT:
            log.error("permanent error: %s", exc)
        else:
            log.exception("training failed (retryable)")
        termination.write(TerminationMessage(outcome="failed", reason=reason, message=f"{type(exc).__name__}: {exc}",
                                             model_cache=_model_cache(spec)))
        return code
    if result.artifact is None:  # a rank other than 0: rank 0 published and reports
        return ExitCode.SUCCESS
    message = (f"artifact already published to {result.output_uri} by an earlier run of this spec; not retrained"
               if result.reused else f"artifact published to {result.output_uri}")
    termination.write(TerminationMessage(
        outcome="succeeded", reason=Reason.SUCCEEDED, message=message,
        artifact=result.artifact, metrics=summary_metrics(result.metrics),
        last_checkpoint=_last_checkpoint(result.checkpoints_uri),
        model_cache=_model_cache(spec),
    ))
    log.info("artifact %s (manifest sha256 %s)", result.output_uri, result.artifact.sha256)
    return ExitCode.SUCCESS


if __name__ == "__main__":  # one rank of a torchrun launch (launcher.torchrun_command)
    from . import launcher

    launcher.run_rank(main, sys.argv[1:])
