"""Pure status computation: what the cluster shows -> FineTuneJobStatus, and the milestones between two.

Inputs are plain dicts as the API server returns them (the batch/v1 Job, its pods), the trainer's
scraped metrics, and the previous status. No I/O here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from finetune_api.constants import ConditionType, ExitCode, Phase, Reason, TrainerMetric
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import Condition, FineTuneJobStatus, Progress, TerminationMessage
from pydantic import ValidationError

from .builders import COMPLETION_INDEX_ANNOTATION, DISRUPTION_TARGET, TRAINER_CONTAINER, job_name

# Annotation the operator puts on a pod before it restarts it, so the restart is reported right.
RESTART_REASON_ANNOTATION = "finetune.dev/restart-reason"

# Scraped trainer metric -> key in status.metrics.
STATUS_METRICS = {
    TrainerMetric.LOSS: "loss",
    TrainerMetric.EVAL_LOSS: "evalLoss",
    TrainerMetric.LEARNING_RATE: "learningRate",
    TrainerMetric.TOKENS_PER_SECOND: "tokensPerSecond",
}

# Job condition reasons of batch/v1 -> ours.
_JOB_FAILURE_REASONS = {
    "PodFailurePolicy": Reason.PERMANENT_ERROR,
    "BackoffLimitExceeded": Reason.BACKOFF_LIMIT_EXCEEDED,
    "DeadlineExceeded": Reason.DEADLINE_EXCEEDED,
}


def now_utc() -> datetime:
    # Kubernetes times have second precision; so do ours, so that rewrites compare equal.
    return datetime.now(UTC).replace(microsecond=0)


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True)
class Observed:
    """Everything the operator saw for one FineTuneJob in one reconcile."""

    generation: int | None
    job: dict[str, Any] | None = None
    pods: tuple[dict[str, Any], ...] = ()
    # Scraped trainer metrics (full Prometheus names), None when nothing could be scraped.
    metrics: dict[str, float] | None = None
    # The watchdog's verdict: a message when the step has not moved for too long.
    stalled: str | None = None
    now: datetime | None = None


# --- conditions -------------------------------------------------------------------------------


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> None:
    """Insert or update a condition; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    for i, cond in enumerate(conditions):
        if cond.type == type_:
            changed = cond.status != value
            conditions[i] = Condition(
                type=type_,
                status=value,  # type: ignore[arg-type]
                reason=reason,
                message=message,
                last_transition_time=now if changed or cond.last_transition_time is None else cond.last_transition_time,
                observed_generation=generation,
            )
            return
    conditions.append(
        Condition(
            type=type_,
            status=value,  # type: ignore[arg-type]
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=generation,
        )
    )


def get_condition(status: FineTuneJobStatus | None, type_: str) -> Condition | None:
    if status is None:
        return None
    return next((c for c in status.conditions if c.type == type_), None)


def is_true(status: FineTuneJobStatus | None, type_: str) -> bool:
    cond = get_condition(status, type_)
    return cond is not None and cond.status == "True"


# --- reading the Job and its pods ---------------------------------------------------------------


def _job_condition(job: dict[str, Any], *types: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "True":
            return dict(cond)
    return None


def trainer_state(pod: dict[str, Any]) -> dict[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == TRAINER_CONTAINER:
            return dict(cs.get("state") or {})
    return {}


def exit_code(pod: dict[str, Any]) -> int | None:
    terminated = trainer_state(pod).get("terminated")
    return None if terminated is None else int(terminated.get("exitCode", 0))


def termination_message(pod: dict[str, Any]) -> TerminationMessage | None:
    terminated = trainer_state(pod).get("terminated") or {}
    text = terminated.get("message")
    if not text:
        return None
    try:
        return TerminationMessage.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        return None


def disruption(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == DISRUPTION_TARGET and cond.get("status") == "True":
            return dict(cond)
    return None


def is_disrupted(pod: dict[str, Any]) -> bool:
    return disruption(pod) is not None or exit_code(pod) == ExitCode.PREEMPTED


def _phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "")


def _finished_at(pod: dict[str, Any]) -> str:
    terminated = trainer_state(pod).get("terminated") or {}
    return str(terminated.get("finishedAt") or pod["metadata"].get("creationTimestamp") or "")


def _index(pod: dict[str, Any]) -> int:
    return int((pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "0") or 0)


def failure_reason(pod: dict[str, Any]) -> str:
    """Why one pod failed, in one line (for status.lastRestartReason and events)."""
    annotations = pod["metadata"].get("annotations") or {}
    if RESTART_REASON_ANNOTATION in annotations:
        return annotations[RESTART_REASON_ANNOTATION]
    cond = disruption(pod)
    if cond is not None:
        return f"{Reason.PREEMPTED}: {cond.get('reason', '')}: {cond.get('message', '')}".rstrip(": ")
    code = exit_code(pod)
    if code == ExitCode.PREEMPTED:
        return f"{Reason.PREEMPTED}: the trainer saved a checkpoint and exited with code {code}"
    msg = termination_message(pod)
    detail = f": {msg.reason}: {msg.message}" if msg is not None and (msg.reason or msg.message) else ""
    status = pod.get("status") or {}
    if code is None:
        return f"{Reason.FAILED}: {status.get('reason') or 'pod failed'}{detail}"
    return f"{Reason.FAILED}: exit code {code}{detail}"


def _created(pod: dict[str, Any]) -> str:
    return str(pod["metadata"].get("creationTimestamp") or "")


def replaced_failures(pods: Iterable[dict[str, Any]], failed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed pods followed by a newer pod of the same completion index, oldest first."""
    by_index: dict[int, list[dict[str, Any]]] = {}
    for pod in pods:
        by_index.setdefault(_index(pod), []).append(pod)
    failed_ids = {id(p) for p in failed}
    out: list[dict[str, Any]] = []
    for group in by_index.values():
        group.sort(key=lambda p: (_created(p), _finished_at(p) if exit_code(p) is not None else "~"))
        out += [p for p in group[:-1] if id(p) in failed_ids]
    return sorted(out, key=_finished_at)


# --- the status -------------------------------------------------------------------------------


def _progress(
    prev: Progress | None, metrics: dict[str, float] | None, start: datetime | None, now: datetime
) -> Progress | None:
    if not metrics or TrainerMetric.STEP not in metrics:
        return prev
    step = int(metrics[TrainerMetric.STEP])
    total_raw = metrics.get(TrainerMetric.TOTAL_STEPS)
    total = int(total_raw) if total_raw and total_raw > 0 else None
    epoch = metrics.get(TrainerMetric.EPOCH)
    if prev is not None and prev.step == step and prev.total_steps == total and prev.epoch == epoch:
        return prev  # the ETA moves only with the step: no status write while nothing happens
    percent = min(100, max(0, math.floor(100 * step / total))) if total else 0
    eta = None
    if total and step > 0 and start is not None:
        elapsed = (now - start).total_seconds()
        if elapsed > 0:
            eta = max(0, round(elapsed / step * (total - step)))
    return Progress(step=step, total_steps=total, epoch=epoch, percent=percent, eta_seconds=eta)


def _metrics(prev: dict[str, float] | None, scraped: dict[str, float] | None) -> dict[str, float] | None:
    if not scraped:
        return prev
    out = dict(prev or {})
    for name, key in STATUS_METRICS.items():
        value = scraped.get(name)
        if value is not None and math.isfinite(value):
            out[key] = value
    return out or None


def invalid_spec_status(prev: FineTuneJobStatus | None, lines: list[str], generation: int | None) -> FineTuneJobStatus:
    """An invalid spec reached the operator (no CEL rules in the CRD): fail with the validation message."""
    now = now_utc()
    status = (prev or FineTuneJobStatus()).model_copy(deep=True)
    status.phase = Phase.FAILED  # type: ignore[assignment]
    status.observed_generation = generation
    status.completion_time = status.completion_time or now
    message = "; ".join(lines)
    set_condition(status.conditions, ConditionType.FAILED, True, Reason.INVALID_SPEC, message, now, generation)
    if get_condition(status, ConditionType.RUNNING) is not None:
        set_condition(status.conditions, ConditionType.RUNNING, False, Reason.INVALID_SPEC, message, now, generation)
    return status


def compute_status(
    name: str, spec: FineTuneJobSpec, prev: FineTuneJobStatus | None, seen: Observed
) -> FineTuneJobStatus:
    """The status that the observed Job, pods and metrics mean."""
    now = seen.now or now_utc()
    gen = seen.generation
    status = (prev or FineTuneJobStatus()).model_copy(deep=True)
    status.observed_generation = gen
    job = seen.job
    if job is None:
        status.phase = status.phase or Phase.PENDING  # type: ignore[assignment]
        set_condition(status.conditions, ConditionType.CREATED, False, Reason.PENDING, "creating the workload", now, gen)
        return status

    status.job_name = job_name(name)
    set_condition(
        status.conditions, ConditionType.CREATED, True, Reason.CREATED,
        f"created ConfigMap, Service and Job {job_name(name)}", now, gen,
    )
    jstatus = job.get("status") or {}
    status.start_time = status.start_time or parse_time(jstatus.get("startTime"))

    pods = sorted(seen.pods, key=_finished_at)
    # Disrupted pods (preempted, evicted) may be deleted soon after; count them while terminating too.
    disrupted = [p for p in pods if is_disrupted(p)]
    failed = [p for p in pods if _phase(p) == "Failed" or p in disrupted]
    restarted = replaced_failures(seen.pods, failed)

    # Progress and metrics: scraped while running; the termination message has the last word.
    status.progress = _progress(status.progress, seen.metrics, status.start_time, now)
    status.metrics = _metrics(status.metrics, seen.metrics)

    failed_cond = _job_condition(job, "Failed", "FailureTarget")
    done_cond = _job_condition(job, "Complete", "SuccessCriteriaMet")
    suspended = bool((job.get("spec") or {}).get("suspend"))
    running_pods = [p for p in pods if _phase(p) == "Running" and not (p["metadata"].get("deletionTimestamp"))]

    # A restart is a failed pod that the Job controller has replaced (a newer pod of its index).
    if len(restarted) > status.restarts:
        status.restarts = len(restarted)
        status.last_restart_reason = failure_reason(restarted[-1])

    if failed_cond is not None:
        reason = _JOB_FAILURE_REASONS.get(str(failed_cond.get("reason")), Reason.FAILED)
        message = str(failed_cond.get("message") or failed_cond.get("reason") or "the Job failed")
        permanent = [p for p in failed if exit_code(p) == ExitCode.PERMANENT]
        if reason == Reason.PERMANENT_ERROR and permanent:
            message = failure_reason(permanent[-1])
        elif failed and reason == Reason.BACKOFF_LIMIT_EXCEEDED:
            message = f"{message}; last failure: {failure_reason(failed[-1])}"
        final = termination_message(failed[-1]) if failed else None
        if final is not None:
            status.metrics = {**(status.metrics or {}), **final.metrics} or None
            status.last_checkpoint = final.last_checkpoint or status.last_checkpoint
        status.phase = Phase.FAILED  # type: ignore[assignment]
        status.completion_time = status.completion_time or parse_time(failed_cond.get("lastTransitionTime")) or now
        set_condition(status.conditions, ConditionType.FAILED, True, reason, message, now, gen)
        set_condition(status.conditions, ConditionType.RUNNING, False, reason, message, now, gen)
    elif done_cond is not None:
        status.phase = Phase.SUCCEEDED  # type: ignore[assignment]
        status.completion_time = (
            status.completion_time or parse_time(jstatus.get("completionTime"))
            or parse_time(done_cond.get("lastTransitionTime")) or now
        )
        succeeded = [p for p in pods if _phase(p) == "Succeeded"]
        rank0 = [p for p in succeeded if _index(p) == 0] or succeeded
        final = termination_message(rank0[-1]) if rank0 else None
        if final is not None:
            status.artifact = final.artifact or status.artifact
            status.last_checkpoint = final.last_checkpoint or status.last_checkpoint
            status.metrics = {**(status.metrics or {}), **final.metrics} or None
        progress = status.progress or Progress()
        total = progress.total_steps
        status.progress = Progress(
            step=total if total else progress.step, total_steps=total, epoch=progress.epoch, percent=100, eta_seconds=0
        )
        msg = f"training finished; artifact at {status.artifact.uri}" if status.artifact else "training finished"
        set_condition(status.conditions, ConditionType.SUCCEEDED, True, Reason.SUCCEEDED, msg, now, gen)
        set_condition(status.conditions, ConditionType.RUNNING, False, Reason.SUCCEEDED, msg, now, gen)
    elif suspended:
        queued = not spec.suspend and bool(spec.queue_name)
        if queued:
            status.phase = Phase.PENDING  # type: ignore[assignment]
            msg = f"waiting for Kueue to admit the Job in queue {spec.queue_name}"
            set_condition(status.conditions, ConditionType.RUNNING, False, Reason.QUEUED, msg, now, gen)
        else:
            status.phase = Phase.SUSPENDED  # type: ignore[assignment]
            msg = "spec.suspend is true: the Job's pods are stopped"
            set_condition(status.conditions, ConditionType.SUSPENDED, True, Reason.SUSPENDED, msg, now, gen)
            set_condition(status.conditions, ConditionType.RUNNING, False, Reason.SUSPENDED, msg, now, gen)
    else:
        if is_true(status, ConditionType.SUSPENDED):
            set_condition(status.conditions, ConditionType.SUSPENDED, False, Reason.RESUMED, "resumed", now, gen)
        # Every pod exited 0 but the Job controller has not marked the Job Complete yet (the two
        # arrive on separate watches): still Running, not back to Pending for a moment.
        finishing = (not running_pods and status.phase == Phase.RUNNING
                     and any(_phase(p) == "Succeeded" for p in pods))
        if finishing:
            pass
        elif running_pods:
            status.phase = Phase.RUNNING  # type: ignore[assignment]
            msg = f"{len(running_pods)}/{spec.resources.nodes} trainer pods running"
            set_condition(status.conditions, ConditionType.RUNNING, True, Reason.RUNNING, msg, now, gen)
        else:
            status.phase = Phase.PENDING  # type: ignore[assignment]
            msg = "waiting for trainer pods to start"
            set_condition(status.conditions, ConditionType.RUNNING, False, Reason.PENDING, msg, now, gen)

    if status.phase == Phase.RUNNING and seen.stalled is not None:
        set_condition(status.conditions, ConditionType.STALLED, True, Reason.STALLED, seen.stalled, now, gen)
    elif is_true(status, ConditionType.STALLED) and (status.phase != Phase.RUNNING or seen.stalled is None):
        if status.phase == Phase.RUNNING:
            reason, msg = Reason.RUNNING, "the step moves again"
        else:
            reason, msg = str(status.phase), f"no trainer pod is running (phase {status.phase})"
        set_condition(status.conditions, ConditionType.STALLED, False, reason, msg, now, gen)
    return status


# --- milestones -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Milestone:
    """A Kubernetes Event worth telling: `kubectl describe ftj` shows them in order."""

    type: str  # Normal or Warning
    reason: str
    message: str


def milestones(prev: FineTuneJobStatus | None, new: FineTuneJobStatus) -> list[Milestone]:
    out: list[Milestone] = []

    def became(type_: str, value: bool = True) -> Condition | None:
        before = get_condition(prev, type_)
        after = get_condition(new, type_)
        want = "True" if value else "False"
        if after is None or after.status != want:
            return None
        if before is not None and before.status == want:
            return None
        if not value and before is None:
            return None  # False from the start is not news
        return after

    if (cond := became(ConditionType.CREATED)) is not None:
        out.append(Milestone("Normal", Reason.CREATED, cond.message))
    if (cond := became(ConditionType.SUSPENDED)) is not None:
        out.append(Milestone("Normal", Reason.SUSPENDED, cond.message))
    if (cond := became(ConditionType.SUSPENDED, False)) is not None:
        out.append(Milestone("Normal", Reason.RESUMED, cond.message))
    if (cond := became(ConditionType.RUNNING)) is not None:
        out.append(Milestone("Normal", Reason.RUNNING, cond.message))
    if new.restarts > (prev.restarts if prev else 0):
        out.append(Milestone("Warning", Reason.RESTARTED, f"restart {new.restarts}: {new.last_restart_reason or ''}"))
    if (cond := became(ConditionType.STALLED)) is not None:
        out.append(Milestone("Warning", Reason.STALLED, cond.message))
    if (cond := became(ConditionType.SUCCEEDED)) is not None:
        out.append(Milestone("Normal", Reason.SUCCEEDED, cond.message))
    if (cond := became(ConditionType.FAILED)) is not None:
        out.append(Milestone("Warning", cond.reason, cond.message))
    return out


def changed(prev: FineTuneJobStatus | None, new: FineTuneJobStatus) -> bool:
    """Patch only when the status means something else than what is stored."""
    before = prev.wire() if prev is not None else {}
    return before != new.wire()
