"""The test cluster itself: pinned versions, loopback only, fake GPU nodes, controllers running."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from harness.cluster import (
    GPU_PRODUCT,
    GPU_RESOURCE,
    REPO_ROOT,
    TestCluster,
    run_kubectl,
    tool,
    wait_until,
)

pytestmark = pytest.mark.cluster


def pinned(name: str) -> str:
    text = (REPO_ROOT / "hack" / "tools" / "versions.env").read_text()
    match = re.search(rf"^{name}=(\S+)$", text, re.M)
    assert match, f"{name} not pinned in hack/tools/versions.env"
    return match.group(1)


def test_control_plane_reports_the_pinned_version_on_loopback(cluster: TestCluster) -> None:
    assert cluster.server.startswith("https://127.0.0.1:")
    versions = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    want = pinned("KUBERNETES_VERSION")
    assert versions["serverVersion"]["gitVersion"] == want
    assert versions["clientVersion"]["gitVersion"] == want
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_fake_gpu_nodes(cluster: TestCluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in cluster.get_json("nodes")["items"]}
    assert set(cluster.gpu_node_names) <= set(nodes) and len(cluster.gpu_node_names) == 4
    for name in cluster.gpu_node_names:
        node = nodes[name]
        assert node["status"]["capacity"][GPU_RESOURCE] == "8"
        assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"] == GPU_PRODUCT
        assert labels["nvidia.com/gpu.present"] == "true"
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert node["spec"]["taints"] == [
            {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
        ]
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"


def test_every_control_plane_process_is_running(cluster: TestCluster) -> None:
    pids = cluster.component_pids()
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                         "kwok-controller"}
    assert cluster.dead_components() == []


def test_garbage_collector_deletes_dependents(cluster: TestCluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = cluster.kubectl("get", "configmap", "owner", "-n", namespace,
                          "-o", "jsonpath={.metadata.uid}").stdout
    cluster.apply({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]},
    }, namespace=namespace)
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_until(lambda: cluster.kubectl("get", "configmap", "dependent", "-n", namespace,
                                       check=False).returncode != 0,
               30, "the garbage collector to delete the dependent ConfigMap")


def test_helm_is_built_at_its_pinned_version_and_reaches_the_cluster(
    cluster: TestCluster, namespace: str
) -> None:
    helm = str(tool("helm"))
    out = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(pinned("HELM_VERSION"))
    ls = subprocess.run([helm, "list", "-n", namespace, "-o", "json"], capture_output=True,
                        text=True, env={**cluster.env, "HOME": str(cluster.state_dir)}, check=False)
    assert ls.returncode == 0, ls.stderr
    assert json.loads(ls.stdout) == []


def test_kubectl_helper_reports_stderr(cluster: TestCluster) -> None:
    proc = run_kubectl(cluster.kubeconfig, "get", "configmap", "no-such-thing", check=False)
    assert proc.returncode != 0
    assert 'configmaps "no-such-thing" not found' in proc.stderr
