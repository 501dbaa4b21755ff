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
from finetune_api.status import Condition, FineTuneJobStatus, Progress, StatusMetric, TerminationMessage
from pydantic import ValidationError

from . import kueue
from .builders import COMPLETION_INDEX_ANNOTATION, DISRUPTION_TARGET, TRAINER_CONTAINER, job_name

# Annotation the operator puts on a pod before it restarts it, so the restart is reported right.
RESTART_REASON_ANNOTATION = "finetune.dev/restart-reason"

# Workload restarts the stall watchdog makes per job; a job that stalls again is only reported.
MAX_STALL_RESTARTS = 1

# Scraped trainer metric -> key in status.metrics.
STATUS_METRICS = {
    TrainerMetric.LOSS: StatusMetric.LOSS,
    TrainerMetric.EVAL_LOSS: StatusMetric.EVAL_LOSS,
    TrainerMetric.LEARNING_RATE: StatusMetric.LEARNING_RATE,
    TrainerMetric.TOKENS_PER_SECOND: StatusMetric.TOKENS_PER_SECOND,
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
    # Restarts the watchdog has made already (they are limited to MAX_STALL_RESTARTS).
    stall_restarts: int = 0
    now: datetime | None = None
    # Kueue's Workload for the Job (spec.queueName), as kueue.trim keeps it.
    workload: dict[str, Any] | None = None


# --- conditions -------------------------------------------------------------------------------


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> None:
    """Insert or update a condition (status None: Unknown); lastTransitionTime moves only when the
    status flips."""
    value = "Unknown" if status is None else "True" if status else "False"
    for i, cond in enumerate(conditions):
        if cond.type == type_:
            changed = cond.status != value
            conditions[i] = Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now if changed or cond.last_transition_time is None else cond.last_transition_time,
                observed_generation=generation,
            )
            return
    conditions.append(
        Condition(
            type=type_,
            status=value,
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


def pods_of(job: dict[str, Any] | None, pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods this Job owns (its uid in their ownerReferences): a pod that only carries the
    trainer's labels is not a trainer, is not counted and is never evicted."""
    if job is None:
        return []
    uid = job["metadata"].get("uid")
    return [p for p in pods if any(ref.get("uid") == uid and ref.get("controller")
                                   for ref in p["metadata"].get("ownerReferences") or [])]


def running(pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods whose trainer runs (not already on their way out)."""
    return [p for p in pods if _phase(p) == "Running" and not p["metadata"].get("deletionTimestamp")]


def _finished_at(pod: dict[str, Any]) -> str:
    terminated = trainer_state(pod).get("terminated") or {}
    return str(terminated.get("finishedAt") or pod["metadata"].get("creationTimestamp") or "")


def _index(pod: dict[str, Any]) -> int:
    return int((pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "0") or 0)


def failure_reason(pod: dict[str, Any]) -> str:
    """Why one pod failed, in one line (for status.lastRestartReason and events)."""
    annotations = pod["metadata"].get("annotations") or {}
    if RESTART_REASON_ANNOTATION in annotations:
        return str(annotations[RESTART_REASON_ANNOTATION])
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


def _merge_metrics(held: dict[str, float] | None, update: dict[str, float]) -> dict[str, float] | None:
    """status.metrics with newer values on top: scraped while running, the termination message last."""
    return {**(held or {}), **update} or None


def scraped_status_metrics(scraped: dict[str, float]) -> dict[str, float]:
    """The scraped trainer metrics that status.metrics shows, under their status keys."""
    out: dict[str, float] = {}
    for name, key in STATUS_METRICS.items():
        value = scraped.get(name)
        if value is not None and math.isfinite(value):
            out[key] = value
    return out


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


def invalid_spec_status(prev: FineTuneJobStatus | None, lines: list[str], generation: int | None) -> FineTuneJobStatus:
    """An invalid spec reached the operator (no CEL rules in the CRD): fail with the validation message."""
    now = now_utc()
    status = (prev or FineTuneJobStatus()).model_copy(deep=True)
    status.phase = Phase.FAILED
    status.observed_generation = generation
    status.completion_time = status.completion_time or now
    message = "; ".join(lines)
    set_condition(status.conditions, ConditionType.FAILED, True, Reason.INVALID_SPEC, message, now, generation)
    if get_condition(status, ConditionType.RUNNING) is not None:
        set_condition(status.conditions, ConditionType.RUNNING, False, Reason.INVALID_SPEC, message, now, generation)
    return status


@dataclass
class _Update:
    """The status being computed, and the time and generation every condition it sets carries."""

    status: FineTuneJobStatus
    now: datetime
    generation: int | None

    def condition(self, type_: str, value: bool, reason: str, message: str) -> None:
        set_condition(self.status.conditions, type_, value, reason, message, self.now, self.generation)

    def phase(self, phase: str) -> None:
        self.status.phase = phase  # type: ignore[assignment]

    def final(self, message: TerminationMessage | None, artifact: bool = False) -> None:
        """What the trainer's termination message has the last word on."""
        if message is None:
            return
        if artifact:
            self.status.artifact = message.artifact or self.status.artifact
        self.status.last_checkpoint = message.last_checkpoint or self.status.last_checkpoint
        self.status.metrics = _merge_metrics(self.status.metrics, message.metrics)
        # Whether the base model came from the shared cache (hit, miss, refetched).
        self.status.model_cache = message.model_cache or self.status.model_cache


@dataclass(frozen=True)
class _Pods:
    """The Job's pods, sorted by when they finished, and what the phase rules ask of them."""

    all: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    running: list[dict[str, Any]]
    restarted: list[dict[str, Any]]

    @classmethod
    def of(cls, pods: tuple[dict[str, Any], ...]) -> _Pods:
        ordered = sorted(pods, key=_finished_at)
        # Disrupted pods (preempted, evicted) may be deleted soon after; count them while terminating too.
        failed = [p for p in ordered if _phase(p) == "Failed" or is_disrupted(p)]
        return cls(ordered, failed, running(ordered), replaced_failures(pods, failed))

    def succeeded(self) -> list[dict[str, Any]]:
        return [p for p in self.all if _phase(p) == "Succeeded"]


def _not_created(u: _Update) -> None:
    u.phase(u.status.phase or Phase.PENDING)
    u.condition(ConditionType.CREATED, False, Reason.PENDING, "creating the workload")


def _job_created(u: _Update, name: str, job: dict[str, Any]) -> None:
    u.status.job_name = job_name(name)
    u.condition(ConditionType.CREATED, True, Reason.CREATED, f"created ConfigMap, Service and Job {job_name(name)}")
    u.status.start_time = u.status.start_time or parse_time((job.get("status") or {}).get("startTime"))


def _count_restarts(u: _Update, pods: _Pods) -> None:
    # A restart is a failed pod that the Job controller has replaced (a newer pod of its index).
    if len(pods.restarted) > u.status.restarts:
        u.status.restarts = len(pods.restarted)
        u.status.last_restart_reason = failure_reason(pods.restarted[-1])


def _failed(u: _Update, cond: dict[str, Any], pods: _Pods) -> None:
    """The Job failed: say why in the words of the pod that decided it."""
    reason = _JOB_FAILURE_REASONS.get(str(cond.get("reason")), Reason.FAILED)
    message = str(cond.get("message") or cond.get("reason") or "the Job failed")
    permanent = [p for p in pods.failed if exit_code(p) == ExitCode.PERMANENT]
    if reason == Reason.PERMANENT_ERROR and permanent:
        message = failure_reason(permanent[-1])
    elif pods.failed and reason == Reason.BACKOFF_LIMIT_EXCEEDED:
        message = f"{message}; last failure: {failure_reason(pods.failed[-1])}"
    u.final(termination_message(pods.failed[-1]) if pods.failed else None)
    u.phase(Phase.FAILED)
    u.status.completion_time = u.status.completion_time or parse_time(cond.get("lastTransitionTime")) or u.now
    u.condition(ConditionType.FAILED, True, reason, message)
    u.condition(ConditionType.RUNNING, False, reason, message)


def _succeeded(u: _Update, job: dict[str, Any], cond: dict[str, Any], pods: _Pods) -> None:
    """The Job completed: rank 0's termination message names the artifact; progress is full."""
    u.phase(Phase.SUCCEEDED)
    u.status.completion_time = (
        u.status.completion_time or parse_time((job.get("status") or {}).get("completionTime"))
        or parse_time(cond.get("lastTransitionTime")) or u.now
    )
    succeeded = pods.succeeded()
    rank0 = [p for p in succeeded if _index(p) == 0] or succeeded
    u.final(termination_message(rank0[-1]) if rank0 else None, artifact=True)
    progress = u.status.progress or Progress()
    total = progress.total_steps
    u.status.progress = Progress(
        step=total if total else progress.step, total_steps=total, epoch=progress.epoch, percent=100, eta_seconds=0
    )
    artifact = u.status.artifact
    msg = f"training finished; artifact at {artifact.uri}" if artifact else "training finished"
    u.condition(ConditionType.SUCCEEDED, True, Reason.SUCCEEDED, msg)
    u.condition(ConditionType.RUNNING, False, Reason.SUCCEEDED, msg)


def _suspended(u: _Update, spec: FineTuneJobSpec, said: kueue.Verdict | None) -> None:
    """A suspended Job: the user's spec.suspend, or Kueue holding it in its queue (not admitted
    yet, or evicted, e.g. preempted: then it waits again); Kueue's reason and message say why."""
    if not spec.suspend and spec.queue_name:
        u.phase(Phase.PENDING)
        msg = f"waiting for Kueue to admit the Job in queue {spec.queue_name}"
        if said is not None and not said.admitted:
            msg = f"{msg}: {said.message}"
            u.condition(ConditionType.ADMITTED, False, said.reason, said.message)
        elif is_true(u.status, ConditionType.ADMITTED):
            u.condition(ConditionType.ADMITTED, False, Reason.QUEUED, "evicted by Kueue: back in the queue")
        u.condition(ConditionType.RUNNING, False, Reason.QUEUED, msg)
        return
    u.phase(Phase.SUSPENDED)
    msg = "spec.suspend is true: the Job's pods are stopped"
    u.condition(ConditionType.SUSPENDED, True, Reason.SUSPENDED, msg)
    u.condition(ConditionType.RUNNING, False, Reason.SUSPENDED, msg)


def _active(u: _Update, spec: FineTuneJobSpec, pods: _Pods, said: kueue.Verdict | None) -> None:
    """A Job that is neither finished nor suspended: Running once a trainer pod runs, else Pending."""
    if is_true(u.status, ConditionType.SUSPENDED):
        u.condition(ConditionType.SUSPENDED, False, Reason.RESUMED, "resumed")
    if spec.queue_name and not spec.suspend:
        # Only Kueue unsuspends a queued Job: it was admitted.
        u.condition(ConditionType.ADMITTED, True, Reason.ADMITTED,
                    said.message if said is not None and said.admitted else "admitted by Kueue")
    if pods.running:
        u.phase(Phase.RUNNING)
        msg = f"{len(pods.running)}/{spec.resources.nodes} trainer pods running"
        u.condition(ConditionType.RUNNING, True, Reason.RUNNING, msg)
    elif u.status.phase == Phase.RUNNING and pods.succeeded():
        # Every pod exited 0 but the Job controller has not marked the Job Complete yet (the two
        # arrive on separate watches): still Running, not back to Pending for a moment.
        pass
    else:
        u.phase(Phase.PENDING)
        u.condition(ConditionType.RUNNING, False, Reason.PENDING, "waiting for trainer pods to start")


def _stalled(u: _Update, stalled: str | None) -> None:
    """The watchdog's verdict, shown only while Running; cleared when the step moves or the job stops."""
    running = u.status.phase == Phase.RUNNING
    if running and stalled is not None:
        u.condition(ConditionType.STALLED, True, Reason.STALLED, stalled)
    elif is_true(u.status, ConditionType.STALLED):
        if running:
            u.condition(ConditionType.STALLED, False, Reason.RUNNING, "the step moves again")
        else:
            phase = str(u.status.phase)
            u.condition(ConditionType.STALLED, False, phase, f"no trainer pod is running (phase {phase})")


def compute_status(
    name: str, spec: FineTuneJobSpec, prev: FineTuneJobStatus | None, seen: Observed
) -> FineTuneJobStatus:
    """The status that the observed Job, pods and metrics mean."""
    u = _Update((prev or FineTuneJobStatus()).model_copy(deep=True), seen.now or now_utc(), seen.generation)
    u.status.observed_generation = seen.generation
    job = seen.job
    if job is None:
        _not_created(u)
        return u.status
    _job_created(u, name, job)
    pods = _Pods.of(seen.pods)
    # Progress and metrics: scraped while running; the termination message has the last word.
    u.status.progress = _progress(u.status.progress, seen.metrics, u.status.start_time, u.now)
    if seen.metrics:
        u.status.metrics = _merge_metrics(u.status.metrics, scraped_status_metrics(seen.metrics))
    _count_restarts(u, pods)
    if (failed := _job_condition(job, "Failed", "FailureTarget")) is not None:
        _failed(u, failed, pods)
    elif (done := _job_condition(job, "Complete", "SuccessCriteriaMet")) is not None:
        _succeeded(u, job, done, pods)
    else:
        said = kueue.verdict(seen.workload, job["metadata"].get("uid")) if spec.queue_name else None
        if (job.get("spec") or {}).get("suspend"):
            _suspended(u, spec, said)
        else:
            _active(u, spec, pods, said)
    _stalled(u, seen.stalled)
    return u.status


# --- the stall watchdog -------------------------------------------------------------------------


@dataclass(frozen=True)
class StallClock:
    """The step the watchdog last saw move, and when (time.monotonic())."""

    step: int
    since: float


def stall_clock(clock: StallClock | None, metrics: dict[str, float] | None, running: bool,
                now: float) -> StallClock | None:
    """The clock after one reading: restarted when the step moves, dropped when no pod runs."""
    if not running:
        return None
    if not metrics or TrainerMetric.STEP not in metrics:
        return clock  # no reading is no evidence either way; the clock starts at the first reading
    step = int(metrics[TrainerMetric.STEP])
    return clock if clock is not None and clock.step == step else StallClock(step, now)


def stall_message(clock: StallClock | None, now: float, limit: float) -> str | None:
    """A message when the step has not moved for `limit` seconds, else None."""
    if clock is None:
        return None
    idle = now - clock.since
    if idle < limit:
        return None
    return f"step {clock.step} has not moved for {int(idle)}s (limit {int(limit)}s)"


@dataclass(frozen=True)
class Decision:
    """The new status and, when the watchdog restarts the workload, why (the pods get evicted)."""

    status: FineTuneJobStatus
    restart: str | None = None


def decide(name: str, spec: FineTuneJobSpec, prev: FineTuneJobStatus | None, seen: Observed) -> Decision:
    """The status, and whether to restart a stalled workload: a running job whose step is stuck,
    at most MAX_STALL_RESTARTS times (a second stall is only reported: restarting again would
    likely loop)."""
    new = compute_status(name, spec, prev, seen)
    if seen.stalled is None or new.phase != Phase.RUNNING or seen.stall_restarts >= MAX_STALL_RESTARTS:
        return Decision(new)
    reason = f"{Reason.STALLED}: {seen.stalled}"
    # Evicted pods may vanish before they are seen failed: the restart is counted here.
    new.restarts += 1
    new.last_restart_reason = reason
    return Decision(new, reason)


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

    # The preflight: started (DataChecked appears Unknown), passed; its failure is the Failed milestone.
    checked_before, checked = get_condition(prev, ConditionType.DATA_CHECKED), get_condition(new, ConditionType.DATA_CHECKED)
    if checked is not None and checked.status == "Unknown" and checked_before is None:
        out.append(Milestone("Normal", Reason.CHECKING_DATA, checked.message))
    if (cond := became(ConditionType.DATA_CHECKED)) is not None:
        out.append(Milestone("Normal", Reason.DATA_VALID, cond.message))
    if (cond := became(ConditionType.CREATED)) is not None:
        out.append(Milestone("Normal", Reason.CREATED, cond.message))
    if (cond := became(ConditionType.SUSPENDED)) is not None:
        out.append(Milestone("Normal", Reason.SUSPENDED, cond.message))
    if (cond := became(ConditionType.SUSPENDED, False)) is not None:
        out.append(Milestone("Normal", Reason.RESUMED, cond.message))
    # Kueue's verdict (queued jobs): waiting (from the start, or again after an eviction), admitted.
    admitted_before, admitted = get_condition(prev, ConditionType.ADMITTED), get_condition(new, ConditionType.ADMITTED)
    if admitted is not None and (admitted_before is None or admitted_before.status != admitted.status):
        if admitted.status == "True":
            out.append(Milestone("Normal", Reason.ADMITTED, admitted.message))
        else:
            kind = "Warning" if admitted_before is not None else "Normal"  # True -> False: evicted
            out.append(Milestone(kind, Reason.QUEUED, f"{admitted.reason}: {admitted.message}"))
    if (cond := became(ConditionType.RUNNING)) is not None:
        out.append(Milestone("Normal", Reason.RUNNING, cond.message))
    if new.restarts > (prev.restarts if prev else 0):
        out.append(Milestone("Warning", Reason.RESTARTED, f"restart {new.restarts}: {new.last_restart_reason or ''}"))
    if (cond := became(ConditionType.STALLED)) is not None:
        out.append(Milestone("Warning", Reason.STALLED, cond.message))
    if new.model_cache == "refetched" and (prev is None or prev.model_cache != "refetched"):
        out.append(Milestone("Warning", Reason.MODEL_CACHE_REFETCHED,
                             "the shared model cache held a damaged copy of the base model: discarded and downloaded again"))
    if (cond := became(ConditionType.SUCCEEDED)) is not None:
        out.append(Milestone("Normal", Reason.SUCCEEDED, cond.message))
    if (cond := became(ConditionType.FAILED)) is not None:
        out.append(Milestone("Warning", cond.reason, cond.message))
    return out


def changed(prev: FineTuneJobStatus | None, new: FineTuneJobStatus) -> bool:
    """Patch only when the status means something else than what is stored."""
    before = prev.wire() if prev is not None else {}
    return before != new.wire()
