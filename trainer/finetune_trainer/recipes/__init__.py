"""Recipes: one readable module per objective (torchtune style), all with the same interface.

A recipe is a module `finetune_trainer.recipes.<objective>` (sft, dpo, reward, ppo) that
implements `Recipe` (below; `runner.RECIPES` holds the four, so mypy checks each against it).
`runner.run_job` builds the context, calls the module's `run`, then publishes what the recipe
staged (manifest.json last). No recipe imports another: what they share is in `config.py` (the
training arguments) and `recipes/base.py` (callbacks, resume point, the one baseline evaluation,
the one save of the trained model, the training summary). A recipe:

1. **setup**: loads the model and tokenizer (`models.load_model`), its data (`data.py`,
   `preference.py`), and the method (`methods.peft_config` + `methods.apply`); calls
   `transformers.set_seed(spec.hyperparameters.seed)` before wrapping so adapters initialise
   reproducibly.
2. **build_trainer**: its TRL trainer with `args=config.build_config(<TRL config class>,
   config.shared_training_args(...), {<only this objective's arguments>})` (never TRL's defaults:
   fp32 on CPU, no gradient checkpointing unless asked) and `callbacks=base.training_callbacks(ctx,
   spec)`, the single place where metrics, the progress bar, method callbacks (AdaLoRA) and
   checkpointing are wired.
3. **evaluate**: its held-out numbers; `base.evaluate_baseline` runs it on the model before
   training (evaluation.baseline), `run` again after.
4. **run**: the above, `trainer.train(resume_from_checkpoint=base.resume_from(ctx, spec))`,
   `base.save` into `ctx.stage` (a local folder, published afterwards by the runner), and the
   metrics for metrics.json: `tuned` (and `base`) sections, `train`, `method`, recipe sections,
   and `summary`, the headline numbers of status.metrics. Do not publish yourself.

Recipes raise `errors.PermanentError` subclasses for bad data or config (exit code 42) and let
anything else propagate (retryable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class Recipe(Protocol):
    """What every recipe module implements; `s` is the module's own Setup (what setup returned)."""

    def setup(self, ctx: RecipeContext) -> Any:
        """Model, tokenizer, data and method, ready for the trainer."""

    def build_trainer(self, ctx: RecipeContext, s: Any) -> Any:
        """The objective's TRL trainer, not yet trained."""

    def evaluate(self, s: Any, trainer: Any, *, base: bool = False) -> dict[str, Any]:
        """Held-out numbers of the trainer's model (base: the model before training)."""

    def run(self, ctx: RecipeContext) -> RecipeResult:
        """Setup, train, evaluate and save; the metrics for metrics.json."""
