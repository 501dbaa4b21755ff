"""Pure: the preflight Job and its pod -> the preflight's outcome -> the status it means.

The preflight (spec.preflight, builders.build_preflight_job) runs `finetune preflight` in a
CPU-only pod before the GPU Job exists. Its verdict is the pod's: exit 0 passed, exit 42 failed
(the data is wrong, or the plan does not fit), the termination message saying why and carrying
the summary (finetune_api.status.DataCheck). A pod that fails otherwise (crash, OOM-kill) is
retried by its Job; a Job that fails for good (retries spent, deadline) is PreflightFailed.
No I/O here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from finetune_api.constants import ConditionType, ExitCode, Phase, Reason
from finetune_api.status import DataCheck, FineTuneJobStatus, TerminationMessage
from pydantic import ValidationError

from .builders import PREFLIGHT_CONTAINER, preflight_job_name
from .status_rules import get_condition, is_true, pods_of, set_condition

#: Failure reasons a preflight may report for the job (the rest is InvalidData).
_FAILURE_REASONS = (Reason.INVALID_DATA, Reason.WILL_NOT_FIT, Reason.STORAGE_ERROR, Reason.INVALID_SPEC)


@dataclass(frozen=True)
class Outcome:
    """Where the preflight is: running (or not started), passed, or failed with a reason."""

    state: Literal["running", "passed", "failed"]
    reason: str
    message: str
    data_check: DataCheck | None = None


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == PREFLIGHT_CONTAINER:
            return dict((cs.get("state") or {}).get("terminated") or {}) or None
    return None


def _message(terminated: dict[str, Any]) -> TerminationMessage | None:
    try:
        return TerminationMessage.model_validate(json.loads(terminated.get("message") or ""))
    except (ValueError, ValidationError):
        return None


def _job_condition(job: dict[str, Any], *types: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "True":
            return dict(cond)
    return None


def _one_line(text: str, limit: int = 1000) -> str:
    """A log tail (FallbackToLogsOnError) as one line for a condition message."""
    line = " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= limit else "..." + line[-limit:]


def outcome(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> Outcome:
    """The preflight's verdict from its Job and the pods (only those the Job owns count)."""
    if job is None:
        return Outcome("running", Reason.CHECKING_DATA, "creating the preflight Job")
    name = job["metadata"]["name"]
    mine = sorted(pods_of(job, pods), key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))
    for pod in mine:
        terminated = _terminated(pod)
        if terminated is None:
            continue
        code = int(terminated.get("exitCode", -1))
        msg = _message(terminated)
        if code == ExitCode.SUCCESS:
            text = msg.message if msg is not None and msg.message else f"preflight {name} passed"
            return Outcome("passed", Reason.DATA_VALID, text, msg.data_check if msg is not None else None)
        if code == ExitCode.PERMANENT:
            reason = msg.reason if msg is not None and msg.reason in _FAILURE_REASONS else Reason.INVALID_DATA
            text = (msg.message if msg is not None and msg.message
                    else _one_line(str(terminated.get("message") or "")) or f"preflight {name} exited with code 42")
            return Outcome("failed", reason, text, msg.data_check if msg is not None else None)
    if _job_condition(job, "Complete", "SuccessCriteriaMet") is not None:
        # Its pod is gone (or not seen yet): the Job controller's word that the pod exited 0.
        return Outcome("passed", Reason.DATA_VALID, f"preflight {name} passed")
    failed = _job_condition(job, "Failed", "FailureTarget")
    if failed is not None:
        detail = str(failed.get("message") or failed.get("reason") or "the Job failed")
        last = next((t for t in (_terminated(p) for p in reversed(mine)) if t is not None), None)
        if last is not None:
            tail = _one_line(str(last.get("message") or ""))
            detail += f"; last pod: exit code {last.get('exitCode')}" + (f": {tail}" if tail else "")
        return Outcome("failed", Reason.PREFLIGHT_FAILED,
                       f"the preflight Job {name} failed ({detail}); no data verdict: fix the cause, or set "
                       "spec.preflight.enabled false to skip the check")
    running = any((p.get("status") or {}).get("phase") == "Running" for p in mine)
    doing = f"the preflight pod of Job {name} checks" if running else f"waiting for the preflight pod of Job {name} to check"
    return Outcome("running", Reason.CHECKING_DATA,
                   f"{doing} the data and the memory plan; the GPU Job is created when it passes")


def needed(enabled: bool, prev: FineTuneJobStatus | None, has_gpu_job: bool) -> bool:
    """Whether the preflight still stands before the GPU Job: on, not passed yet, and the job has
    no GPU Job (one made before, or before the operator ran preflights, is not checked again)."""
    if not enabled or has_gpu_job:
        return False
    if prev is not None and prev.job_name is not None:
        return False
    return not is_true(prev, ConditionType.DATA_CHECKED)


def apply(prev: FineTuneJobStatus | None, out: Outcome, owner_name: str, now: datetime,
          generation: int | None) -> FineTuneJobStatus:
    """The status with the preflight's outcome: Pending while it runs, DataChecked True with the
    summary once it passed (the GPU Job comes next), Failed with its reason when it failed."""
    status = (prev or FineTuneJobStatus()).model_copy(deep=True)
    status.observed_generation = generation
    if out.data_check is not None:
        status.data_check = out.data_check

    def cond(type_: str, value: bool | None, reason: str, message: str) -> None:
        set_condition(status.conditions, type_, value, reason, message, now, generation)

    if out.state == "passed":
        cond(ConditionType.DATA_CHECKED, True, Reason.DATA_VALID, out.message)
        return status
    if out.state == "running":
        status.phase = Phase.PENDING
        cond(ConditionType.DATA_CHECKED, None, Reason.CHECKING_DATA, out.message)
        cond(ConditionType.CREATED, False, Reason.CHECKING_DATA,
             f"the GPU Job is created once the preflight ({preflight_job_name(owner_name)}) passes")
        return status
    status.phase = Phase.FAILED
    status.completion_time = status.completion_time or now
    cond(ConditionType.DATA_CHECKED, False, out.reason, out.message)
    cond(ConditionType.FAILED, True, out.reason, out.message)
    cond(ConditionType.CREATED, False, out.reason, "no GPU Job was created: the preflight failed")
    if get_condition(status, ConditionType.RUNNING) is not None:
        cond(ConditionType.RUNNING, False, out.reason, out.message)
    return status
