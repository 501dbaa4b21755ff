"""`finetune run FILE.yaml [--output URI] [--max-steps N]`: run a FineTuneJob manifest here.

Validates the manifest with the same API model as the operator, trains in this process (CPU or
a local GPU) with a progress bar, publishes the artifact, and prints the eval loss before and
after, where the artifact is and how to load it. Exit codes as the container's: 0, 42 for
permanent errors (bad manifest, bad data), 1 for anything else.

Re-running into an output that already holds a complete artifact (manifest.json), with
checkpointing.resume: auto (the default), never retrains silently: the same spec reports the
existing artifact and exits 0 without rewriting it; a different spec exits 42 naming the URI.
Use another --output, delete the artifact, or set resume: never to train again and replace it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from finetune_api import ManifestError
from finetune_api.constants import ExitCode
from finetune_api.spec import PEFT_METHODS

from .errors import exit_code_for

RERUN_HELP = " ".join(__doc__.split("\n\n")[2].split())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune run", description=__doc__.splitlines()[0], epilog=RERUN_HELP)
    p.add_argument("file", metavar="FILE.yaml", help="A FineTuneJob manifest.")
    p.add_argument("--output", metavar="URI", help="Publish here instead of spec.output.uri.")
    p.add_argument("--max-steps", type=int, metavar="N", help="Stop after N optimizer steps.")
    p.add_argument("--workdir", type=Path, metavar="DIR", help="Scratch folder (default: a temp dir).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="Prometheus endpoint port (default $FINETUNE_METRICS_PORT or 9400; 0 = any free port).")
    return p


#: Summary lines: metric key of the `base`/`tuned` sections -> label, in printing order. The
#: recipes report different numbers (sft: loss and perplexity; dpo: margin and accuracy of the
#: implicit reward; reward: pair accuracy; ppo: the reward model's score of held-out answers).
SUMMARY_LABELS = {
    "evalLoss": "eval loss",
    "perplexity": "perplexity",
    "rewardMargin": "reward margin",
    "preferenceAccuracy": "preference accuracy",
    "accuracy": "pair accuracy",
    "heldOutReward": "held-out reward",
    "chosenLogp": "chosen logp",
    "rejectedLogp": "rejected logp",
}


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """`label  base X -> tuned Y` for every number the tuned section holds, whatever the objective."""
    base, tuned = metrics.get("base") or {}, metrics.get("tuned") or {}
    keys = [k for k in SUMMARY_LABELS if k in tuned] + sorted(k for k in tuned if k not in SUMMARY_LABELS)
    width = max((len(SUMMARY_LABELS.get(k, k)) for k in keys), default=0)
    lines = []
    for key in keys:
        value = tuned[key]
        if not isinstance(value, (int, float)):
            continue
        label = SUMMARY_LABELS.get(key, key).ljust(width)
        before = base.get(key)
        if isinstance(before, (int, float)):
            line = f"{label}  base {before:.4f} -> tuned {value:.4f}"
            if key == "evalLoss":
                line += " (dropped)" if value < before else " (did NOT drop)"
        else:
            line = f"{label}  {value:.4f}"
        lines.append(line)
    return lines


def _model_class(objective: str, peft: bool) -> tuple[str, str]:
    """(module, class) that loads the artifact: reward models are sequence classifiers."""
    task = "SequenceClassification" if objective == "reward" else "CausalLM"
    return ("peft", f"AutoPeftModelFor{task}") if peft else ("transformers", f"AutoModelFor{task}")


def how_to_load(uri: str, method: str, merged: bool, objective: str = "sft", base_uri: str | None = None) -> list[str]:
    """Python lines that load the artifact at `uri` (any output form), as printed by `finetune run`.

    Local forms (a path, file://, pvc:// as mounted here) load from the filesystem path; s3:// is
    first copied locally with the storage layer (same AWS_* environment as the run, checked against
    manifest.json), since from_pretrained reads neither file:// nor s3:// URIs. An adapter names
    its base model by the path it was loaded from: for a base model from s3:// that was a scratch
    copy, gone after the run, so the base is fetched too and the adapter applied to it.
    """
    from . import storage

    fetch = "from finetune_trainer.storage import fetch"
    lines: list[str] = []
    if storage.is_local(uri):
        where = repr(storage.resolve(uri)[1])
    else:
        local = "./" + uri.rstrip("/").rsplit("/", 1)[-1]
        lines += [fetch, f"path = str(fetch({uri!r}, {local!r}))  # a local copy, checked against manifest.json"]
        where = "path"
    peft = method in PEFT_METHODS
    module, cls = _model_class(objective, peft)
    full = _model_class(objective, False)[1]
    if peft and base_uri is not None and base_uri.startswith("s3://"):
        head = ", num_labels=1" if objective == "reward" else ""
        lines += [*([] if fetch in lines else [fetch]),
                  f"base = str(fetch({base_uri!r}, './base-model'))  # the base model the adapter was trained on",
                  f"from transformers import AutoTokenizer, {full}",
                  "from peft import PeftModel",
                  f"model = PeftModel.from_pretrained({full}.from_pretrained(base{head}), {where})"]
    else:
        lines += [f"from {module} import {cls}", "from transformers import AutoTokenizer",
                  f"model = {cls}.from_pretrained({where})"]
    lines.append(f"tokenizer = AutoTokenizer.from_pretrained({where})")
    if peft and merged:
        lines.append(f"# or the merged full model: {full}.from_pretrained({where} + '/merged')")
    return lines


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.max_steps is not None and args.max_steps < 1:
        print("finetune run: --max-steps must be at least 1", file=sys.stderr)
        return 2
    from finetune_cli.manifests import load_job

    try:
        job = load_job(Path(args.file), local_run=True)  # local outputs are fine on this machine
    except ManifestError as exc:
        print(str(exc), file=sys.stderr)
        return ExitCode.PERMANENT

    from . import output
    from .evaluation.generation import HEADLINE
    from .runner import Overrides, run_job

    spec = job.spec
    overrides = Overrides(
        max_steps=args.max_steps,
        workdir=args.workdir,
        progress=not args.no_progress,
        metrics_port=args.metrics_port,
    )
    try:
        result = run_job(spec, args.output, overrides)
    except KeyboardInterrupt:
        print("finetune run: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = exit_code_for(exc)
        kind = "permanent error" if code == ExitCode.PERMANENT else "error"
        print(f"finetune run: {kind}: {exc}", file=sys.stderr)
        if code != ExitCode.PERMANENT:
            logging.getLogger(__name__).debug("traceback", exc_info=True)
        return code

    m = result.metrics
    print()
    print(f"FineTuneJob {job.metadata.name}: {spec.method.type} / {spec.objective.type}, "
          f"{m.get('train', {}).get('steps', '?')} steps")
    if result.reused:
        print(f"  already complete: {result.output_uri} holds this spec's artifact (manifest.json); not retrained")
    for line in summary_lines(m):
        print(f"  {line}")
    gen = m.get("generation", {})
    if gen:
        print("  generation  " + ", ".join(f"{k} {gen[k]:.3f}" for k in HEADLINE if k in gen))
    print(f"  artifact    {result.output_uri}  ({len(result.manifest.files)} files, "
          f"{result.artifact.size_bytes / 1e6:.1f} MB, manifest sha256 {result.artifact.sha256[:12]})")
    print("  load it with:")
    for line in how_to_load(result.output_uri, spec.method.type, output.wants_merged(spec),
                            spec.objective.type, spec.model.uri):
        print(f"    {line}")
    return ExitCode.SUCCESS
