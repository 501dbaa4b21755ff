"""The preflight of a queued FineTuneJob under Kueue's real controller: it runs before the job
queues for GPUs (its CPU Job has no queue label, so Kueue leaves it alone), the GPU Job is created
suspended with its queue label only after it passed, and a failed preflight never queues.

kwok plays the preflight pod here (exit 0, or the exit code the test annotates): what is tested
is the order against Kueue; the real check in a pod is tests/operator/test_operator_preflight_cluster.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from finetune_api import constants as c
from harness.cluster import STAGE_EXIT_CODE, wait_until
from harness.kueue import KueueCluster, Queues
from operator_harness import OperatorProcess, children, condition, events, wait_phase

pytestmark = pytest.mark.cluster


def checked_job(name: str, q: Queues, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION, "kind": c.KIND,
        "metadata": {"name": name, "namespace": q.namespace, "annotations": dict(annotations or {})},
        "spec": {
            "model": {"uri": "s3://models/tiny-llama"},
            "dataset": {"train": "s3://data/train.jsonl", "format": "prompt_completion"},
            "method": {"type": "lora"},
            "resources": {"gpusPerNode": 4},
            "output": {"uri": f"s3://out/{name}"},
            "queueName": q.local_queue,
        },
    }


def owned_by_job(kc: KueueCluster, namespace: str, job: str) -> list[dict[str, Any]]:
    return [wl for wl in kc.kueue.workloads(namespace)
            if any(o["kind"] == "Job" and o["name"] == job for o in wl["metadata"].get("ownerReferences") or [])]


def test_a_queued_job_is_checked_before_it_queues_and_its_gpu_job_is_created_suspended_after(
    kueue_cluster: KueueCluster, queues: Queues, kueue_operator: OperatorProcess
) -> None:
    cluster, ns = kueue_cluster.cluster, queues.namespace
    cluster.apply(checked_job("checked", queues))
    status = wait_phase(cluster, ns, "checked", c.Phase.SUCCEEDED, timeout=120, op=kueue_operator)
    checked = condition(status, c.ConditionType.DATA_CHECKED)
    assert checked is not None and checked["status"] == "True", status
    jobs = {j["metadata"]["name"]: j for j in children(cluster, ns, "checked", "jobs")}
    assert set(jobs) == {"checked-preflight", "checked"}
    # The preflight's Job is not Kueue's; the GPU Job is, and it was made after the preflight ended.
    assert c.KUEUE_QUEUE_LABEL not in jobs["checked-preflight"]["metadata"]["labels"]
    assert not owned_by_job(kueue_cluster, ns, "checked-preflight")
    assert jobs["checked"]["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == queues.local_queue
    assert owned_by_job(kueue_cluster, ns, "checked")
    # (after its pod ended; the Job controller may mark the preflight Job complete a moment later)
    (pod,) = [p for p in children(cluster, ns, "checked", "pods")
              if p["metadata"]["labels"][c.LABEL_COMPONENT] == "preflight"]
    done = pod["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
    assert jobs["checked"]["metadata"]["creationTimestamp"] >= done
    told = [e["reason"] for e in events(cluster, ns, "checked")]
    assert told.index(c.Reason.DATA_VALID) < told.index(c.Reason.CREATED) < told.index(c.Reason.ADMITTED), told


def test_a_failed_preflight_never_queues(
    kueue_cluster: KueueCluster, queues: Queues, kueue_operator: OperatorProcess
) -> None:
    cluster, ns = kueue_cluster.cluster, queues.namespace
    # kwok ends the preflight pod with exit code 42, as `finetune preflight` does on bad data.
    cluster.apply(checked_job("rejected", queues, {STAGE_EXIT_CODE: str(c.ExitCode.PERMANENT)}))
    status = wait_phase(cluster, ns, "rejected", c.Phase.FAILED, timeout=120, op=kueue_operator)
    failed = condition(status, c.ConditionType.FAILED)
    assert failed is not None and failed["reason"] == c.Reason.INVALID_DATA, status
    assert "rejected-preflight exited with code 42" in failed["message"]
    assert [j["metadata"]["name"] for j in children(cluster, ns, "rejected", "jobs")] == ["rejected-preflight"]
    wait_until(lambda: not owned_by_job(kueue_cluster, ns, "rejected"), 5, "no Workload for a GPU Job")
    assert condition(status, c.ConditionType.ADMITTED) is None
