"""FineTuneJobs with spec.queueName under Kueue's real controller: admission by GPU quota, what a
waiting job shows, and all-or-nothing admission of a multi-node job.

Pods here are kwok's: they run (and hold, `test.finetune.dev/hold`) without a trainer.
"""

from __future__ import annotations

from typing import Any

import pytest
from finetune_api import constants as c
from harness.cluster import STAGE_HOLD, TestCluster, wait_until
from harness.kueue import KueueCluster, Queues
from operator_harness import OperatorProcess, children, condition, events, wait_phase, wait_status

pytestmark = pytest.mark.cluster
FTJ = f"{c.PLURAL}.{c.GROUP}"


def queued_job(name: str, q: Queues, gpus: int, nodes: int = 1, labels: dict[str, str] | None = None,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": name, "namespace": q.namespace, "labels": dict(labels or {}),
                     "annotations": {STAGE_HOLD: "true", **(annotations or {})}},
        "spec": {
            "model": {"uri": "s3://models/tiny-llama"},
            "dataset": {"train": "s3://data/train.jsonl", "format": "prompt_completion"},
            "method": {"type": "lora"},
            "hyperparameters": {"maxSteps": 20},
            "resources": {"nodes": nodes, "gpusPerNode": gpus},
            "output": {"uri": f"s3://out/{name}"},
            "queueName": q.local_queue,
            # No data here: the preflight (before the Job queues) has its own tests (tests/operator).
            "preflight": {"enabled": False},
        },
    }


def pods(cluster: TestCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return [p for p in children(cluster, namespace, name, "pods") if not p["metadata"].get("deletionTimestamp")]


def running_pods(cluster: TestCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return [p for p in pods(cluster, namespace, name) if p["status"].get("phase") == "Running"]


def release(cluster: TestCluster, namespace: str, name: str) -> None:
    """Let the held pods of `name` finish (kwok then completes them with exit code 0)."""
    for p in pods(cluster, namespace, name):
        cluster.kubectl("annotate", "pod", p["metadata"]["name"], "-n", namespace, "--overwrite",
                        f"{STAGE_HOLD}=false")


def workload_of(kc: KueueCluster, namespace: str, name: str) -> dict[str, Any]:
    """Kueue's Workload for the Job `name` (owned by it)."""
    for wl in kc.kueue.workloads(namespace):
        if any(o["kind"] == "Job" and o["name"] == name for o in wl["metadata"].get("ownerReferences") or []):
            return wl
    raise AssertionError(f"no Workload owned by Job {name} in {namespace}")


def is_waiting(status: dict[str, Any]) -> bool:
    admitted = condition(status, c.ConditionType.ADMITTED)
    return (status.get("phase") == c.Phase.PENDING and admitted is not None and admitted["status"] == "False"
            and "nvidia.com/gpu" in admitted["message"])


def test_quota_of_8_gpus_runs_two_jobs_of_4_and_the_third_waits_for_one_to_finish(
    kueue_cluster: KueueCluster, queues: Queues, kueue_operator: OperatorProcess
) -> None:
    cluster, ns = kueue_cluster.cluster, queues.namespace
    names = ["tune-a", "tune-b", "tune-c"]
    for name in names:
        cluster.apply(queued_job(name, queues, gpus=4))

    def split() -> tuple[list[str], list[str]] | None:
        statuses = {n: (cluster.get_json(FTJ, n, "-n", ns).get("status") or {}) for n in names}
        run = [n for n, s in statuses.items() if s.get("phase") == c.Phase.RUNNING]
        wait = [n for n, s in statuses.items() if is_waiting(s)]
        return (run, wait) if len(run) == 2 and len(wait) == 1 else None

    running, (waiting,) = wait_until(split, 120, "two jobs Running and one waiting for quota", interval=0.5)
    # The waiting job: its Job stays suspended, no pod; the FineTuneJob says why, in Kueue's words.
    assert not pods(cluster, ns, waiting)
    assert cluster.get_json("job", waiting, "-n", ns)["spec"]["suspend"] is True
    st = cluster.get_json(FTJ, waiting, "-n", ns)["status"]
    admitted = condition(st, c.ConditionType.ADMITTED)
    assert admitted is not None
    wl = workload_of(kueue_cluster, ns, waiting)
    kueue_says = next(x for x in wl["status"]["conditions"] if x["type"] == "QuotaReserved")
    assert kueue_says["status"] == "False"
    assert (admitted["reason"], admitted["message"]) == (kueue_says["reason"], kueue_says["message"])
    assert "insufficient unused quota for nvidia.com/gpu" in admitted["message"], admitted
    run_cond = condition(st, c.ConditionType.RUNNING)
    assert run_cond is not None and run_cond["reason"] == c.Reason.QUEUED
    assert queues.local_queue in run_cond["message"] and "nvidia.com/gpu" in run_cond["message"]
    # `kubectl get ftj` and `kubectl describe ftj` show it too.
    table = cluster.kubectl("get", "ftj", "-n", ns).stdout
    assert any(line.split()[:2] == [waiting, c.Phase.PENDING] for line in table.splitlines()), table
    wait_until(lambda: any(e["reason"] == c.Reason.QUEUED and "nvidia.com/gpu" in e["message"]
                           for e in events(cluster, ns, waiting)), 30, f"a {c.Reason.QUEUED} event on {waiting}")
    described = cluster.kubectl("describe", "ftj", waiting, "-n", ns).stdout
    assert c.Reason.QUEUED in described and "insufficient unused quota for nvidia.com/gpu" in described, described
    # The two running ones hold the 8 GPUs, 4 each.
    for name in running:
        assert len(running_pods(cluster, ns, name)) == 1
        wl = workload_of(kueue_cluster, ns, name)
        usage = wl["status"]["admission"]["podSetAssignments"][0]["resourceUsage"]
        assert usage[c.GPU_RESOURCE] == "4"
        admitted_run = condition(cluster.get_json(FTJ, name, "-n", ns)["status"], c.ConditionType.ADMITTED)
        assert admitted_run is not None and admitted_run["status"] == "True"

    # One finishes: its quota goes back and the waiting job starts.
    release(cluster, ns, running[0])
    wait_phase(cluster, ns, running[0], c.Phase.SUCCEEDED, timeout=60, op=kueue_operator)
    st = wait_phase(cluster, ns, waiting, c.Phase.RUNNING, timeout=60, op=kueue_operator)
    admitted = condition(st, c.ConditionType.ADMITTED)
    assert admitted is not None and admitted["status"] == "True" and admitted["reason"] == c.Reason.ADMITTED
    assert len(running_pods(cluster, ns, waiting)) == 1
    assert cluster.get_json(FTJ, running[1], "-n", ns)["status"]["phase"] == c.Phase.RUNNING
    assert c.Reason.ADMITTED in {e["reason"] for e in events(cluster, ns, waiting)}


def test_two_node_job_is_admitted_whole_or_not_at_all(
    kueue_cluster: KueueCluster, queues: Queues, kueue_operator: OperatorProcess
) -> None:
    """resources.nodes=2 -> an Indexed Job with parallelism 2 -> one Workload pod set of count 2:
    Kueue admits both pods' GPUs together (8 of 8 here) or none, never one pod of two."""
    cluster, ns = kueue_cluster.cluster, queues.namespace
    cluster.apply(queued_job("small", queues, gpus=4))
    wait_phase(cluster, ns, "small", c.Phase.RUNNING, timeout=90, op=kueue_operator)
    cluster.apply(queued_job("pair", queues, gpus=4, nodes=2))
    st = wait_status(cluster, ns, "pair", is_waiting, "the 2-node job to wait for quota", timeout=90,
                     op=kueue_operator)
    wl = workload_of(kueue_cluster, ns, "pair")
    (pod_set,) = wl["spec"]["podSets"]
    assert pod_set["count"] == 2
    assert pod_set["template"]["spec"]["containers"][0]["resources"]["requests"][c.GPU_RESOURCE] == "4"
    admitted = condition(st, c.ConditionType.ADMITTED)
    assert admitted is not None and "insufficient unused quota for nvidia.com/gpu" in admitted["message"]
    # 4 GPUs are free, enough for one of its pods: still none may start.
    assert not pods(cluster, ns, "pair")
    job = cluster.get_json("job", "pair", "-n", ns)
    assert (job["spec"]["suspend"], job["spec"]["parallelism"], job["spec"]["completions"]) == (True, 2, 2)

    release(cluster, ns, "small")
    wait_phase(cluster, ns, "pair", c.Phase.RUNNING, timeout=90, op=kueue_operator)
    wait_until(lambda: len(running_pods(cluster, ns, "pair")) == 2, 60, "both pods of the 2-node job to run")
    wl = workload_of(kueue_cluster, ns, "pair")
    (assignment,) = wl["status"]["admission"]["podSetAssignments"]
    assert assignment["count"] == 2
    assert assignment["resourceUsage"][c.GPU_RESOURCE] == "8"
