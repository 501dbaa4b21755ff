"""Checkpoints in object storage, preemption and resume.

HF Trainer writes ``<output_dir>/checkpoint-N`` (model or adapter, optimizer, scheduler, RNG
state, trainer_state.json, which holds the data position); this module makes those durable and
resumable:

``CheckpointSync(checkpoints_uri, keep)``
    A ``TrainerCallback``. On every ``on_save`` it publishes the fresh local ``checkpoint-N`` to
    ``<checkpoints_uri>/step-N/`` (kind "checkpoint", manifest last) and prunes to the newest
    ``keep``. While training it handles SIGTERM: on SIGTERM (preemption, eviction, node drain) the
    Trainer saves a checkpoint at the next optimizer-step boundary; once it is published the
    callback writes the termination message (outcome "preempted", lastCheckpoint) and raises
    ``SystemExit(ExitCode.PREEMPTED)``, so nothing after ``trainer.train`` runs for an unfinished
    run. ``sync.last_checkpoint`` is the status's ``lastCheckpoint``.
``checkpoint_callbacks(spec, checkpoints_uri)``
    ``[CheckpointSync(checkpoints_uri, spec.checkpointing.keep)]``, for recipes/base.py.
``restore_latest(checkpoints_uri, local_dir) -> Path | None``
    A local copy of the newest COMPLETE, intact checkpoint, for
    ``trainer.train(resume_from_checkpoint=...)``; None when there is none.

Usage in a recipe::

    sync = CheckpointSync(checkpoints_uri, keep=spec.checkpointing.keep)
    trainer = Trainer(..., args=TrainingArguments(save_strategy="steps", save_steps=N, ...),
                      callbacks=[sync])
    resume = restore_latest(checkpoints_uri, scratch / "resume") if resume_auto else None
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)  # SystemExit(43) on SIGTERM
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from finetune_api import layout
from finetune_api.constants import ExitCode
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import Checkpoint
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import storage

log = logging.getLogger(__name__)

# Set by the SIGTERM handler, read at each step boundary. Module-level: one process, one signal.
_sigterm = threading.Event()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Only a flag: saving from inside a signal handler would race the training step.
    _sigterm.set()


def install_sigterm_handler() -> Any:
    """Turn SIGTERM into 'checkpoint at the next step boundary, then stop' (main thread only).

    Returns the previous handler, for restore_sigterm_handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _sigterm.clear()
    return signal.signal(signal.SIGTERM, _on_sigterm)


def restore_sigterm_handler(previous: Any) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def sigterm_received() -> bool:
    return _sigterm.is_set()


class CheckpointSync(TrainerCallback):
    """Publish each HF checkpoint to object storage (manifest last), prune, and stop on SIGTERM."""

    def __init__(self, checkpoints_uri: str, keep: int, *, handle_sigterm: bool = True) -> None:
        self.checkpoints_uri = checkpoints_uri.rstrip("/")
        self.keep = keep
        self.handle_sigterm = handle_sigterm
        self.preempted = False
        self.last_checkpoint: Checkpoint | None = None
        self._previous_handler: Any = None

    # SIGTERM is ours only while training: outside it (loading, publishing the artifact, a test
    # process running several trainings) the previous handler applies.
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self.handle_sigterm:
            self._previous_handler = install_sigterm_handler()
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        restore_sigterm_handler(self._previous_handler)
        self._previous_handler = None
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if _sigterm.is_set() and not self.preempted:
            log.warning("SIGTERM received: saving a checkpoint at step %d and stopping", state.global_step)
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if state.is_world_process_zero:
            step = state.global_step
            local = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            uri = layout.step_uri(self.checkpoints_uri, step)
            storage.publish(local, uri, kind="checkpoint", step=step)
            self.last_checkpoint = Checkpoint(step=step, uri=uri, time=datetime.now(UTC))
            storage.prune_checkpoints(self.checkpoints_uri, self.keep)
            log.info("checkpoint step %d published to %s", step, uri)
        if self.preempted:
            self._exit_preempted()
        return control

    def _exit_preempted(self) -> None:
        """Leave at once with ExitCode.PREEMPTED: the rest of the recipe (evaluation, publishing the
        artifact of an unfinished run) must not happen. Every rank leaves the same way."""
        from finetune_api.constants import Reason
        from finetune_api.status import TerminationMessage

        from . import termination

        if self.last_checkpoint is not None:
            termination.write(
                TerminationMessage(
                    outcome="preempted",
                    reason=Reason.PREEMPTED,
                    message=f"stopped on SIGTERM after saving checkpoint step {self.last_checkpoint.step} "
                    f"to {self.last_checkpoint.uri}",
                    last_checkpoint=self.last_checkpoint,
                )
            )
        restore_sigterm_handler(self._previous_handler)
        raise SystemExit(ExitCode.PREEMPTED)


def checkpoint_callbacks(spec: FineTuneJobSpec, checkpoints_uri: str) -> list[TrainerCallback]:
    """What a recipe adds to its Trainer's callbacks (recipes/base.py wires it)."""
    return [CheckpointSync(checkpoints_uri, keep=spec.checkpointing.keep)]


def latest_checkpoint(checkpoints_uri: str) -> Checkpoint | None:
    """The newest complete checkpoint in storage, for status (time = manifest's creation time)."""
    complete = storage.list_complete_checkpoints(checkpoints_uri)
    if not complete:
        return None
    step, uri = complete[-1]
    manifest = storage.read_manifest(uri)
    return Checkpoint(step=step, uri=uri, time=manifest.created_at if manifest else None)


def restore_latest(checkpoints_uri: str, local_dir: Path) -> Path | None:
    """A local, verified copy of the newest complete checkpoint; older ones if the newest is damaged."""
    for step, uri in reversed(storage.list_complete_checkpoints(checkpoints_uri)):
        try:
            if storage.is_local(uri):
                storage.verify(uri)  # remote fetches are verified against the manifest as they land
            path = storage.fetch(uri, Path(local_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}")
        except storage.IntegrityError as exc:
            log.warning("checkpoint step %d at %s is damaged (%s); trying an older one", step, uri, exc)
            continue
        log.info("resuming from checkpoint step %d (%s)", step, uri)
        return path
    return None


__all__ = [
    "CheckpointSync",
    "checkpoint_callbacks",
    "install_sigterm_handler",
    "latest_checkpoint",
    "restore_latest",
    "restore_sigterm_handler",
    "sigterm_received",
]
