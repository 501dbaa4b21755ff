"""Recipes: one readable module per objective (torchtune style), all with the same interface.

A recipe is a module `finetune_trainer.recipes.<objective>` (sft, dpo, reward, ppo) exposing

    def run(ctx: RecipeContext) -> RecipeResult

`runner.run_job` builds the context, imports the module named by `spec.objective.type`, calls
`run`, then publishes what the recipe staged (manifest.json last). A recipe:

1. **setup**: loads the model and tokenizer (`models.load_model`), its data (`data.py`), and
   wraps the model with the method (`methods.peft_config` + `methods.apply`); call
   `transformers.set_seed(spec.hyperparameters.seed)` before wrapping so adapters initialise
   reproducibly.
2. **train**: builds its TRL trainer with `args` from `config.py` (never TRL's defaults: fp32 on
   CPU, no gradient checkpointing unless asked) and `callbacks=base.training_callbacks(ctx,
   spec)`, the single place where metrics, the progress bar, method callbacks (AdaLoRA) and
   checkpointing are wired; resumes with `trainer.train(resume_from_checkpoint=
   base.resume_from(ctx))`.
3. **save**: writes into `ctx.stage` (a local folder, published afterwards by the runner) the
   model or adapter and tokenizer (`output.save_model`, `output.save_merged`), and returns the
   metrics for metrics.json: a dict with at least `tuned` (and `base` when the spec asks for a
   baseline) sections, each `{"evalLoss", "perplexity"}` (`evaluation.perplexity.section`),
   plus any recipe-specific sections. The runner writes metrics.json; do not publish yourself.

Recipes raise `errors.PermanentError` subclasses for bad data or config (exit code 42) and let
anything else propagate (retryable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api.spec import FineTuneJobSpec


@dataclass
class RecipeContext:
    """Everything a recipe needs beyond the spec."""

    spec: FineTuneJobSpec
    #: Where the artifact will be published (the runner does it).
    output_uri: str
    #: Scratch space for downloads, HF checkpoints (workdir/checkpoints) and staging.
    workdir: Path
    #: Local folder the recipe saves the artifact into; the runner publishes it.
    stage: Path
    #: --max-steps from the command line; overrides spec.hyperparameters.maxSteps.
    max_steps: int | None = None
    #: Callbacks added by the caller (metrics endpoint, tests).
    extra_callbacks: list[Any] = field(default_factory=list)
    #: Show a progress bar on stderr.
    progress: bool = True
    #: Where checkpoints are published (checkpoints/ under the output URI unless overridden).
    checkpoint_uri: str | None = None


@dataclass
class RecipeResult:
    """What a recipe hands back to the runner."""

    #: Content of metrics.json (`base`, `tuned`, `train`, ...).
    metrics: dict[str, Any]
    #: The base model's identity, for the manifest (`models.LoadedModel.identity`).
    base_model: dict[str, Any]
    #: The trained model in memory (tests compare it with the reloaded artifact).
    model: Any = None
    tokenizer: Any = None
    trainer: Any = None
