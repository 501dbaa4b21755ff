"""The platform's policy on the test cluster: a FineTuneJob asking for an image, a toleration, a
node selector or a PriorityClass that the operator's policy does not allow is refused with an
InvalidSpec condition and event, and nothing is created for it; an allowed one gets its Job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_api import constants as c
from harness.cluster import TestCluster
from operator_harness import OperatorProcess, children, condition, events, wait_phase, wait_status
from operator_specs import job_manifest

pytestmark = pytest.mark.cluster

#: name -> (spec overrides, what the refusal says: the field first)
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "any-image": ({"image": "docker.io/library/python:3.12"},
                  "spec.image: 'docker.io/library/python:3.12' is not allowed by the operator's policy"),
    "every-taint": ({"resources": {"tolerations": [{"operator": "Exists"}]}},
                    "spec.resources.tolerations[0]: a toleration without a key tolerates every taint"),
    "control-plane": ({"resources": {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}},
                      "spec.resources.nodeSelector['node-role.kubernetes.io/control-plane']: trainer pods never "
                      "run on control-plane nodes"),
    "system-priority": ({"resources": {"priorityClassName": "system-node-critical"}},
                        "spec.resources.priorityClassName: 'system-node-critical' is reserved for system components"),
    "unlisted-priority": ({"resources": {"priorityClassName": "training-low"}},
                          "spec.resources.priorityClassName: 'training-low' is not allowed by the operator's policy "
                          "(allowed: training-high)"),
}


@pytest.fixture
def policy_operator(cluster: TestCluster, namespace: str, tmp_path: Path) -> Any:
    op = OperatorProcess(cluster, namespace, tmp_path, "--allowed-images", "registry.example/team/",
                         "--allowed-priority-classes", "training-high", tag="policy")
    op.start()
    yield op
    op.stop()


def test_jobs_the_policy_does_not_allow_are_refused_before_anything_is_created(
    cluster: TestCluster, namespace: str, policy_operator: OperatorProcess
) -> None:
    for name, (overrides, _) in REFUSED.items():
        cluster.apply(job_manifest(name, namespace, **overrides))
    # Allowed: an image under a listed prefix, the GPU taint, a GPU-model node label, a listed class.
    allowed = job_manifest("allowed", namespace, image="registry.example/team/trainer:2", resources={
        "tolerations": [{"key": c.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}, "priorityClassName": "training-high"})
    cluster.apply(allowed)

    for name, (_, says) in REFUSED.items():
        st = wait_phase(cluster, namespace, name, c.Phase.FAILED, op=policy_operator)
        failed = condition(st, c.ConditionType.FAILED)
        assert failed is not None and failed["reason"] == c.Reason.INVALID_SPEC, st
        assert failed["message"].startswith(says), failed["message"]
        refusals = [e for e in events(cluster, namespace, name) if e["reason"] == c.Reason.INVALID_SPEC]
        assert refusals and refusals[0]["message"].startswith(says) and refusals[0]["type"] == "Warning", refusals
        for kind in ("jobs", "configmaps", "services", "pods"):
            assert not children(cluster, namespace, name, kind), f"{name}: a {kind} was created"

    st = wait_status(cluster, namespace, "allowed", lambda s: s.get("jobName"), "the allowed job's Job",
                     op=policy_operator)
    assert st.get("phase") != c.Phase.FAILED
    (job,) = children(cluster, namespace, "allowed", "jobs")
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/team/trainer:2"
    assert pod["priorityClassName"] == "training-high"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


def test_trainer_network_policy_admits_only_the_jobs_own_pods(
    cluster: TestCluster, namespace: str, tmp_path: Path
) -> None:
    from finetune_operator.builders import JOB_CONTROLLER_UID_LABEL

    op = OperatorProcess(cluster, namespace, tmp_path, "--trainer-network-policy", tag="netpol").start()
    try:
        cluster.apply(job_manifest("ranks", namespace, resources={"nodes": 2, "gpusPerNode": 1}))
        wait_status(cluster, namespace, "ranks", lambda s: s.get("jobName"), "the Job", op=op)
        (job,) = children(cluster, namespace, "ranks", "jobs")
        (np,) = children(cluster, namespace, "ranks", "networkpolicies")
        assert np["metadata"]["ownerReferences"][0]["kind"] == c.KIND  # garbage-collected with the job
        selector = np["spec"]["podSelector"]["matchLabels"]
        assert selector[JOB_CONTROLLER_UID_LABEL] == job["metadata"]["uid"]
        assert np["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
        # The API server put the same uid label on the Job's pods: the policy selects exactly them.
        assert selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    finally:
        op.stop()
