"""The chart on the real test cluster: helm install/uninstall, and the operator's RBAC.

RBAC: the chart's ServiceAccount gets a token from the TokenRequest API; the operator runs with a
kubeconfig holding only that token and takes a FineTuneJob through its whole lifecycle (children,
progress scraped from the trainer, a stall restart by the watchdog, success, events) without a
single refused request. Then each rule of the chart's Role is removed in turn and the same run must
be refused (HTTP 403) a request that only that rule grants: no rule is superfluous.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api import constants as c
from finetune_operator.status_rules import RESTART_REASON_ANNOTATION
from harness.cluster import STAGE_HOLD, TestCluster, wait_until

from .helm import CHART, REPO, run_helm

# The operator's own test harness (tests/operator is not a package: `operator` is a stdlib name).
sys.path.insert(0, str(REPO / "tests" / "operator"))
from operator_harness import (
    METRICS_URL_ANNOTATION,
    FakeMetrics,
    OperatorProcess,
    children,
    events,
    ftj_status,
)
from operator_specs import job_manifest

pytestmark = pytest.mark.cluster
FTJ = f"{c.PLURAL}.{c.GROUP}"
#: The operator's stall timeout in the RBAC runs (seconds): short, so the lifecycle takes a stall restart.
STALL_TIMEOUT = 2

#: Minimal stand-ins for prometheus-operator's CRDs, so the chart's monitors and rules can be created.
MONITORING_CRDS = [("servicemonitors", "ServiceMonitor"), ("podmonitors", "PodMonitor"),
                   ("prometheusrules", "PrometheusRule")]


def helm(cluster: TestCluster, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_helm([*args, "--kubeconfig", str(cluster.kubeconfig)], check=check, timeout=timeout,
                    env={"KUBECONFIG": str(cluster.kubeconfig)})


def manifest_objects(cluster: TestCluster, release: str, namespace: str) -> list[dict[str, Any]]:
    out = helm(cluster, "get", "manifest", release, "-n", namespace).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def exists(cluster: TestCluster, obj: dict[str, Any]) -> bool:
    kind = obj["kind"].lower() + "." + obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else obj["kind"].lower()
    args = ["get", kind, obj["metadata"]["name"], "--ignore-not-found", "-o", "name"]
    if obj["metadata"].get("namespace"):
        args += ["-n", obj["metadata"]["namespace"]]
    return bool(cluster.kubectl(*args).stdout.strip())


@pytest.fixture
def monitoring_crds(cluster: TestCluster) -> Iterator[None]:
    for plural, kind in MONITORING_CRDS:
        cluster.apply({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                     "names": {"plural": plural, "kind": kind},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
        })
    for plural, _ in MONITORING_CRDS:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{plural}.monitoring.coreos.com", "--timeout=30s")
    yield
    for plural, _ in MONITORING_CRDS:
        cluster.kubectl("delete", "crd", f"{plural}.monitoring.coreos.com", "--ignore-not-found", "--wait=false")


def test_install_creates_every_object_and_uninstall_leaves_only_the_crd(
    cluster: TestCluster, namespace: str, monitoring_crds: None
) -> None:
    release = f"ft-{uuid.uuid4().hex[:6]}"
    proc = helm(cluster, "install", release, str(CHART), "-n", namespace, "--wait", "--timeout", "120s",
                "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.trainerPodMonitor.enabled=true",
                "--set", "prometheusRule.enabled=true", "--set", "leaderElection.enabled=true",
                "--set-json", 'tolerations=[{"key":"nvidia.com/gpu","operator":"Exists","effect":"NoSchedule"}]')
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"rollout status deployment/{release}-finetune-operator" in notes
    assert "kubectl get ftj" in notes and "finetune validate" in notes

    objs = manifest_objects(cluster, release, namespace)
    kinds = {o["kind"] for o in objs}
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment",
                     "Service", "ConfigMap", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    missing = [f"{o['kind']}/{o['metadata']['name']}" for o in objs if not exists(cluster, o)]
    assert not missing, f"installed but not in the cluster: {missing}"
    # The Deployment rolled out (kwok runs the pod on the CPU node) under the chart's ServiceAccount.
    deploy = cluster.get_json("deployment", f"{release}-finetune-operator", "-n", namespace)
    assert deploy["status"].get("availableReplicas") == 1
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == f"{release}-finetune-operator"
    # The CRD the chart ships is the one the cluster serves.
    assert cluster.get_json("crd", c.CRD_NAME)["spec"]["group"] == c.GROUP

    # A user's job must survive the operator being uninstalled.
    cluster.apply(job_manifest("keep-me", namespace))
    helm(cluster, "uninstall", release, "-n", namespace, "--wait", "--timeout", "120s")
    left = [f"{o['kind']}/{o['metadata']['name']}" for o in objs if exists(cluster, o)]
    assert not left, f"left behind by helm uninstall: {left}"

    # Nothing labelled with the release either (the operator's ReplicaSet and pod go by garbage collection).
    def labelled() -> list[str]:
        return list(cluster.kubectl("get", "all,configmaps,serviceaccounts,roles,rolebindings,clusterroles,"
                                    "clusterrolebindings", "-A", "-l", f"app.kubernetes.io/instance={release}",
                                    "-o", "name").stdout.split())

    try:
        wait_until(lambda: not labelled(), 60, "every object of the release to be gone", interval=0.5)
    except Exception:
        raise AssertionError(f"left behind by helm uninstall: {labelled()}") from None
    assert cluster.get_json("crd", c.CRD_NAME)["metadata"]["name"] == c.CRD_NAME  # kept
    assert cluster.get_json(FTJ, "keep-me", "-n", namespace)["metadata"]["name"] == "keep-me"


# ---- RBAC ---------------------------------------------------------------------------------------

def service_account_kubeconfig(cluster: TestCluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig for the API server that authenticates with a TokenRequest token of `sa` only."""
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": sa, "namespace": namespace}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(kubeconfig))
    return path


class ServiceAccountOperator(OperatorProcess):
    """The operator tests' operator process, but authenticated as the chart's ServiceAccount."""

    def __init__(self, cluster: TestCluster, namespace: str, log_dir: Path, kubeconfig: Path, tag: str) -> None:
        super().__init__(cluster, namespace, log_dir, "--stall-timeout", str(STALL_TIMEOUT), tag=tag)
        self.kubeconfig = kubeconfig

    def start(self, wait_ready: bool = True) -> ServiceAccountOperator:
        env = {**os.environ, **self.cluster.env, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO)
        if wait_ready:
            # Generous: Python, Kopf and the Kubernetes client import slowly on a loaded 2-core machine.
            wait_until(self.ready, 120, f"the operator to be ready (log: {self.log_path})")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def denied(log: str, rule: dict[str, Any]) -> str | None:
    """What the API server refused the operator that only `rule` grants, if its log shows a 403 for it.

    The API server's 403 message names verb, resource and group ("cannot list resource \"pods\" in
    API group \"\""); Kopf's retries and the operator's errors both log it (quotes may be escaped)."""
    q = r'\\*"'
    for group in rule["apiGroups"]:
        for resource in rule["resources"]:
            pattern = (rf"cannot ({'|'.join(map(re.escape, rule['verbs']))}) resource {q}{re.escape(resource)}{q} "
                       rf"in API group {q}{re.escape(group)}{q}")
            found = re.search(pattern, log)
            if found:
                return found.group(0).replace("\\", "")
    return None


def pods_of(cluster: TestCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return [p for p in children(cluster, namespace, name, "pods")
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


class Broken(Exception):
    """The run cannot go on: the operator exited, or the API server refused it a rule's request."""


def lifecycle(cluster: TestCluster, namespace: str, op: ServiceAccountOperator, name: str, deadline: float,
              broken: Callable[[], str | None]) -> dict[str, float]:
    """Create -> children -> Running with progress scraped from the trainer -> stalled, so the watchdog
    annotates and evicts the pod -> the Job's replacement pod runs -> Succeeded, with the events a user
    sees. Returns when each milestone was reached (seconds after creation); raises AssertionError
    naming the milestone that was not reached in time, or Broken as soon as broken() says why."""
    metrics = FakeMetrics()
    reached: dict[str, float] = {}
    try:
        metrics.set(step=5, total=20, loss=2.0)  # stays at 5 until after the stall restart
        cluster.apply(job_manifest(name, namespace) | {"metadata": {
            "name": name, "namespace": namespace,
            "annotations": {STAGE_HOLD: "true", METRICS_URL_ANNOTATION: metrics.url}}})
        start = time.monotonic()
        end = start + deadline

        def until(milestone: str, predicate: Callable[[], Any], what: Callable[[], str]) -> Any:
            while True:
                if op.proc is not None and op.proc.poll() is not None:
                    raise Broken(f"the operator exited with {op.proc.returncode}")
                why = broken()
                if why is not None:
                    raise Broken(why)
                got = predicate()
                if got:
                    reached[milestone] = time.monotonic() - start
                    return got
                if time.monotonic() > end:
                    raise AssertionError(f"{milestone} not reached within {deadline:.0f} s: {what()}")
                time.sleep(0.3)

        def status() -> dict[str, Any]:
            return ftj_status(cluster, namespace, name)

        def dump() -> str:
            return json.dumps(status())[:800]

        until("children", lambda: all(children(cluster, namespace, name, k) for k in ("configmaps", "services", "jobs")),
              lambda: "the ConfigMap, Service and Job were not all created")
        until("running", lambda: status().get("phase") == c.Phase.RUNNING
              and (status().get("progress") or {}).get("step") == 5, dump)
        # The step does not move: after STALL_TIMEOUT the watchdog notes why on the pod (pods patch)
        # and evicts it (pods/eviction).
        first = until("stall-restart", lambda: next(
            (p for p in children(cluster, namespace, name, "pods") if p["metadata"].get("deletionTimestamp")
             and RESTART_REASON_ANNOTATION in (p["metadata"].get("annotations") or {})), None), dump)
        until("restart-counted", lambda: status().get("restarts") == 1
              and str(status().get("lastRestartReason", "")).startswith(c.Reason.STALLED), dump)
        # Play the kubelet: the evicted trainer saves a checkpoint and exits with PREEMPTED (kwok may
        # have removed the pod already), and the Job controller starts a replacement.
        cluster.kubectl("patch", "pod", first["metadata"]["name"], "-n", namespace, "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": {"phase": "Failed", "containerStatuses": [{
                            "name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                            "state": {"terminated": {"exitCode": c.ExitCode.PREEMPTED, "reason": "Error",
                                                     "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                 time.gmtime())}}}]}}),
                        check=False)
        until("replaced", lambda: [p for p in pods_of(cluster, namespace, name)
                                   if p["metadata"]["uid"] != first["metadata"]["uid"]],
              lambda: "no replacement pod is running")
        metrics.set(step=20, total=20, loss=0.5)
        for p in pods_of(cluster, namespace, name):
            cluster.kubectl("annotate", "pod", p["metadata"]["name"], "-n", namespace, f"{STAGE_HOLD}=false",
                            "--overwrite", check=False)
        until("succeeded", lambda: status().get("phase") == c.Phase.SUCCEEDED
              and (status().get("progress") or {}).get("step") == 20, dump)
        wanted = {c.Reason.CREATED, c.Reason.RUNNING, c.Reason.STALLED, c.Reason.RESTARTED, c.Reason.SUCCEEDED}
        until("events", lambda: wanted <= {e["reason"] for e in events(cluster, namespace, name)},
              lambda: f"events missing: {[e['reason'] for e in events(cluster, namespace, name)]}")
        return reached
    finally:
        metrics.close()


@pytest.mark.slow
def test_operator_with_the_chart_service_account_runs_a_job_and_needs_every_rule(
    cluster: TestCluster, namespace: str, tmp_path: Path
) -> None:
    release = f"rbac-{uuid.uuid4().hex[:5]}"
    # The chart's ServiceAccount, Role and RoleBinding for this namespace; the operator runs here,
    # as a process, with only that identity (replicaCount 0: no Deployment pod).
    helm(cluster, "install", release, str(CHART), "-n", namespace, "--skip-crds",
         "--set", "replicaCount=0", "--set-json", f'watch={{"namespaces":["{namespace}"]}}')
    sa = role_name = f"{release}-finetune-operator"
    role = strip(cluster.get_json("role", role_name, "-n", namespace))
    rules = role["rules"]
    kubeconfig = service_account_kubeconfig(cluster, namespace, sa, tmp_path / "sa.kubeconfig")

    # The identity is really restricted: no secrets, nothing in other namespaces, nothing cluster-wide.
    def can(*args: str) -> bool:
        out = cluster.kubectl("--kubeconfig", str(kubeconfig), "auth", "can-i", *args, check=False).stdout.strip()
        return out == "yes"

    assert can("create", "jobs.batch", "-n", namespace)
    assert not can("get", "secrets", "-n", namespace)
    assert not can("create", "jobs.batch", "-n", "default")
    assert not can("list", "nodes") and not can("list", "namespaces")
    assert not can("list", "customresourcedefinitions.apiextensions.k8s.io")
    assert not cluster.kubectl("get", "clusterroles", "-l", f"app.kubernetes.io/instance={release}",
                               "-o", "name").stdout.strip()

    try:
        # With every rule: the whole lifecycle, without a single refused request. Kopf's cluster-wide
        # scanning is off in namespaced mode, so the operator handles the job at once after start-up
        # (with it on, Kopf retried the forbidden namespace listing for ~55 s before handling anything).
        op = ServiceAccountOperator(cluster, namespace, tmp_path, kubeconfig, "full")
        try:
            op.start()
            reached = lifecycle(cluster, namespace, op, "rbac-full", deadline=240, broken=lambda: None)
        except (AssertionError, Broken) as exc:
            raise AssertionError(f"with every rule: {exc}\noperator log:\n{op.log()[-4000:]}") from None
        finally:
            op.stop()
        log = op.log()
        assert not re.search(r"forbidden|Not enough permissions", log, re.IGNORECASE), log[-4000:]
        assert reached["children"] < 30, f"slow start-up in namespaced mode: {reached}"

        # Each rule removed in turn: the same run must be refused a request that only this rule
        # grants (the API server's 403 in the operator's log). One operator process per variant (Kopf's
        # watches keep the permissions they were opened with), all in the same namespace.
        superfluous, outcomes = [], {}
        for i, rule in enumerate(rules):
            tag = f"minus{i}"
            cluster.apply(role | {"rules": rules[:i] + rules[i + 1:]})
            op = ServiceAccountOperator(cluster, namespace, tmp_path, kubeconfig, tag)
            started = time.monotonic()
            try:
                op.start()
                # The 403s come within seconds (the eviction one after the stall timeout); the
                # deadline only bounds a run that neither breaks nor finishes.
                lifecycle(cluster, namespace, op, f"rbac-{tag}", deadline=max(60.0, 2 * reached["events"]),
                          broken=lambda rule=rule, op=op: denied(op.log(), rule))
                superfluous.append(rule)
            except Broken as exc:
                outcomes[tag] = (round(time.monotonic() - started, 1), str(exc))
            except AssertionError as exc:
                raise AssertionError(f"without {rule}: no 403 for it and the run did not finish: {exc}\n"
                                     f"operator log:\n{op.log()[-4000:]}") from None
            finally:
                op.kill()
                cluster.apply(role)
                cluster.kubectl("delete", FTJ, f"rbac-{tag}", "-n", namespace, "--ignore-not-found", "--wait=false")
        print(f"RBAC: full run milestones {reached}; broken variants (seconds, why) {outcomes}")
        assert not superfluous, f"the lifecycle works without these rules, drop them from the chart: {superfluous}"
    finally:
        helm(cluster, "uninstall", release, "-n", namespace, check=False)


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as it can be applied again (no resourceVersion, uid, managedFields...)."""
    meta = {k: v for k, v in obj["metadata"].items() if k in ("name", "namespace", "labels", "annotations")}
    return {**obj, "metadata": meta}
