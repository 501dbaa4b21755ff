"""The Helm chart, offline: lint, render with default and non-default values, schema rejections,
and the chart's agreement with the code (operator flags, ports, trainer pod labels, the CRD)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api import constants as c
from finetune_cli.manifests import load_job
from finetune_operator.builders import COMPONENT_TRAINER, BuildOptions, Owner, build_children
from finetune_operator.settings import parse_settings

from .helm import CHART, REPO, find, helm_binary, one, render, run_helm

pytestmark = pytest.mark.skipif(helm_binary() is None, reason="helm is not built (make tools)")

FULL = "ft-finetune-operator"
NS = "finetune-system"

#: Every optional feature on, namespaced RBAC, pinned digests: the non-default rendering.
CUSTOM: dict[str, Any] = {
    "fullnameOverride": "tuner",
    "watch": {"namespaces": ["team-a", "team-b"]},
    "image": {"repository": "registry.example/ops/finetune-operator", "tag": "1.2.3", "pullPolicy": "Always"},
    "trainer": {"image": {"repository": "registry.example/ml/trainer", "digest": "sha256:" + "ab" * 32}},
    "operator": {"stallTimeoutSeconds": 600, "resyncIntervalSeconds": 5, "extraArgs": ["--bind-address=0.0.0.0"],
                 "extraEnv": [{"name": "AWS_REGION", "value": "eu-west-1"}]},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                "trainerPodMonitor": {"enabled": True, "interval": "10s"}},
    "prometheusRule": {"enabled": True, "alertLabels": {"team": "ml-platform"}},
    "grafanaDashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "ML"}},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "replicaCount": 2,
    "leaderElection": {"enabled": True, "leaseDurationSeconds": 20},
}


def operator_container(objs: list[dict[str, Any]], name: str = FULL) -> dict[str, Any]:
    (container,) = one(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    return container


# ---- lint ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [{}, CUSTOM], ids=["default", "custom"])
def test_helm_lint_strict(values: dict[str, Any], tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    out = run_helm(["lint", "--strict", str(CHART), "--namespace", NS, "-f", str(values_file)]).stdout
    assert "0 chart(s) failed" in out


# ---- default rendering ---------------------------------------------------------------------------

def test_default_render_objects() -> None:
    objs = render()
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert kinds == sorted([
        ("ServiceAccount", FULL), ("ClusterRole", FULL), ("ClusterRoleBinding", FULL),
        ("Deployment", FULL), ("Service", f"{FULL}-metrics"), ("ConfigMap", f"{FULL}-dashboard"),
        ("Pod", f"{FULL}-test-metrics"),
    ])
    for o in objs:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == NS, o["metadata"]
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == "ft"


def test_default_deployment_runs_the_operator_safely() -> None:
    objs = render()
    deploy = one(objs, "Deployment", FULL)
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    container = operator_container(objs)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": c.OPERATOR_METRICS_PORT, "health": c.OPERATOR_HEALTH_PORT}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    # The image's entry point is `finetune operator`; the chart passes only flags, and the
    # operator's own parser must accept them and land on what the values asked for.
    settings = parse_settings(container["args"], env={})
    assert settings.all_namespaces and settings.namespaces == ()
    assert settings.trainer_image == "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
    assert (settings.metrics_port, settings.health_port) == (c.OPERATOR_METRICS_PORT, c.OPERATOR_HEALTH_PORT)
    assert not settings.leader_elect
    assert container["image"] == "ghcr.io/finetune-dev/finetune-operator:0.1.0"
    service = one(objs, "Service", f"{FULL}-metrics")
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_default_rbac_is_cluster_wide_and_bound_to_the_operator() -> None:
    objs = render()
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(objs, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULL, "namespace": NS}]
    rules = one(objs, "ClusterRole")["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert (c.GROUP, c.PLURAL) in granted and (c.GROUP, f"{c.PLURAL}/status") in granted
    # Nothing the operator never touches, and no wildcards.
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in rules)
    assert ("", "secrets") not in granted and ("", "pods/exec") not in granted


def test_crd_is_shipped_from_crds_dir_and_skippable() -> None:
    with_crds = render(include_crds=True)
    crd = one(with_crds, "CustomResourceDefinition", c.CRD_NAME)
    assert crd["spec"]["group"] == c.GROUP
    assert not find(render(), "CustomResourceDefinition")


def test_chart_crd_copy_matches_generated_crd() -> None:
    """`make crd` copies crds/ into the chart; a stale copy would install an old schema."""
    source = (REPO / c.CRD_FILE).read_text()
    copy = (CHART / "crds" / Path(c.CRD_FILE).name).read_text()
    assert copy == source, "charts/finetune-operator/crds is stale: run `make crd`"
    from finetune_api.crd import render_crd_yaml

    assert copy == render_crd_yaml(), "the CRD is stale against the API model: run `make crd`"
    assert "charts/finetune-operator/crds" in (REPO / "Makefile").read_text()


# ---- non-default rendering -------------------------------------------------------------------

def test_custom_values_render_namespaced_rbac_and_monitoring() -> None:
    objs = render(CUSTOM)
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in find(objs, "Role", "tuner")}
    bindings = {b["metadata"]["namespace"]: b for b in find(objs, "RoleBinding", "tuner")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for binding in bindings.values():
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tuner", "namespace": NS}]
    container = operator_container(objs, "tuner")
    settings = parse_settings(container["args"], env={})
    assert settings.namespaces == ("team-a", "team-b") and not settings.all_namespaces
    assert settings.trainer_image == "registry.example/ml/trainer@sha256:" + "ab" * 32
    assert settings.stall_timeout == 600 and settings.resync_interval == 5
    # Two replicas share one Lease in the release namespace; the Role grants only that Lease.
    assert settings.leader_elect and settings.leader_election_namespace == NS
    assert settings.leader_election_name == "tuner" and settings.lease_duration == 20
    lease_role = one(objs, "Role", "tuner-leader-election")
    assert lease_role["metadata"]["namespace"] == NS
    assert {n for r in lease_role["rules"] for n in r.get("resourceNames", [])} == {"tuner"}
    assert one(objs, "RoleBinding", "tuner-leader-election")["subjects"][0]["name"] == "tuner"
    assert container["image"] == "registry.example/ops/finetune-operator:1.2.3"
    assert {"name": "AWS_REGION", "value": "eu-west-1"} in container["env"]
    pod = one(objs, "Deployment", "tuner")["spec"]["template"]["spec"]
    assert pod["tolerations"] == CUSTOM["tolerations"] and pod["nodeSelector"] == CUSTOM["nodeSelector"]

    monitor = one(objs, "ServiceMonitor", "tuner")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(objs, "Service")["metadata"]["labels"].items()
    pod_monitor = one(objs, "PodMonitor", "tuner-trainers")
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    rule = one(objs, "PrometheusRule", "tuner")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {"FineTuneJobFailed", "FineTuneJobStalled", "FineTuneJobRestartsClimbing",
                                          "FineTuneOperatorDown"}
    assert all(a["labels"]["team"] == "ml-platform" for a in alerts)
    dashboard = one(objs, "ConfigMap", "tuner-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"


def test_trainer_pod_monitor_selects_the_pods_the_operator_builds() -> None:
    """The PodMonitor's selector, port and relabelling match what the operator's builders create."""
    job = load_job(REPO / "examples" / "lora.yaml")
    owner = Owner(name="tiny-lora", namespace="team-a", uid="0000")
    children = build_children(owner, job.spec, BuildOptions(trainer_image="trainer:test"))
    template = children.job["spec"]["template"]
    pod_monitor = one(render(CUSTOM), "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert pod_monitor["spec"]["selector"]["matchLabels"][c.LABEL_COMPONENT] == COMPONENT_TRAINER
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for ct in template["spec"]["containers"] for p in ct.get("ports", [])}
    assert ports[endpoint["port"]] == c.TRAINER_METRICS_PORT
    # Prometheus exposes pod label `finetune.dev/job-name` as this meta label.
    meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", c.LABEL_JOB_NAME)
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel["finetune_job"] == [meta]
    assert template["metadata"]["labels"][c.LABEL_JOB_NAME] == "tiny-lora"
    # Trainer pods never get API credentials, so the chart has no RBAC for them.
    assert template["spec"]["automountServiceAccountToken"] is False


def test_dashboard_configmap_is_for_the_grafana_sidecar() -> None:
    cm = one(render(), "ConfigMap", f"{FULL}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["finetune-operator.json"])
    titles = {p["title"] for p in dashboard["panels"] if p["type"] != "row"}
    assert titles >= {"Jobs by phase", "Training loss", "Eval loss", "Tokens per second", "Progress", "ETA",
                      "GPU memory allocated", "Workload restarts (1h)", "Reconcile latency", "Reconcile errors"}
    assert not find(render({"grafanaDashboard": {"enabled": False}}), "ConfigMap")


def test_optional_objects_are_off_by_default_and_switchable() -> None:
    objs = render()
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "Role", "RoleBinding"):
        assert not find(objs, kind), kind
    bare = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"},
                   "metrics": {"service": {"enabled": False}}, "tests": {"enabled": False},
                   "grafanaDashboard": {"enabled": False}})
    assert [o["kind"] for o in bare] == ["Deployment"]
    assert bare[0]["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


# ---- values and schema ----------------------------------------------------------------------

@pytest.mark.parametrize("values, complaint", [
    ({"replicas": 2}, "replicas"),                                       # unknown top-level key
    ({"image": {"repository": "x", "tagg": "1"}}, "tagg"),                # unknown nested key
    ({"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),        # typo in a deep key
    ({"prometheusRule": {"alerts": {"jobStalled": {"forr": "5m"}}}}, "forr"),
    ({"replicaCount": "1"}, "replicaCount"),                              # wrong type
    ({"watch": {"namespaces": "team-a"}}, "namespaces"),                  # string instead of list
    ({"rbac": {"create": "yes"}}, "create"),
    ({"metrics": {"service": {"port": 70000}}}, "port"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"prometheusRule": {"alerts": {"operatorDown": {"for": "half an hour"}}}}, "for"),
    ({"watch": {"namespaces": ["Team_A"]}}, "namespaces"),
])
def test_schema_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    from .helm import set_args

    proc = run_helm(["template", "ft", str(CHART), *set_args(values)], check=False)
    assert proc.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert complaint in proc.stderr


#: Keys whose default is a Kubernetes object passed through as is: their sub-keys are the API's.
PASS_THROUGH = ("resources", "podSecurityContext", "securityContext", "grafanaDashboard.labels")


def test_every_values_key_is_commented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        stack = [(d, k) for d, k in stack if d < indent]
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if any(path.startswith(p + ".") for p in PASS_THROUGH):
            continue
        if not lines[i - 1].strip().startswith("#"):
            undocumented.append(path)
    assert not undocumented, f"values.yaml keys without a comment above them: {undocumented}"


def test_schema_forbids_unknown_keys_everywhere() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node and node.get("additionalProperties") is not False:
            open_objects.append(path)
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "$")
    assert not open_objects, open_objects
