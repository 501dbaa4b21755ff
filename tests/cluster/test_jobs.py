"""Plain batch/v1 Jobs on the fake GPU nodes, steered by the kwok test stages."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest
from harness.cluster import (
    GPU_TOLERATION,
    STAGE_HOLD,
    STAGE_KWOK_SKIP,
    TestCluster,
    gpu_job_manifest,
    stage_annotations,
    wait_until,
)

pytestmark = pytest.mark.cluster


def job_pods(cluster: TestCluster, namespace: str, job: str) -> list[dict[str, Any]]:
    return cluster.get_json("pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job}")["items"]


def wait_job(cluster: TestCluster, namespace: str, job: str, condition: str, timeout: int = 60) -> None:
    cluster.kubectl("wait", f"--for=condition={condition}", f"job/{job}", "-n", namespace,
                    f"--timeout={timeout}s", timeout=timeout + 10)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in obj["status"].get("conditions", []) if c["type"] == type_), None)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_gpu_job_is_scheduled_on_a_gpu_node_and_completes(cluster: TestCluster, namespace: str) -> None:
    cluster.apply(gpu_job_manifest("ok"), namespace=namespace)
    wait_job(cluster, namespace, "ok", "Complete")
    [pod] = job_pods(cluster, namespace, "ok")
    assert pod["spec"]["nodeName"] in cluster.gpu_node_names
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


def test_gpu_pod_without_toleration_stays_pending(cluster: TestCluster, namespace: str) -> None:
    job = gpu_job_manifest("untolerated")
    job["spec"]["template"]["spec"]["tolerations"] = []
    cluster.apply(job, namespace=namespace)

    def unschedulable() -> bool:
        pods = job_pods(cluster, namespace, "untolerated")
        cond = condition(pods[0], "PodScheduled") if pods else None
        return bool(cond and cond["status"] == "False" and cond["reason"] == "Unschedulable")

    wait_until(unschedulable, 30, "the scheduler to report the pod Unschedulable")
    [pod] = job_pods(cluster, namespace, "untolerated")
    assert "untolerated taint" in condition(pod, "PodScheduled")["message"]


def test_job_driven_to_fail_with_exit_code_3(cluster: TestCluster, namespace: str) -> None:
    job = gpu_job_manifest("fails", annotations=stage_annotations(exit_code=3, delay="2s"),
                           backoff_limit=4)
    # The Job controller reads the exit code kwok wrote: FailJob on 3, not 4 retries.
    job["spec"]["podFailurePolicy"] = {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3]}},
    ]}
    cluster.apply(job, namespace=namespace)
    wait_job(cluster, namespace, "fails", "Failed")
    failed = condition(cluster.get_json("job", "fails", "-n", namespace), "Failed")
    assert failed and failed["reason"] == "PodFailurePolicy"
    [pod] = job_pods(cluster, namespace, "fails")
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    # test.finetune.dev/delay: the pod ran for about 2 s before failing.
    assert (ts(terminated["finishedAt"]) - ts(pod["status"]["startTime"])).total_seconds() >= 1


@pytest.mark.parametrize("reason", ["EvictionByEvictionAPI", "PreemptionByScheduler"])
def test_job_pod_driven_to_be_disrupted(cluster: TestCluster, namespace: str, reason: str) -> None:
    cluster.apply(gpu_job_manifest("disrupted", annotations=stage_annotations(disruption=reason)),
                  namespace=namespace)
    wait_job(cluster, namespace, "disrupted", "Failed")
    [pod] = job_pods(cluster, namespace, "disrupted")
    assert pod["status"]["phase"] == "Failed"
    target = condition(pod, "DisruptionTarget")
    assert target and target["status"] == "True" and target["reason"] == reason
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137


def test_held_pod_runs_until_released(cluster: TestCluster, namespace: str) -> None:
    cluster.apply(gpu_job_manifest("held", annotations=stage_annotations(exit_code=0, hold=True)),
                  namespace=namespace)

    def running() -> str | None:
        pods = job_pods(cluster, namespace, "held")
        return pods[0]["metadata"]["name"] if pods and pods[0]["status"].get("phase") == "Running" else None

    pod_name = wait_until(running, 30, "the held pod to run")
    time.sleep(1.5)
    assert job_pods(cluster, namespace, "held")[0]["status"]["phase"] == "Running"
    cluster.kubectl("annotate", "pod", pod_name, "-n", namespace, f"{STAGE_HOLD}=false", "--overwrite")
    wait_job(cluster, namespace, "held", "Complete")


def test_kwok_skip_pod_is_left_to_the_test(cluster: TestCluster, namespace: str) -> None:
    def pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"tolerations": [dict(GPU_TOLERATION)], "containers": [{
                "name": "c", "image": "registry.invalid/x:1",
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
        }

    cluster.apply({"apiVersion": "v1", "kind": "List", "items": [
        pod("driven", {}), pod("skipped", {STAGE_KWOK_SKIP: "true"})]}, namespace=namespace)
    cluster.kubectl("wait", "--for=condition=Ready", "pod/driven", "-n", namespace, "--timeout=30s")
    cluster.kubectl("wait", "--for=condition=PodScheduled", "pod/skipped", "-n", namespace, "--timeout=30s")
    time.sleep(1)
    skipped = cluster.get_json("pod", "skipped", "-n", namespace)
    assert skipped["spec"]["nodeName"] in cluster.gpu_node_names
    assert skipped["status"]["phase"] == "Pending"
    assert "containerStatuses" not in skipped["status"]
    # A test playing the kubelet writes the status itself.
    cluster.kubectl("patch", "pod", "skipped", "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", '{"status": {"phase": "Running"}}')
    time.sleep(0.5)
    assert cluster.get_json("pod", "skipped", "-n", namespace)["status"]["phase"] == "Running"
    cluster.kubectl("delete", "pod", "skipped", "driven", "-n", namespace, "--grace-period=0", "--force")
