"""The platform's policy on what a FineTuneJob may put into its pods (policy.py), without a cluster."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_api import constants as c
from finetune_api import parse_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_operator.policy import Policy, image_allowed, violations
from finetune_operator.settings import parse_settings
from operator_specs import job_manifest

TRAINER = "registry.example/ml/trainer:1.0"
DEFAULT = Policy(trainer_image=TRAINER)


def spec(**overrides: Any) -> FineTuneJobSpec:
    return parse_spec(job_manifest("tune", **overrides)["spec"])


def resources(**fields: Any) -> FineTuneJobSpec:
    return spec(resources={"gpusPerNode": 1, **fields})


def test_a_job_that_asks_for_nothing_special_is_allowed() -> None:
    assert violations(spec(), DEFAULT) == []
    assert violations(spec(image=TRAINER), DEFAULT) == []


@pytest.mark.parametrize(("image", "allowed"), [
    (TRAINER, True),                                              # the operator's own default
    ("registry.example/ml/trainer:1.1", False),                   # another tag of it: not listed
    ("docker.io/library/python:3.12", False),
    ("registry.example/ml/trainer:1.0@sha256:" + "0" * 64, False),
])
def test_by_default_only_the_trainer_image_is_allowed(image: str, allowed: bool) -> None:
    assert image_allowed(image, DEFAULT) is allowed
    lines = violations(spec(image=image), DEFAULT)
    assert (lines == []) is allowed
    if not allowed:
        assert lines == [f"spec.image: {image!r} is not allowed by the operator's policy (allowed: {TRAINER})"]


@pytest.mark.parametrize(("entry", "image", "allowed"), [
    ("registry.example/team/", "registry.example/team/trainer:2", True),          # prefix
    ("registry.example/team/", "registry.example/team/sub/trainer@sha256:" + "a" * 64, True),
    ("registry.example/team/", "registry.example/teamevil/trainer:2", False),      # not a path prefix
    ("registry.example/team/", "evil.example/registry.example/team/x:1", False),
    ("registry.example:5000/ml/custom", "registry.example:5000/ml/custom:7", True),  # repository: any tag
    ("registry.example:5000/ml/custom", "registry.example:5000/ml/custom@sha256:" + "b" * 64, True),
    ("registry.example:5000/ml/custom", "registry.example:5000/ml/custom-evil:7", False),
    ("registry.example:5000/ml/custom", "registry.example:5000/ml/custom/x:7", False),
    ("registry.example/ml/exact:3", "registry.example/ml/exact:3", True),          # exact reference
    ("registry.example/ml/exact:3", "registry.example/ml/exact:4", False),
])
def test_allowed_images_are_exact_repositories_or_prefixes(entry: str, image: str, allowed: bool) -> None:
    assert image_allowed(image, Policy(trainer_image=TRAINER, allowed_images=(entry,))) is allowed


def test_priority_classes_only_from_the_list_and_never_system_ones() -> None:
    assert violations(resources(priorityClassName="training-high"), DEFAULT) == [
        "spec.resources.priorityClassName: 'training-high' is not allowed by the operator's policy (allowed: none)"
    ]
    listed = Policy(trainer_image=TRAINER, allowed_priority_classes=("training-high", "system-node-critical"))
    assert violations(resources(priorityClassName="training-high"), listed) == []
    # Reserved for system components even when a platform lists it by mistake.
    assert violations(resources(priorityClassName="system-node-critical"), listed) == [
        "spec.resources.priorityClassName: 'system-node-critical' is reserved for system components"
    ]


def test_tolerations_only_for_listed_taints() -> None:
    gpu = {"key": c.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    assert violations(resources(tolerations=[gpu]), DEFAULT) == []
    everything = {"operator": "Exists"}  # no key: tolerates every taint on every node
    dedicated = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    lines = violations(resources(tolerations=[everything, dedicated]), DEFAULT)
    assert lines == [
        "spec.resources.tolerations[0]: a toleration without a key tolerates every taint; name the taint's key",
        "spec.resources.tolerations[1]: taint key 'dedicated' is not allowed by the operator's policy "
        f"(allowed: {c.GPU_RESOURCE})",
    ]
    assert violations(resources(tolerations=[dedicated]),
                      Policy(trainer_image=TRAINER, allowed_toleration_keys=("dedicated",))) == []


@pytest.mark.parametrize("key", ["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"])
def test_never_control_plane_even_when_listed(key: str) -> None:
    lax = Policy(trainer_image=TRAINER, allowed_toleration_keys=(key,), allowed_node_selector_keys=(key,))
    lines = violations(resources(tolerations=[{"key": key, "operator": "Exists", "effect": "NoSchedule"}],
                                 nodeSelector={key: ""}), lax)
    assert lines == [
        f"spec.resources.tolerations[0]: {key!r}: trainer pods never run on control-plane nodes",
        f"spec.resources.nodeSelector[{key!r}]: trainer pods never run on control-plane nodes",
    ]


def test_node_selector_only_on_listed_labels() -> None:
    assert violations(resources(nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H200"}), DEFAULT) == []
    lines = violations(resources(nodeSelector={"kubernetes.io/hostname": "node-7"}), DEFAULT)
    assert len(lines) == 1
    assert lines[0].startswith("spec.resources.nodeSelector['kubernetes.io/hostname']: node label "
                               "'kubernetes.io/hostname' is not allowed by the operator's policy (allowed: ")


def test_every_violation_is_reported_at_once() -> None:
    bad = spec(image="evil.example/miner:1", resources={
        "gpusPerNode": 1, "priorityClassName": "system-cluster-critical",
        "tolerations": [{"operator": "Exists"}], "nodeSelector": {"node-role.kubernetes.io/control-plane": ""}})
    fields = [line.split(":", 1)[0] for line in violations(bad, DEFAULT)]
    assert fields == ["spec.image", "spec.resources.priorityClassName", "spec.resources.tolerations[0]",
                      "spec.resources.nodeSelector['node-role.kubernetes.io/control-plane']"]


def test_policy_comes_from_flags_and_environment() -> None:
    s = parse_settings(["--trainer-image", TRAINER, "--allowed-images", "registry.example/team/,x/y",
                        "--allowed-priority-classes", "training-high", "--allowed-toleration-keys=",
                        "--allowed-node-selector-keys", "pool"], env={})
    assert s.policy() == Policy(trainer_image=TRAINER, allowed_images=("registry.example/team/", "x/y"),
                                allowed_priority_classes=("training-high",), allowed_toleration_keys=(),
                                allowed_node_selector_keys=("pool",))
    env = {"FINETUNE_OPERATOR_ALLOWED_PRIORITY_CLASSES": "a,b", "FINETUNE_OPERATOR_ALLOWED_TOLERATION_KEYS": ""}
    from_env = parse_settings([], env=env).policy()
    assert from_env.allowed_priority_classes == ("a", "b") and from_env.allowed_toleration_keys == ()
    # Unset: only the operator's trainer image, no PriorityClass, the GPU taint.
    default = parse_settings([], env={}).policy()
    assert default.allowed_images == () and default.allowed_priority_classes == ()
    assert default.allowed_toleration_keys == (c.GPU_RESOURCE,)


def test_the_controller_refuses_before_creating_anything() -> None:
    from finetune_operator.controller import Controller
    from finetune_operator.metrics import OperatorMetrics
    from test_operator_controller import MemoryKube, body

    kube = MemoryKube(body(image="evil.example/miner:1"))
    ctl = Controller(kube, parse_settings(["--trainer-image", TRAINER], env={}), OperatorMetrics())  # type: ignore[arg-type]
    ctl.reconcile("ns", "tune", full=True)
    status = kube.ftjs[("ns", "tune")]["status"]
    assert status["phase"] == c.Phase.FAILED
    [failed] = [x for x in status["conditions"] if x["type"] == c.ConditionType.FAILED]
    assert failed["reason"] == c.Reason.INVALID_SPEC
    assert failed["message"].startswith("spec.image: 'evil.example/miner:1' is not allowed")
    assert kube.creates == [] and kube.events == [c.Reason.INVALID_SPEC]
    # The same image under a policy that lists it: the children are created.
    allowed = MemoryKube(body(image="evil.example/miner:1"))
    settings = parse_settings(["--trainer-image", TRAINER, "--allowed-images", "evil.example/miner"], env={})
    Controller(allowed, settings, OperatorMetrics()).reconcile("ns", "tune", full=True)  # type: ignore[arg-type]
    assert sorted(allowed.creates) == ["ConfigMap", "Job", "Service"]


def test_a_job_admitted_under_an_older_policy_runs_on() -> None:
    """The policy admits jobs: an operator restarted with a narrower one does not fail a job that
    already has its Job (it would say Failed while the pods run on)."""
    from finetune_operator.controller import Controller
    from finetune_operator.metrics import OperatorMetrics
    from test_operator_controller import MemoryKube, body

    running = body(image="registry.example/old/trainer:1")
    running["status"] = {"phase": c.Phase.RUNNING, "jobName": "tune"}
    kube = MemoryKube(running)
    ctl = Controller(kube, parse_settings(["--trainer-image", TRAINER], env={}), OperatorMetrics())  # type: ignore[arg-type]
    ctl.reconcile("ns", "tune", full=True)
    assert kube.ftjs[("ns", "tune")]["status"]["phase"] != c.Phase.FAILED
    assert c.Reason.INVALID_SPEC not in kube.events
