"""The operator, as a process, against the real control plane (kwok nodes): the whole lifecycle."""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api import constants as c
from harness.cluster import (
    STAGE_DELAY,
    STAGE_DISRUPTION,
    STAGE_EXIT_CODE,
    STAGE_HOLD,
    STAGE_KWOK_SKIP,
    TestCluster,
    wait_until,
)
from operator_harness import (
    METRICS_URL_ANNOTATION,
    REPO,
    FakeMetrics,
    OperatorProcess,
    children,
    condition,
    events,
    ftj,
    ftj_status,
    http_get,
    wait_gone,
    wait_phase,
    wait_status,
)
from operator_specs import job_manifest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.cluster
FTJ = f"{c.PLURAL}.{c.GROUP}"


def manifest(name: str, namespace: str, annotations: dict[str, str] | None = None,
             labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    m = job_manifest(name, namespace, **spec)
    if annotations:
        m["metadata"]["annotations"] = annotations
    if labels:
        m["metadata"]["labels"] = labels
    return m


def pods_of(cluster: TestCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return sorted(children(cluster, namespace, name, "pods"), key=lambda p: p["metadata"]["creationTimestamp"])


def wait_running_pod(cluster: TestCluster, namespace: str, name: str,
                     exclude: frozenset[str] | set[str] = frozenset(), timeout: float = 30) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        for p in pods_of(cluster, namespace, name):
            if (p["metadata"]["uid"] not in exclude and p["status"].get("phase") == "Running"
                    and not p["metadata"].get("deletionTimestamp")):
                return p
        return None

    return dict(wait_until(running, timeout, f"a running pod of {name}", interval=0.3))


def patch_pod_status(cluster: TestCluster, namespace: str, pod: str, status: dict[str, Any]) -> None:
    cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))


def test_create_builds_children_runs_and_succeeds_with_progress_and_artifact(
    cluster: TestCluster, namespace: str, operator: OperatorProcess, fake_metrics: FakeMetrics
) -> None:
    # kwok leaves this pod alone: the test plays the kubelet, with a termination message.
    cluster.apply(manifest("tune", namespace, annotations={METRICS_URL_ANNOTATION: fake_metrics.url},
                           labels={STAGE_KWOK_SKIP: "true"}, runPolicy={"backoffLimit": 2}))
    uid = ftj(cluster, namespace, "tune")["metadata"]["uid"]
    wait_until(lambda: children(cluster, namespace, "tune", "jobs"), 30, "the Job", interval=0.3)
    [cm] = children(cluster, namespace, "tune", "configmaps")
    [svc] = children(cluster, namespace, "tune", "services")
    [job] = children(cluster, namespace, "tune", "jobs")
    for child in (cm, svc, job):
        [ref] = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == (c.KIND, uid, True)
    assert json.loads(cm["data"][c.SPEC_FILE_NAME])["method"]["type"] == "lora"
    assert svc["spec"]["clusterIP"] == "None"
    pod_spec = job["spec"]["template"]["spec"]
    [container] = pod_spec["containers"]
    assert container["resources"]["limits"][c.GPU_RESOURCE] == "1"
    env = {e["name"]: e for e in container["env"]}
    assert env[c.Env.MASTER_ADDR]["value"] == "tune-0.tune"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod_spec["automountServiceAccountToken"] is False
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [c.ExitCode.PERMANENT]

    def scheduled() -> dict[str, Any] | None:
        pods = pods_of(cluster, namespace, "tune")
        return pods[0] if pods and pods[0]["spec"].get("nodeName") else None

    pod = wait_until(scheduled, 30, "the trainer pod to be scheduled", interval=0.3)
    assert pod["spec"]["nodeName"] in cluster.gpu_node_names
    name = pod["metadata"]["name"]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fake_metrics.set(step=10, total=20, loss=1.25)
    patch_pod_status(cluster, namespace, name, {
        "phase": "Running", "podIP": "10.0.0.7", "startTime": started,
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0, "image": container["image"],
                               "imageID": "", "started": True, "state": {"running": {"startedAt": started}}}],
    })
    st = wait_status(cluster, namespace, "tune",
                     lambda s: s.get("phase") == c.Phase.RUNNING and (s.get("progress") or {}).get("percent") == 50,
                     "Running at 50%", op=operator)
    assert st["progress"]["step"] == 10 and st["progress"]["totalSteps"] == 20
    assert st["metrics"]["loss"] == 1.25
    assert fake_metrics.scrapes > 0
    row = cluster.kubectl("get", FTJ, "tune", "-n", namespace, "--no-headers").stdout.split()
    assert row[:2] == ["tune", c.Phase.RUNNING] and "50" in row

    message = {"outcome": "succeeded", "artifact": {"uri": "s3://out/run-1", "sha256": "a" * 64, "sizeBytes": 4242},
               "metrics": {"evalLoss": 0.75}}
    fake_metrics.set(step=20, total=20, loss=0.9)
    patch_pod_status(cluster, namespace, name, {
        "phase": "Succeeded",
        "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
        "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": container["image"],
                               "imageID": "", "started": False, "state": {"terminated": {
                                   "exitCode": 0, "reason": "Completed", "message": json.dumps(message),
                                   "startedAt": started, "finishedAt": started}}}],
    })
    st = wait_phase(cluster, namespace, "tune", c.Phase.SUCCEEDED, op=operator)
    assert st["progress"]["percent"] == 100
    assert st["artifact"] == {"uri": "s3://out/run-1", "sha256": "a" * 64, "sizeBytes": 4242}
    assert st["metrics"]["evalLoss"] == 0.75
    assert st["restarts"] == 0 and st["completionTime"] and st["observedGeneration"] == 1
    assert condition(st, c.ConditionType.SUCCEEDED)["status"] == "True"  # type: ignore[index]
    row = cluster.kubectl("get", FTJ, "tune", "-n", namespace, "--no-headers").stdout.split()
    assert row[:2] == ["tune", c.Phase.SUCCEEDED] and "100" in row
    reasons = [e["reason"] for e in events(cluster, namespace, "tune")]
    assert [r for r in reasons if r in (c.Reason.CREATED, c.Reason.RUNNING, c.Reason.SUCCEEDED)] == [
        c.Reason.CREATED, c.Reason.RUNNING, c.Reason.SUCCEEDED]
    assert "Succeeded" in cluster.kubectl("describe", FTJ, "tune", "-n", namespace).stdout


def test_permanent_exit_code_fails_at_once_without_retry(
    cluster: TestCluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(manifest("perm", namespace, annotations={STAGE_EXIT_CODE: str(c.ExitCode.PERMANENT),
                                                           STAGE_DELAY: "500ms"}, runPolicy={"backoffLimit": 3}))
    st = wait_phase(cluster, namespace, "perm", c.Phase.FAILED, op=operator)
    failed = condition(st, c.ConditionType.FAILED)
    assert failed is not None and failed["reason"] == c.Reason.PERMANENT_ERROR
    assert f"exit code {c.ExitCode.PERMANENT}" in failed["message"]
    assert st["restarts"] == 0
    time.sleep(1.5)  # a retry would have shown up by now
    assert len(pods_of(cluster, namespace, "perm")) == 1


def test_retryable_exit_code_is_retried_up_to_backoff_limit_then_fails(
    cluster: TestCluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(manifest("flaky", namespace, annotations={STAGE_EXIT_CODE: "1", STAGE_DELAY: "200ms"},
                           runPolicy={"backoffLimit": 1}))
    st = wait_phase(cluster, namespace, "flaky", c.Phase.FAILED, timeout=90, op=operator)
    failed = condition(st, c.ConditionType.FAILED)
    assert failed is not None and failed["reason"] == c.Reason.BACKOFF_LIMIT_EXCEEDED
    assert "exit code 1" in failed["message"]
    assert len(pods_of(cluster, namespace, "flaky")) == 2
    assert st["restarts"] == 1 and "exit code 1" in st["lastRestartReason"]
    assert c.Reason.RESTARTED in [e["reason"] for e in events(cluster, namespace, "flaky")]


def test_preemption_is_not_counted_against_backoff_and_the_job_goes_on(
    cluster: TestCluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(manifest("pre", namespace, annotations={STAGE_HOLD: "true"}, runPolicy={"backoffLimit": 0}))
    first = wait_running_pod(cluster, namespace, "pre")
    wait_phase(cluster, namespace, "pre", c.Phase.RUNNING, op=operator)
    cluster.kubectl("annotate", "pod", first["metadata"]["name"], "-n", namespace, "--overwrite",
                    f"{STAGE_DISRUPTION}=PreemptionByScheduler", f"{STAGE_HOLD}=false")
    second = wait_running_pod(cluster, namespace, "pre", exclude={first["metadata"]["uid"]})
    st = wait_status(cluster, namespace, "pre", lambda s: s.get("restarts") == 1, "one restart", op=operator)
    assert st["phase"] == c.Phase.RUNNING
    assert st["lastRestartReason"].startswith(c.Reason.PREEMPTED)
    cluster.kubectl("annotate", "pod", second["metadata"]["name"], "-n", namespace, "--overwrite",
                    f"{STAGE_HOLD}=false")
    st = wait_phase(cluster, namespace, "pre", c.Phase.SUCCEEDED, op=operator)
    assert st["restarts"] == 1


def test_suspend_resume_and_delete_removes_every_child(
    cluster: TestCluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(manifest("sus", namespace, annotations={STAGE_HOLD: "true"}))
    wait_running_pod(cluster, namespace, "sus")
    wait_phase(cluster, namespace, "sus", c.Phase.RUNNING, op=operator)
    cluster.kubectl("patch", FTJ, "sus", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    st = wait_phase(cluster, namespace, "sus", c.Phase.SUSPENDED, op=operator)
    assert condition(st, c.ConditionType.SUSPENDED)["status"] == "True"  # type: ignore[index]
    [job] = children(cluster, namespace, "sus", "jobs")
    assert job["spec"]["suspend"] is True
    wait_until(lambda: not [p for p in pods_of(cluster, namespace, "sus") if p["status"].get("phase") == "Running"],
               30, "the suspended Job's pods to stop", interval=0.3)
    cluster.kubectl("patch", FTJ, "sus", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_running_pod(cluster, namespace, "sus")
    st = wait_phase(cluster, namespace, "sus", c.Phase.RUNNING, op=operator)
    assert condition(st, c.ConditionType.SUSPENDED)["reason"] == c.Reason.RESUMED  # type: ignore[index]
    reasons = [e["reason"] for e in events(cluster, namespace, "sus")]
    assert c.Reason.SUSPENDED in reasons and c.Reason.RESUMED in reasons

    cluster.kubectl("delete", FTJ, "sus", "-n", namespace, "--wait=true", timeout=60)
    wait_gone(cluster, namespace, "sus")


def _strip_cel(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [_strip_cel(v) for v in node]
    return node


def test_invalid_spec_reaching_the_operator_fails_with_invalid_spec(
    cluster: TestCluster, namespace: str, operator: OperatorProcess
) -> None:
    crd_path = REPO / c.CRD_FILE
    crd = yaml.safe_load(crd_path.read_text())
    bad = manifest("bad", namespace, method={"type": "qlora"})  # qlora without model.quantization
    try:
        # A CRD without its CEL rules (an old chart, a hand-edited CRD) lets the bad spec in.
        cluster.apply(_strip_cel(copy.deepcopy(crd)))
        wait_until(lambda: cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False).returncode == 0,
                   30, "the API server to accept the spec without CEL rules", interval=0.5)
    finally:
        cluster.kubectl("apply", "-f", str(crd_path))
    st = wait_phase(cluster, namespace, "bad", c.Phase.FAILED, op=operator)
    failed = condition(st, c.ConditionType.FAILED)
    assert failed is not None and failed["reason"] == c.Reason.INVALID_SPEC
    assert "method.type qlora needs model.quantization" in failed["message"]
    assert not children(cluster, namespace, "bad", "jobs")
    assert c.Reason.INVALID_SPEC in [e["reason"] for e in events(cluster, namespace, "bad")]


def test_stall_watchdog_marks_stalled_and_restarts_once(
    cluster: TestCluster, namespace: str, operator: OperatorProcess, fake_metrics: FakeMetrics
) -> None:
    fake_metrics.set(step=5, total=100, loss=2.0)  # never moves; the operator runs with --stall-timeout 3
    cluster.apply(manifest("stuck", namespace, annotations={STAGE_HOLD: "true",
                                                            METRICS_URL_ANNOTATION: fake_metrics.url}))
    first = wait_running_pod(cluster, namespace, "stuck")
    name = first["metadata"]["name"]

    def evicted() -> bool:
        pod = cluster.get_json("pod", name, "-n", namespace)
        return bool(pod["metadata"].get("deletionTimestamp"))

    wait_until(evicted, 60, "the watchdog to evict the stalled pod", interval=0.3)
    st = ftj_status(cluster, namespace, "stuck")
    assert st["restarts"] == 1 and st["lastRestartReason"].startswith(c.Reason.STALLED)
    reasons = [e["reason"] for e in events(cluster, namespace, "stuck")]
    assert c.Reason.STALLED in reasons and c.Reason.RESTARTED in reasons
    # Play the kubelet: SIGTERM, the trainer saves a checkpoint and exits with PREEMPTED.
    patch_pod_status(cluster, namespace, name, {
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                               "state": {"terminated": {"exitCode": c.ExitCode.PREEMPTED, "reason": "Error",
                                                        "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                    time.gmtime())}}}],
    })
    second = wait_running_pod(cluster, namespace, "stuck", exclude={first["metadata"]["uid"]})
    # Stuck at step 5 again: marked Stalled, but restarted only once.
    st = wait_status(cluster, namespace, "stuck", lambda s: s.get("phase") == c.Phase.RUNNING and (
        condition(s, c.ConditionType.STALLED) or {}).get("status") == "True", "Stalled again", op=operator)
    time.sleep(2)
    st = ftj_status(cluster, namespace, "stuck")
    assert st["restarts"] == 1 and st["phase"] == c.Phase.RUNNING
    assert ftj(cluster, namespace, "stuck")["metadata"]["annotations"][f"{c.GROUP}/stall-restarts"] == "1"
    assert not cluster.get_json("pod", second["metadata"]["name"], "-n", namespace)["metadata"].get(
        "deletionTimestamp")


def test_operator_killed_during_creation_converges_without_duplicates(
    cluster: TestCluster, namespace: str, tmp_path: Path
) -> None:
    op = OperatorProcess(cluster, namespace, tmp_path)
    rng = random.Random(6)
    names = [f"chaos-{i}" for i in range(10)]
    try:
        for name in names:
            cluster.apply(manifest(name, namespace))
            op.start()  # ready: handlers are about to run; kill it somewhere in the next 1.5 s
            time.sleep(rng.uniform(0.0, 1.5))
            op.kill()
        op.start()
        for name in names:
            st = wait_phase(cluster, namespace, name, c.Phase.SUCCEEDED, timeout=90, op=op)
            assert st["restarts"] == 0
            for kind in ("configmaps", "services", "jobs", "pods"):
                assert len(children(cluster, namespace, name, kind)) == 1, (name, kind)
            created = [e for e in events(cluster, namespace, name) if e["reason"] == c.Reason.CREATED]
            assert len(created) >= 1  # more than one if killed between an event and the status patch
    finally:
        op.stop()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_operator_metrics_count_jobs_by_phase(
    cluster: TestCluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(manifest("m-ok", namespace))
    cluster.apply(manifest("m-bad", namespace, annotations={STAGE_EXIT_CODE: "42"}))
    cluster.apply(manifest("m-paused", namespace, suspend=True))
    wait_phase(cluster, namespace, "m-ok", c.Phase.SUCCEEDED, op=operator)
    wait_phase(cluster, namespace, "m-bad", c.Phase.FAILED, op=operator)
    wait_phase(cluster, namespace, "m-paused", c.Phase.SUSPENDED, op=operator)

    def counted() -> bool:
        s = _samples(operator.metrics_text())
        return all(s.get(("finetune_operator_jobs", (("phase", p),))) == n
                   for p, n in ((c.Phase.SUCCEEDED, 1), (c.Phase.FAILED, 1), (c.Phase.SUSPENDED, 1),
                                (c.Phase.RUNNING, 0), (c.Phase.PENDING, 0)))

    wait_until(counted, 15, "the jobs gauge to count 1 Succeeded, 1 Failed, 1 Suspended", interval=0.3)
    s = _samples(operator.metrics_text())
    assert s[("finetune_operator_reconcile_duration_seconds_count", ())] > 0
    assert http_get(f"http://127.0.0.1:{operator.health_port}/healthz")[0] == 200
    assert http_get(f"http://127.0.0.1:{operator.health_port}/readyz")[0] == 200


def test_two_replicas_one_leader_and_the_standby_takes_over(
    cluster: TestCluster, namespace: str, tmp_path: Path
) -> None:
    flags = ("--leader-elect", "--leader-election-namespace", namespace, "--lease-duration", "3")
    first = OperatorProcess(cluster, namespace, tmp_path, *flags, tag="a")
    second = OperatorProcess(cluster, namespace, tmp_path, *flags, tag="b")
    try:
        first.start()
        second.start(wait_ready=False)
        cluster.apply(manifest("ha-1", namespace))
        wait_phase(cluster, namespace, "ha-1", c.Phase.SUCCEEDED, op=first)
        lease = cluster.get_json("lease", "finetune-operator", "-n", namespace)
        holder = lease["spec"]["holderIdentity"]
        assert not second.ready()  # the standby waits for the Lease, serving nothing
        first.kill()
        wait_until(second.ready, 60, "the standby to take over the Lease", interval=0.5)
        lease = cluster.get_json("lease", "finetune-operator", "-n", namespace)
        assert lease["spec"]["holderIdentity"] != holder
        assert lease["spec"]["leaseTransitions"] >= 1
        cluster.apply(manifest("ha-2", namespace))
        wait_phase(cluster, namespace, "ha-2", c.Phase.SUCCEEDED, op=second)
    finally:
        first.stop()
        second.stop()


def _uid(cluster: TestCluster, namespace: str, kind: str, name: str) -> str | None:
    got = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(got.stdout)["metadata"]["uid"] if got.returncode == 0 else None


def test_children_deleted_by_hand_are_made_again_told_and_counted(
    cluster: TestCluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(manifest("heal", namespace, annotations={STAGE_HOLD: "true"}))
    wait_running_pod(cluster, namespace, "heal")
    wait_phase(cluster, namespace, "heal", c.Phase.RUNNING, op=operator)
    for kind, name in (("configmap", "heal-spec"), ("service", "heal"), ("job", "heal")):
        before = _uid(cluster, namespace, kind, name)
        assert before is not None
        cluster.kubectl("delete", kind, name, "-n", namespace, "--wait=true", timeout=60)
        # Within seconds, not at some later resync: the operator watches its children.
        wait_until(lambda kind=kind, name=name, before=before: _uid(cluster, namespace, kind, name) not in (None, before),
                   15, f"the {kind} {name} to be made again", interval=0.3)
    [svc] = children(cluster, namespace, "heal", "services")
    [job] = children(cluster, namespace, "heal", "jobs")
    assert svc["spec"]["selector"]["batch.kubernetes.io/controller-uid"] == job["metadata"]["uid"]
    recreated = [e for e in events(cluster, namespace, "heal") if e["reason"] == c.Reason.RECREATED]
    assert [e["message"].split()[0] for e in recreated] == ["ConfigMap", "Service", "Job"]
    samples = _samples(operator.metrics_text())
    for kind in ("ConfigMap", "Service", "Job"):
        assert samples[("finetune_operator_children_recreated_total", (("kind", kind),))] == 1
    wait_running_pod(cluster, namespace, "heal")  # the new Job runs the trainer again


def test_a_pod_with_the_trainers_labels_is_not_a_trainer(
    cluster: TestCluster, namespace: str, operator: OperatorProcess, fake_metrics: FakeMetrics
) -> None:
    fake_metrics.set(step=5, total=100, loss=2.0)  # never moves: the watchdog (3 s) restarts the trainer
    labels = {c.LABEL_JOB_NAME: "own", c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_COMPONENT: "trainer"}
    cluster.apply({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "lookalike", "namespace": namespace, "labels": labels,
                                "annotations": {"batch.kubernetes.io/job-completion-index": "0",
                                                METRICS_URL_ANNOTATION: fake_metrics.url}},
                   "spec": {"nodeName": cluster.cpu_node_names[0],
                            "containers": [{"name": "trainer", "image": "registry.invalid/other:1"}]}})
    wait_until(lambda: cluster.get_json("pod", "lookalike", "-n", namespace)["status"].get("phase") == "Running",
               30, "the lookalike pod to run", interval=0.3)
    cluster.apply(manifest("own", namespace, annotations={STAGE_HOLD: "true",
                                                          METRICS_URL_ANNOTATION: fake_metrics.url}))
    [job] = wait_until(lambda: children(cluster, namespace, "own", "jobs"), 30, "the Job", interval=0.3)
    first = wait_until(lambda: [p for p in pods_of(cluster, namespace, "own") if p["metadata"].get("ownerReferences")
                                and p["status"].get("phase") == "Running"], 30, "the trainer pod to run",
                       interval=0.3)[0]
    st = wait_phase(cluster, namespace, "own", c.Phase.RUNNING, op=operator)
    assert condition(st, c.ConditionType.RUNNING)["message"] == "1/1 trainer pods running"  # type: ignore[index]
    # The rendezvous Service selects the Job's pods by the uid label the Job controller sets.
    [svc] = children(cluster, namespace, "own", "services")
    assert svc["spec"]["selector"]["batch.kubernetes.io/controller-uid"] == job["metadata"]["uid"]
    selected = cluster.get_json("pods", "-n", namespace, "-l",
                                ",".join(f"{k}={v}" for k, v in svc["spec"]["selector"].items()))["items"]
    assert [p["metadata"]["name"] for p in selected] == [first["metadata"]["name"]]
    # The watchdog restarts the stalled trainer, never the lookalike.
    wait_until(lambda: cluster.get_json("pod", first["metadata"]["name"], "-n", namespace)["metadata"].get(
        "deletionTimestamp"), 60, "the watchdog to evict the stalled trainer", interval=0.3)
    lookalike = cluster.get_json("pod", "lookalike", "-n", namespace)
    assert not lookalike["metadata"].get("deletionTimestamp")
    assert "finetune.dev/restart-reason" not in (lookalike["metadata"].get("annotations") or {})
    wait_status(cluster, namespace, "own", lambda s: s.get("restarts") == 1, "one restart", op=operator)


def _edit(cluster: TestCluster, namespace: str, name: str, spec: dict[str, Any], check: bool = True) -> Any:
    return cluster.kubectl("patch", FTJ, name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}),
                           check=check)


def _spec_in_config_map(cluster: TestCluster, namespace: str, name: str) -> dict[str, Any]:
    [cm] = children(cluster, namespace, name, "configmaps")
    return dict(json.loads(cm["data"][c.SPEC_FILE_NAME]))


def test_spec_edits_are_refused_or_applied_and_told(
    cluster: TestCluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster.apply(manifest("edit", namespace, annotations={STAGE_HOLD: "true"}))
    first = wait_running_pod(cluster, namespace, "edit")
    wait_phase(cluster, namespace, "edit", c.Phase.RUNNING, op=operator)
    # Immutable: the API server says so, whatever the field's presence before.
    for spec, field in (({"model": {"uri": "s3://models/other"}}, "model"),
                        ({"image": "registry.invalid/trainer:other"}, "image"),
                        ({"queueName": "team-a"}, "queueName")):
        refused = _edit(cluster, namespace, "edit", spec, check=False)
        assert refused.returncode != 0 and "immutable" in refused.stderr and field in refused.stderr, refused.stderr
    # runPolicy: on the live Job at once.
    _edit(cluster, namespace, "edit", {"runPolicy": {"backoffLimit": 5, "activeDeadlineSeconds": 7200}})
    wait_until(lambda: children(cluster, namespace, "edit", "jobs")[0]["spec"].get("activeDeadlineSeconds") == 7200,
               15, "the Job to get the new runPolicy", interval=0.3)
    assert children(cluster, namespace, "edit", "jobs")[0]["spec"]["backoffLimit"] == 5
    # checkpointing: the running trainer read the spec at start; it waits until no trainer runs.
    _edit(cluster, namespace, "edit", {"checkpointing": {"everySteps": 7}})
    wait_until(lambda: c.Reason.SPEC_DEFERRED in [e["reason"] for e in events(cluster, namespace, "edit")],
               15, "the SpecDeferred event", interval=0.3)
    assert _spec_in_config_map(cluster, namespace, "edit")["checkpointing"]["everySteps"] == 100
    _edit(cluster, namespace, "edit", {"suspend": True})
    wait_phase(cluster, namespace, "edit", c.Phase.SUSPENDED, op=operator)
    wait_until(lambda: _spec_in_config_map(cluster, namespace, "edit")["checkpointing"]["everySteps"] == 7,
               30, "the spec ConfigMap to get the edit once the pods stopped", interval=0.3)
    applied = [e["message"] for e in events(cluster, namespace, "edit") if e["reason"] == c.Reason.SPEC_APPLIED]
    assert any("runPolicy.backoffLimit" in m and "applied to the Job" in m for m in applied), applied
    assert any("checkpointing.everySteps: written to the spec ConfigMap" in m for m in applied), applied
    _edit(cluster, namespace, "edit", {"suspend": False})
    wait_running_pod(cluster, namespace, "edit", exclude={first["metadata"]["uid"]})
    # A finished job's spec is history.
    for pod in pods_of(cluster, namespace, "edit"):
        cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", namespace, "--overwrite",
                        f"{STAGE_HOLD}=false")
    wait_phase(cluster, namespace, "edit", c.Phase.SUCCEEDED, op=operator)
    refused = _edit(cluster, namespace, "edit", {"runPolicy": {"backoffLimit": 1}}, check=False)
    assert refused.returncode != 0 and "finished" in refused.stderr, refused.stderr
