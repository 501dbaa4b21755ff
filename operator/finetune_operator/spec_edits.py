"""What an edit of a running FineTuneJob's spec changes, and how each change takes effect.

Most of the spec is immutable (the CRD's CEL rules refuse the edit: `kubectl explain
finetunejob.spec` says which). What may change, and when it takes effect:

- `suspend` and `runPolicy.backoffLimit`, `.activeDeadlineSeconds`, `.ttlSecondsAfterFinished`:
  patched onto the Job at once (the Job controller applies them);
- `runPolicy.stallTimeoutSeconds`: the operator's stall watchdog, at once;
- `checkpointing` and `evaluation`: the trainer reads them from the spec ConfigMap when a pod
  starts. The operator rewrites the ConfigMap when no trainer pod runs (before the first start,
  while suspended, between attempts), so that every rank of a run reads the same spec; pods that
  start afterwards use the new values.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from finetune_api.spec import FineTuneJobSpec

from .builders import job_run_policy

#: Patched onto the live Job (builders.job_run_policy).
JOB_FIELDS = ("runPolicy.backoffLimit", "runPolicy.activeDeadlineSeconds", "runPolicy.ttlSecondsAfterFinished")
#: Read by the operator itself at every reconcile.
OPERATOR_FIELDS = ("runPolicy.stallTimeoutSeconds",)
#: Read by the trainer from the spec ConfigMap when a pod starts.
TRAINER_SECTIONS = ("checkpointing", "evaluation")
#: Told by their own events (Suspended, Resumed).
OWN_EVENTS = ("suspend",)


def changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted wire paths where two specs differ (a list counts as one value)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(f"{r}.") for r in roots)


def for_trainer(paths: list[str]) -> list[str]:
    return [p for p in paths if _under(p, TRAINER_SECTIONS)]


def refused(paths: list[str]) -> list[str]:
    """Changed paths no edit may change: immutable fields that reached the operator anyway (a CRD
    without its CEL rules). They are not applied."""
    allowed = (*JOB_FIELDS, *OPERATOR_FIELDS, *TRAINER_SECTIONS, *OWN_EVENTS)
    return [p for p in paths if not _under(p, allowed)]


def job_patch(job: dict[str, Any], spec: FineTuneJobSpec, suspend: bool | None) -> dict[str, Any]:
    """A merge patch that brings a live Job's mutable fields to the spec (empty when they match).
    `suspend`: what .spec.suspend should be (None: leave it to Kueue)."""
    have = job.get("spec") or {}
    # A None in a merge patch removes the field.
    patch = {k: v for k, v in job_run_policy(spec).items() if have.get(k) != v}
    if suspend is not None and bool(have.get("suspend")) != suspend:
        patch["suspend"] = suspend
    return {"spec": patch} if patch else {}


def describe(paths: list[str], generation: int | None, running: int = 0, written: bool = True) -> str | None:
    """One line for the event of an accepted edit: how each changed field takes effect. `running`:
    trainer pods running now; `written`: whether the spec ConfigMap holds the edit yet."""
    parts: list[str] = []
    job = [p for p in paths if _under(p, JOB_FIELDS)]
    if job:
        parts.append(f"{', '.join(job)}: applied to the Job")
    operator = [p for p in paths if _under(p, OPERATOR_FIELDS)]
    if operator:
        parts.append(f"{', '.join(operator)}: applied by the stall watchdog")
    trainer = for_trainer(paths)
    if trainer and written:
        parts.append(f"{', '.join(trainer)}: written to the spec ConfigMap; trainer pods that start from now on read it")
    elif trainer:
        parts.append(
            f"{', '.join(trainer)}: waits until no trainer pod runs ({running} running now), so that every rank "
            "reads the same spec; suspend and resume the job to apply it sooner")
    bad = refused(paths)
    if bad:
        parts.append(f"{', '.join(bad)}: cannot change after creation, not applied (is the CRD missing its rules?)")
    return f"spec generation {generation}: " + "; ".join(parts) if parts else None
