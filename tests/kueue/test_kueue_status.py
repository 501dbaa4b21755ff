"""What a queued FineTuneJob shows from Kueue's Workload, computed without a cluster; and what the
Job carries for Kueue. (The same against the real Kueue: test_kueue_admission.py.)"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from finetune_api import constants as c
from finetune_api import parse_spec
from finetune_operator import kueue
from finetune_operator.builders import BuildOptions, Owner, build_job
from finetune_operator.status_rules import Observed, compute_status, get_condition, milestones

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
SHORT = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in "
         "flavor h200, 4 more needed")


def manifest(**spec: Any) -> dict[str, Any]:
    return {
        "model": {"uri": "s3://models/tiny-llama"},
        "dataset": {"train": "s3://data/train.jsonl", "format": "prompt_completion"},
        "method": {"type": "lora"},
        "resources": {"gpusPerNode": 4},
        "output": {"uri": "s3://out/run-1"},
        "queueName": "gpu-queue",
        **spec,
    }


SPEC = parse_spec(manifest())


def job(suspend: bool, uid: str = "job-uid") -> dict[str, Any]:
    return {"metadata": {"name": "tune", "uid": uid}, "spec": {"suspend": suspend}, "status": {}}


def workload(*conditions: tuple[str, str, str, str], job_uid: str = "job-uid") -> dict[str, Any]:
    body = {
        "metadata": {"name": "job-tune-1a2b3", "namespace": "ns", "uid": "wl-uid", "resourceVersion": "7",
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "tune", "uid": job_uid}]},
        "spec": {"podSets": [{"name": "main", "count": 1}]},
        "status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions],
                   "admission": {"clusterQueue": "gpus"}},
    }
    return kueue.trim(body)


def test_waiting_job_shows_kueues_reason_and_message() -> None:
    wl = workload(("QuotaReserved", "False", "Pending", SHORT))
    assert kueue.owner_key(wl) == "ns/tune"
    st = compute_status("tune", SPEC, None, Observed(1, job(suspend=True), workload=wl, now=T0))
    assert st.phase == c.Phase.PENDING
    admitted = get_condition(st, c.ConditionType.ADMITTED)
    assert admitted is not None and (admitted.status, admitted.reason, admitted.message) == ("False", "Pending", SHORT)
    running = get_condition(st, c.ConditionType.RUNNING)
    assert running is not None and running.reason == c.Reason.QUEUED
    assert running.message == f"waiting for Kueue to admit the Job in queue gpu-queue: {SHORT}"
    events = milestones(None, st)
    assert [(m.type, m.reason) for m in events if m.reason == c.Reason.QUEUED] == [("Normal", c.Reason.QUEUED)]
    assert SHORT in next(m.message for m in events if m.reason == c.Reason.QUEUED)


def test_admitted_then_preempted_then_waiting_again() -> None:
    waiting = compute_status("tune", SPEC, None, Observed(1, job(suspend=True), now=T0))
    assert get_condition(waiting, c.ConditionType.ADMITTED) is None  # Kueue has not looked yet
    wl = workload(("QuotaReserved", "True", "QuotaReserved", "reserved"), ("Admitted", "True", "Admitted", "ok"))
    running = compute_status("tune", SPEC, waiting, Observed(1, job(suspend=False), workload=wl, now=T0))
    admitted = get_condition(running, c.ConditionType.ADMITTED)
    assert admitted is not None and (admitted.status, admitted.reason) == ("True", c.Reason.ADMITTED)
    assert "gpus" in admitted.message
    assert c.Reason.ADMITTED in [m.reason for m in milestones(waiting, running)]

    evicted = workload(("Evicted", "True", "Preempted", "Preempted to accommodate a workload"),
                       ("QuotaReserved", "False", "Pending", "Preempted to accommodate a workload"))
    again = compute_status("tune", SPEC, running, Observed(1, job(suspend=True), workload=evicted, now=T0))
    assert again.phase == c.Phase.PENDING
    admitted = get_condition(again, c.ConditionType.ADMITTED)
    assert admitted is not None and admitted.status == "False" and "Preempted" in admitted.message
    (event,) = [m for m in milestones(running, again) if m.reason == c.Reason.QUEUED]
    assert event.type == "Warning" and "Preempted" in event.message


def test_workload_of_an_earlier_job_of_the_same_name_is_ignored() -> None:
    stale = workload(("QuotaReserved", "False", "Pending", SHORT), job_uid="old-job")
    st = compute_status("tune", SPEC, None, Observed(1, job(suspend=True), workload=stale, now=T0))
    assert get_condition(st, c.ConditionType.ADMITTED) is None


def test_job_carries_queue_and_priority_class_for_kueue() -> None:
    owner = Owner(name="tune", namespace="ns", uid="u", labels={c.KUEUE_PRIORITY_CLASS_LABEL: "high"})
    spec = parse_spec(manifest(resources={"nodes": 2, "gpusPerNode": 4}))
    built = build_job(owner, spec, BuildOptions(trainer_image="img"))
    labels = built["metadata"]["labels"]
    assert (labels[c.KUEUE_QUEUE_LABEL], labels[c.KUEUE_PRIORITY_CLASS_LABEL]) == ("gpu-queue", "high")
    # Kueue's pod set count is the Job's parallelism: one pod per node, admitted together.
    assert (built["spec"]["parallelism"], built["spec"]["completions"], built["spec"]["suspend"]) == (2, 2, True)
    # Without a queue the priority label means nothing to anyone: not copied.
    unqueued = {k: v for k, v in manifest().items() if k != "queueName"}
    plain = build_job(owner, parse_spec(unqueued), BuildOptions(trainer_image="img"))
    assert c.KUEUE_PRIORITY_CLASS_LABEL not in plain["metadata"]["labels"]
