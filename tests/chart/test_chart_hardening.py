"""The chart's hardening switches, offline: the platform policy and trainer pod defaults reach the
operator, HA replicas get a PodDisruptionBudget and anti-affinity, the helm test pod has a read-only
root filesystem, the optional trainer NetworkPolicy selects the pods the operator builds."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_api import constants as c
from finetune_cli.manifests import load_job
from finetune_operator.builders import BuildOptions, Owner, PodDefaults, build_children
from finetune_operator.policy import DEFAULT_NODE_SELECTOR_KEYS, Policy
from finetune_operator.settings import parse_settings

from .helm import CHART, REPO, find, helm_binary, one, render, run_helm, set_args

pytestmark = pytest.mark.skipif(helm_binary() is None, reason="helm is not built (make tools)")

FULL = "ft-finetune-operator"
NS = "finetune-system"
HA: dict[str, Any] = {"replicaCount": 2, "leaderElection": {"enabled": True}}


def operator_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(one(objs, "Deployment", FULL)["spec"]["template"])


def settings_of(values: dict[str, Any] | None = None) -> Any:
    (container,) = operator_pod(render(values))["spec"]["containers"]
    return parse_settings(container["args"], env={})


def test_default_policy_allows_only_the_trainer_image_and_the_gpu_taint() -> None:
    s = settings_of()
    assert s.policy() == Policy(trainer_image="ghcr.io/finetune-dev/finetune-trainer:0.1.0",
                                allowed_images=(), allowed_priority_classes=(),
                                allowed_toleration_keys=(c.GPU_RESOURCE,),
                                allowed_node_selector_keys=DEFAULT_NODE_SELECTOR_KEYS)


def test_policy_values_reach_the_operator() -> None:
    s = settings_of({"policy": {"allowedImages": ["registry.example/ml/", "registry.example/x/trainer:2"],
                                "allowedPriorityClasses": ["training-high", "training-low"],
                                "allowedTolerationKeys": [], "allowedNodeSelectorKeys": ["pool"]}})
    assert s.allowed_images == ("registry.example/ml/", "registry.example/x/trainer:2")
    assert s.allowed_priority_classes == ("training-high", "training-low")
    assert s.allowed_toleration_keys == () and s.allowed_node_selector_keys == ("pool",)


def test_trainer_pod_defaults_reach_the_operator() -> None:
    assert settings_of().pod_defaults == PodDefaults()  # the chart's defaults are the operator's
    s = settings_of({"trainerPods": {"cpuPerGpu": 12, "memoryPerGpu": "100Gi", "cpuWithoutGpu": "500m",
                                     "memoryWithoutGpu": "2Gi", "shmSizeLimit": "32Gi", "scratchSize": "1Ti",
                                     "credentialsAsFiles": True}})
    assert s.pod_defaults == PodDefaults(cpu_per_gpu="12", memory_per_gpu="100Gi", cpu_without_gpu="500m",
                                         memory_without_gpu="2Gi", shm_size="32Gi", scratch_size="1Ti",
                                         credentials_as_files=True)


def test_one_replica_has_no_disruption_budget_or_anti_affinity() -> None:
    objs = render()
    assert not find(objs, "PodDisruptionBudget")
    assert "affinity" not in operator_pod(objs)["spec"]


def test_ha_replicas_get_a_disruption_budget_and_spread_over_nodes() -> None:
    objs = render(HA)
    template = operator_pod(objs)
    pdb = one(objs, "PodDisruptionBudget", FULL)
    assert pdb["metadata"]["namespace"] == NS
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (preferred,) = template["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = preferred["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()

    hard = operator_pod(render({**HA, "podAntiAffinity": "hard"}))["spec"]["affinity"]["podAntiAffinity"]
    assert list(hard) == ["requiredDuringSchedulingIgnoredDuringExecution"]
    assert "affinity" not in operator_pod(render({**HA, "podAntiAffinity": "none"}))["spec"]
    own = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone",
                                          "labelSelector": {"matchLabels": {"app": "x"}}}}]},
           "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
               {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]}}}
    assert operator_pod(render({**HA, "affinity": own}))["spec"]["affinity"] == own  # yours wins
    nodes = operator_pod(render({**HA, "affinity": {"nodeAffinity": own["nodeAffinity"]}}))["spec"]["affinity"]
    assert set(nodes) == {"nodeAffinity", "podAntiAffinity"}  # merged with a node affinity
    assert not find(render({**HA, "podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget")


def test_a_budget_that_blocks_every_drain_is_refused() -> None:
    proc = run_helm(["template", "ft", str(CHART), *set_args({**HA, "podDisruptionBudget": {"minAvailable": 2}})],
                    check=False)
    assert proc.returncode != 0 and "minAvailable must be below replicaCount" in proc.stderr


def test_helm_test_pod_has_a_read_only_root_filesystem_and_writes_nothing() -> None:
    pod = one(render(), "Pod", f"{FULL}-test-metrics")
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "volumeMounts" not in container and "volumes" not in pod["spec"]
    assert "-O -" in container["args"][0] and "/tmp" not in container["args"][0]


def trainer_pod_template(namespace: str) -> dict[str, Any]:
    spec = load_job(REPO / "examples" / "lora.yaml").spec
    built = build_children(Owner(name="tune", namespace=namespace, uid="0"), spec, BuildOptions(trainer_image="t:1"))
    return dict(built.job["spec"]["template"])


def test_trainer_network_policy_admits_only_trainers_the_operator_and_the_listed_scrapers() -> None:
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objs = render({"watch": {"namespaces": ["team-a", "team-b"]},
                   "trainerPods": {"networkPolicy": {"enabled": True, "metricsFrom": [prometheus]}}})
    policies = {p["metadata"]["namespace"]: p for p in find(objs, "NetworkPolicy", f"{FULL}-trainers")}
    assert set(policies) == {"team-a", "team-b"}
    template = trainer_pod_template("team-a")
    pod_labels = template["metadata"]["labels"]
    operator_labels = operator_pod(objs)["metadata"]["labels"]
    container_ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    for np in policies.values():
        spec = np["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
        # Only the metrics port, only from the operator and the listed scrapers; the ranks of a job
        # reach each other through the operator's per-job policy (builders.build_network_policy).
        (metrics,) = spec["ingress"]
        operator, scraper = metrics["from"]
        assert operator["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NS}
        assert operator["podSelector"]["matchLabels"].items() <= operator_labels.items()
        assert scraper == prometheus
        assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}] and "metrics" in container_ports
    settings = parse_settings(operator_pod(objs)["spec"]["containers"][0]["args"], env={})
    assert settings.pod_defaults.network_policy  # the operator makes the per-job policies
    for role in find(objs, "Role", FULL):
        assert {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
                "verbs": ["get", "create"]} in role["rules"]
    off = render({"watch": {"namespaces": ["team-a"]}})  # off by default: no policy, flag or rule
    assert not find(off, "NetworkPolicy")
    assert not parse_settings(operator_pod(off)["spec"]["containers"][0]["args"], env={}).pod_defaults.network_policy
    assert not any("networking.k8s.io" in r["apiGroups"] for role in find(off, "Role", FULL) for r in role["rules"])
    own = render({"trainerPods": {"networkPolicy": {"enabled": True, "namespaces": ["ml"]}}})
    assert [p["metadata"]["namespace"] for p in find(own, "NetworkPolicy")] == ["ml"]


def test_network_policy_needs_namespaces() -> None:
    proc = run_helm(["template", "ft", str(CHART), *set_args({"trainerPods": {"networkPolicy": {"enabled": True}}})],
                    check=False)
    assert proc.returncode != 0 and "a NetworkPolicy lives in one namespace" in proc.stderr


@pytest.mark.parametrize(("values", "complaint"), [
    ({"policy": {"allowedImage": ["x"]}}, "allowedImage"),
    ({"policy": {"allowedImages": "registry.example/ml/"}}, "allowedImages"),
    ({"trainerPods": {"cpuPerGPU": "8"}}, "cpuPerGPU"),
    ({"trainerPods": {"shmSizeLimit": "16 GB"}}, "shmSizeLimit"),
    ({"trainerPods": {"networkPolicy": {"enable": True}}}, "enable"),
    ({"podAntiAffinity": "strict"}, "podAntiAffinity"),
    ({"podDisruptionBudget": {"maxUnavailable": 1}}, "maxUnavailable"),
])
def test_schema_rejects_bad_hardening_values(values: dict[str, Any], complaint: str) -> None:
    proc = run_helm(["template", "ft", str(CHART), *set_args(values)], check=False)
    assert proc.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in proc.stderr and complaint in proc.stderr
