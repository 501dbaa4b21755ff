"""Status from what the cluster shows, computed without a cluster."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_api import constants as c
from finetune_api import parse_spec
from finetune_api.status import FineTuneJobStatus
from finetune_operator.status_rules import (
    Observed,
    StallClock,
    compute_status,
    decide,
    get_condition,
    invalid_spec_status,
    milestones,
    pods_of,
    stall_clock,
    stall_message,
)
from finetune_operator.status_rules import changed as status_changed
from operator_specs import job_manifest

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
SPEC = parse_spec(job_manifest("tune")["spec"])


def job(*conditions: tuple[str, str], suspend: bool = False, failed: int = 0, active: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": "tune"},
        "spec": {"suspend": suspend},
        "status": {
            "startTime": "2030-01-01T12:00:00Z",
            "active": active,
            "failed": failed,
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": f"{t} {r}",
                 "lastTransitionTime": "2030-01-01T12:10:00Z"}
                for t, r in conditions
            ],
        },
    }


def pod(name: str, phase: str, code: int | None = None, message: dict[str, Any] | None = None,
        disruption: str | None = None, finished: str = "2030-01-01T12:05:00Z") -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}}
    if code is not None:
        state = {"terminated": {"exitCode": code, "finishedAt": finished,
                                **({"message": json.dumps(message)} if message else {})}}
    conditions = []
    if disruption:
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": disruption, "message": "evicting"})
    return {
        "metadata": {"name": name, "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                     "creationTimestamp": "2030-01-01T12:00:00Z"},
        "status": {"phase": phase, "conditions": conditions,
                   "containerStatuses": [{"name": "trainer", "state": state}]},
    }


def metrics(step: int, total: int = 20, loss: float = 1.5) -> dict[str, float]:
    return {c.TrainerMetric.STEP: step, c.TrainerMetric.TOTAL_STEPS: total, c.TrainerMetric.LOSS: loss,
            c.TrainerMetric.TOKENS_PER_SECOND: 1000.0, c.TrainerMetric.EPOCH: 0.5}


def test_no_job_yet_is_pending_and_not_created() -> None:
    st = compute_status("tune", SPEC, None, Observed(generation=1, now=T0))
    assert st.phase == c.Phase.PENDING
    cond = get_condition(st, c.ConditionType.CREATED)
    assert cond is not None and cond.status == "False"


def test_running_pod_with_metrics_gives_progress_eta_and_loss() -> None:
    now = T0 + timedelta(seconds=100)
    st = compute_status("tune", SPEC, None, Observed(1, job(), (pod("p0", "Running"),), metrics(5), now=now))
    assert st.phase == c.Phase.RUNNING
    assert st.progress is not None
    assert (st.progress.step, st.progress.total_steps, st.progress.percent) == (5, 20, 25)
    assert st.progress.eta_seconds == 300  # 100 s for 5 steps, 15 to go
    assert st.metrics == {"loss": 1.5, "tokensPerSecond": 1000.0}
    assert st.observed_generation == 1 and st.job_name == "tune"


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    first = compute_status("tune", SPEC, None, Observed(1, job(), (pod("p0", "Running"),), metrics(5), now=T0))
    later = T0 + timedelta(minutes=5)
    second = compute_status("tune", SPEC, first, Observed(1, job(), (pod("p0", "Running"),), metrics(5), now=later))
    running = get_condition(second, c.ConditionType.RUNNING)
    assert running is not None and running.last_transition_time == T0
    assert not status_changed(first, second)  # same step five minutes later: nothing to write
    done = compute_status("tune", SPEC, second, Observed(1, job(("Complete", "CompletionsReached")),
                                                       (pod("p0", "Succeeded", 0),), None, now=later))
    running = get_condition(done, c.ConditionType.RUNNING)
    assert running is not None and running.status == "False" and running.last_transition_time == later


def test_success_copies_the_artifact_from_the_termination_message() -> None:
    msg = {"outcome": "succeeded", "artifact": {"uri": "s3://out/run-1", "sha256": "ab" * 32, "sizeBytes": 1234},
           "metrics": {"evalLoss": 0.9}}
    st = compute_status("tune", SPEC, None, Observed(
        1, job(("Complete", "CompletionsReached"), active=0), (pod("p0", "Succeeded", 0, msg),), None, now=T0))
    assert st.phase == c.Phase.SUCCEEDED
    assert st.artifact is not None and st.artifact.uri == "s3://out/run-1" and st.artifact.size_bytes == 1234
    assert st.progress is not None and st.progress.percent == 100
    assert st.metrics == {"evalLoss": 0.9}
    assert st.completion_time is not None


def test_pods_done_before_the_job_is_complete_stays_running() -> None:
    """The pod's Succeeded and the Job's Complete come on two watches: no Running -> Pending flap."""
    running = compute_status("tune", SPEC, None, Observed(1, job(), (pod("p0", "Running"),), metrics(5), now=T0))
    done_pod = pod("p0", "Succeeded", code=0)
    between = compute_status("tune", SPEC, running, Observed(1, job(), (done_pod,), None, now=T0))
    assert between.phase == c.Phase.RUNNING and not status_changed(running, between)
    assert milestones(running, between) == []
    complete = compute_status("tune", SPEC, between, Observed(1, job(("Complete", "")), (done_pod,), None, now=T0))
    assert complete.phase == c.Phase.SUCCEEDED


def test_permanent_error_fails_with_the_trainers_reason_and_no_restart() -> None:
    msg = {"outcome": "failed", "reason": "InvalidData", "message": "row 3: missing column prompt"}
    st = compute_status("tune", SPEC, None, Observed(
        1, job(("Failed", "PodFailurePolicy"), failed=1, active=0), (pod("p0", "Failed", 42, msg),), None, now=T0))
    assert st.phase == c.Phase.FAILED
    cond = get_condition(st, c.ConditionType.FAILED)
    assert cond is not None and cond.reason == c.Reason.PERMANENT_ERROR
    assert "exit code 42" in cond.message and "row 3: missing column prompt" in cond.message
    assert st.restarts == 0


def test_backoff_limit_counts_restarts_and_names_the_reason() -> None:
    pods = tuple(pod(f"p{i}", "Failed", 1, finished=f"2030-01-01T12:0{i}:00Z") for i in range(3))
    st = compute_status("tune", SPEC, None, Observed(
        1, job(("Failed", "BackoffLimitExceeded"), failed=3, active=0), pods, None, now=T0))
    assert st.phase == c.Phase.FAILED
    cond = get_condition(st, c.ConditionType.FAILED)
    assert cond is not None and cond.reason == c.Reason.BACKOFF_LIMIT_EXCEEDED
    assert "exit code 1" in cond.message
    assert st.restarts == 2
    assert st.last_restart_reason is not None and "exit code 1" in st.last_restart_reason


def test_disruption_is_a_restart_reported_as_preempted_and_the_job_goes_on() -> None:
    pods = (pod("p0", "Failed", 137, disruption="PreemptionByScheduler"), pod("p1", "Running"))
    st = compute_status("tune", SPEC, None, Observed(1, job(failed=0), pods, None, now=T0))
    assert st.phase == c.Phase.RUNNING
    assert st.restarts == 1
    assert st.last_restart_reason is not None and st.last_restart_reason.startswith(c.Reason.PREEMPTED)
    assert [m.reason for m in milestones(None, st)] == [c.Reason.CREATED, c.Reason.RUNNING, c.Reason.RESTARTED]


def test_suspend_then_resume() -> None:
    spec = parse_spec(job_manifest("tune", suspend=True)["spec"])
    st = compute_status("tune", spec, None, Observed(2, job(suspend=True, active=0), (), None, now=T0))
    assert st.phase == c.Phase.SUSPENDED
    assert c.Reason.SUSPENDED in [m.reason for m in milestones(None, st)]
    resumed = compute_status("tune", SPEC, st, Observed(3, job(), (pod("p0", "Running"),), None, now=T0))
    assert resumed.phase == c.Phase.RUNNING
    cond = get_condition(resumed, c.ConditionType.SUSPENDED)
    assert cond is not None and cond.status == "False" and cond.reason == c.Reason.RESUMED
    assert [m.reason for m in milestones(st, resumed)] == [c.Reason.RESUMED, c.Reason.RUNNING]


def test_queued_job_waits_for_kueue_as_pending() -> None:
    spec = parse_spec(job_manifest("tune", queueName="team-q")["spec"])
    st = compute_status("tune", spec, None, Observed(1, job(suspend=True, active=0), (), None, now=T0))
    assert st.phase == c.Phase.PENDING
    cond = get_condition(st, c.ConditionType.RUNNING)
    assert cond is not None and cond.reason == c.Reason.QUEUED


def test_stalled_then_moving_again() -> None:
    seen = Observed(1, job(), (pod("p0", "Running"),), metrics(5), stalled="step 5 has not moved for 120s", now=T0)
    st = compute_status("tune", SPEC, None, seen)
    assert get_condition(st, c.ConditionType.STALLED).status == "True"  # type: ignore[union-attr]
    assert c.Reason.STALLED in [m.reason for m in milestones(None, st)]
    again = compute_status("tune", SPEC, st, Observed(1, job(), (pod("p0", "Running"),), metrics(6), now=T0))
    assert get_condition(again, c.ConditionType.STALLED).status == "False"  # type: ignore[union-attr]


def test_invalid_spec_fails_with_the_validation_message() -> None:
    st = invalid_spec_status(FineTuneJobStatus(), ["spec.method.type: Unsupported value: \"lorax\""], 4)
    assert st.phase == c.Phase.FAILED
    cond = get_condition(st, c.ConditionType.FAILED)
    assert cond is not None and cond.reason == c.Reason.INVALID_SPEC and "lorax" in cond.message
    assert not status_changed(st, invalid_spec_status(st, ["spec.method.type: Unsupported value: \"lorax\""], 4))


def test_status_read_back_from_the_api_server_compares_equal() -> None:
    st = compute_status("tune", SPEC, None, Observed(1, job(), (pod("p0", "Running"),), metrics(5), now=T0))
    stored = FineTuneJobStatus.model_validate(json.loads(json.dumps(st.wire())))
    again = compute_status("tune", SPEC, stored, Observed(1, job(), (pod("p0", "Running"),), metrics(5), now=T0))
    assert not status_changed(stored, again)


def test_the_stall_clock_restarts_when_the_step_moves_and_stops_with_the_pods() -> None:
    clock = stall_clock(None, metrics(5), running=True, now=100.0)
    assert clock == StallClock(step=5, since=100.0)
    assert stall_clock(clock, metrics(5), True, 150.0) is clock
    assert stall_clock(clock, None, True, 150.0) is clock  # no reading is no evidence
    assert stall_clock(clock, metrics(6), True, 150.0) == StallClock(step=6, since=150.0)
    assert stall_clock(clock, metrics(5), False, 150.0) is None
    assert stall_clock(None, None, True, 150.0) is None  # the clock starts at the first reading
    assert stall_message(clock, 159.0, limit=60) is None
    assert stall_message(clock, 161.0, limit=60) == "step 5 has not moved for 61s (limit 60s)"
    assert stall_message(None, 1e9, limit=60) is None


def test_the_watchdog_restarts_a_stalled_running_job_once_then_only_reports_it() -> None:
    stuck = "step 5 has not moved for 61s (limit 60s)"
    seen = Observed(1, job(), (pod("p0", "Running"),), metrics(5), stalled=stuck, now=T0)
    first = decide("tune", SPEC, None, seen)
    assert first.restart == f"{c.Reason.STALLED}: {stuck}"
    # Counted at once: the evicted pods may vanish before they are seen failed.
    assert first.status.restarts == 1 and first.status.last_restart_reason == first.restart
    assert get_condition(first.status, c.ConditionType.STALLED).status == "True"  # type: ignore[union-attr]
    again = decide("tune", SPEC, None, replace(seen, stall_restarts=1))
    assert again.restart is None and again.status.restarts == 0
    assert get_condition(again.status, c.ConditionType.STALLED).status == "True"  # type: ignore[union-attr]
    finished = replace(seen, job=job(("Complete", "CompletionsReached")), pods=(pod("p0", "Succeeded", 0),))
    assert decide("tune", SPEC, None, finished).restart is None  # only a running job is restarted
    assert decide("tune", SPEC, None, replace(seen, stalled=None)).restart is None


def test_only_pods_the_job_owns_are_its_pods() -> None:
    the_job = {**job(), "metadata": {"name": "tune", "uid": "job-1"}}
    mine = pod("tune-0-a", "Running")
    mine["metadata"]["ownerReferences"] = [{"kind": "Job", "name": "tune", "uid": "job-1", "controller": True}]
    older = pod("tune-0-b", "Running")  # of a Job of the same name that was deleted
    older["metadata"]["ownerReferences"] = [{"kind": "Job", "name": "tune", "uid": "job-0", "controller": True}]
    foreign = pod("lookalike", "Running")  # the trainer's labels, no owner
    assert pods_of(the_job, [mine, older, foreign]) == [mine]
    assert pods_of(None, [mine]) == []
