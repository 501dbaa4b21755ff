"""End to end in containers: the chart installs the operator from its image, the fake kubelet's
container mode runs the operator's pod (as the chart's ServiceAccount, with the token the kubelet
projects for it: no admin kubeconfig anywhere) and the trainer pods from the trainer image under
the pod's restrictions (read-only root, uid 10001, only the Job's emptyDirs writable, no API token).

- `kubectl apply` of a FineTuneJob (the quickstart example: tiny model, 30 LoRA steps, MinIO) ->
  preflight pod and trainer pod in containers -> Succeeded, the artifact in MinIO with the sha256
  the status names, progress and metrics scraped from the trainer container while it ran (at
  http://<podIP>:9400/metrics, as on a cluster: all pods share the host's network here, podIP
  127.0.0.1, so the fixed ports must be free on this machine);
- the trainer pod deleted mid-run: its container gets SIGTERM, saves a checkpoint, exits 43; the
  Job's replacement pod resumes from that checkpoint and the job succeeds;
- the trainer pod exactly as the operator builds it, with a probe instead of `finetune train`:
  writes outside the writable paths fail, the Job's emptyDirs are writable, no token is mounted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart.helm import CHART, run_helm
from finetune_api import constants as c
from finetune_api import parse_spec
from finetune_api.constants import OPERATOR_HEALTH_PORT, OPERATOR_METRICS_PORT, TRAINER_METRICS_PORT
from finetune_api.status import TerminationMessage
from finetune_operator import builders
from finetune_trainer import storage
from harness.cluster import STAGE_KWOK_SKIP, TestCluster, wait_until
from harness.images import OPERATOR_IMAGE, TRAINER_IMAGE, podman, require_image
from harness.kubelet import FakeKubelet
from harness.s3_inputs import publish_model_once, s3_bucket
from harness.step_watch import StepWatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from operator_harness import TEST_PREFIX

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "cluster-quickstart.yaml"
BUCKET = "finetune-containers"
SECRET = "s3-credentials"
#: Trainer steps of the deletion run: long enough (~10 s of the tiny model) that the deletion, sent
#: as soon as the trainer's endpoint shows step 2, lands in the middle of training.
LONG_STEPS = 600
#: Steps of the end-to-end run: a few seconds of training, so the operator scrapes it while it runs.
QUICKSTART_STEPS = 300


def repo_and_tag(image: str) -> tuple[str, str]:
    repo, tag = image.rsplit(":", 1)
    return repo, tag


# ---- the operator from its image, installed by the chart ------------------------------------------

@dataclass
class Installation:
    cluster: TestCluster
    namespace: str
    release: str
    kubelet: FakeKubelet
    operator_pod: str

    @property
    def service_account(self) -> str:
        return f"{self.release}-finetune-operator"

    def operator_log(self) -> str:
        path = self.kubelet.logs.get(self.operator_pod)
        return path.read_text(errors="replace") if path else ""

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {n}\n{p.read_text(errors='replace')[-tail:]}" for n, p in self.kubelet.logs.items())


def helm(cluster: TestCluster, *args: str, timeout: float = 180) -> str:
    proc = run_helm([*args, "--kubeconfig", str(cluster.kubeconfig)], timeout=timeout,
                    env={"KUBECONFIG": str(cluster.kubeconfig)})
    return str(proc.stdout)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def installation(cluster: TestCluster, k8s_client: Any, minio_env: dict[str, str],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    require_image(OPERATOR_IMAGE)
    require_image(TRAINER_IMAGE)
    # The operator and the trainer listen on their fixed ports; all pods share the host's network,
    # so these must be free (another test's short-lived container may hold one for a moment).
    ports = (OPERATOR_METRICS_PORT, OPERATOR_HEALTH_PORT, TRAINER_METRICS_PORT)
    try:
        wait_until(lambda: all(port_free(p) for p in ports), 120, f"ports {ports} to be free", interval=1)
    except TimeoutError:
        busy = [p for p in ports if not port_free(p)]
        raise AssertionError(f"ports {busy} are in use on this machine: the operator and trainer containers "
                             f"(host network) listen on them") from None
    namespace = f"containers-e2e-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    wait_until(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", namespace,
                                       check=False).returncode == 0, 30, "the default service account")
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
                   "stringData": dict(minio_env)}, namespace=namespace)
    release = f"ft-{uuid.uuid4().hex[:5]}"
    op_repo, op_tag = repo_and_tag(OPERATOR_IMAGE)
    tr_repo, tr_tag = repo_and_tag(TRAINER_IMAGE)
    values = {
        "image": {"repository": op_repo, "tag": op_tag, "pullPolicy": "Never"},
        "trainer": {"image": {"repository": tr_repo, "tag": tr_tag}},
        "watch": {"namespaces": [namespace]},
        # The kwok label keeps kwok away: the container-mode kubelet runs the operator's pod.
        "podLabels": {STAGE_KWOK_SKIP: "true"},
        # The one test hook: the kwok label reaches the trainer pods. The operator scrapes them as
        # on any cluster, at http://<podIP>:<trainer metrics port>/metrics (podIP 127.0.0.1 here).
        "operator": {"resyncIntervalSeconds": 1, "extraArgs": [f"--propagate-prefix={TEST_PREFIX}"]},
    }
    kubelet = FakeKubelet(k8s_client, namespace, tmp_path_factory.mktemp("container-kubelet"), runtime="podman",
                          extra_env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    kubelet.__enter__()
    installed = False
    try:
        started = time.monotonic()
        helm(cluster, "install", release, str(CHART), "-n", namespace, "--skip-crds",
             *[a for k, v in values.items() for a in ("--set-json", f"{k}={json.dumps(v)}")])
        installed = True

        def operator_ready() -> str | None:
            if kubelet.errors:
                raise AssertionError(f"fake kubelet: {kubelet.errors}")
            pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=operator")["items"]
            ready = [p["metadata"]["name"] for p in pods
                     if any(x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions", []))]
            return ready[0] if ready else None

        try:
            pod = wait_until(operator_ready, 240, "the operator's pod to be Ready (its readinessProbe)", interval=0.5)
        except (AssertionError, TimeoutError) as exc:
            logs = "\n".join(p.read_text(errors="replace")[-4000:] for p in kubelet.logs.values())
            raise AssertionError(f"{exc}\n{logs}") from None
        print(f"operator from its image Ready {time.monotonic() - started:.1f} s after helm install")
        yield Installation(cluster, namespace, release, kubelet, pod)
    finally:
        try:
            if installed:
                # The Deployment's pod is deleted: the kubelet stops the operator container with SIGTERM.
                run_helm(["uninstall", release, "-n", namespace, "--kubeconfig", str(cluster.kubeconfig),
                          "--wait", "--timeout", "60s"], check=False, timeout=120)
                operators = [p for p in kubelet.logs if p.startswith(f"{release}-finetune-operator-")]
                wait_until(lambda: all(kubelet.handled.get(p) is not None for p in operators), 60,
                           "the operator container to stop after helm uninstall")
                assert {kubelet.handled[p] for p in operators} == {0}, "the operator did not stop cleanly on SIGTERM"
                assert all(p in kubelet.terminated_at for p in operators)
        finally:
            kubelet.stop()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found", check=False)
        left = podman("ps", "--all", "--filter", f"name=^fk-{namespace}-", "--format", "{{.Names}}").stdout.split()
        assert not left, f"containers left behind: {left}"


# ---- the job ----------------------------------------------------------------------------------------

def example() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


def finetunejob(name: str, namespace: str, **spec_overrides: Any) -> dict[str, Any]:
    """The quickstart example, its data and output in this test's bucket, plus the kwok label."""
    doc = example()
    spec = doc["spec"]
    spec["model"]["uri"] = f"s3://{BUCKET}/models/tiny-llama"
    spec["dataset"]["train"] = f"s3://{BUCKET}/data/train.jsonl"
    spec["output"]["uri"] = f"s3://{BUCKET}/out/{namespace}/{name}"
    spec["output"]["credentialsSecret"]["name"] = SECRET
    for key, value in spec_overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    doc["metadata"] = {"name": name, "namespace": namespace, "labels": {STAGE_KWOK_SKIP: "true"}}
    return doc


@pytest.fixture(scope="module")
def inputs(minio_env: dict[str, str], tiny_model_dir: Path, toy_data_dir: Path) -> Iterator[None]:
    """The tiny model and the toy data in the bucket; the MinIO credentials in this process's
    environment (storage.resolve reads them) for the module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in minio_env.items():
            mp.setenv(k, v)
        fs = s3_bucket(BUCKET)
        publish_model_once(tiny_model_dir, f"s3://{BUCKET}/models/tiny-llama")
        fs.put_file(str(toy_data_dir / "prompt_completion.jsonl"), f"{BUCKET}/data/train.jsonl")
        yield


def ftj_status(cluster: TestCluster, namespace: str, name: str) -> dict[str, Any]:
    """The FineTuneJob's status (read in-process: polled often, it must be cheap)."""
    code, obj = cluster.api_get(f"/apis/{c.GROUP}/{c.VERSION}/namespaces/{namespace}/{c.PLURAL}/{name}")
    assert code == 200, f"GET FineTuneJob {name}: HTTP {code}: {obj}"
    status: dict[str, Any] = obj.get("status") or {}
    return status


def run_job(inst: Installation, doc: dict[str, Any], timeout: float,
            during: Callable[[dict[str, Any]], None] = lambda s: None) -> dict[str, Any]:
    """kubectl apply the FineTuneJob; wait for a terminal phase, calling `during` with each status seen."""
    name = doc["metadata"]["name"]
    inst.cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def finished() -> dict[str, Any] | None:
        if inst.kubelet.errors:
            raise AssertionError(f"fake kubelet: {inst.kubelet.errors}")
        st = ftj_status(inst.cluster, inst.namespace, name)
        during(st)
        return st if st.get("phase") in c.Phase.TERMINAL else None

    try:
        result: dict[str, Any] = wait_until(finished, timeout, f"FineTuneJob {name} to finish", interval=0.5)
    except (AssertionError, TimeoutError) as exc:
        st = ftj_status(inst.cluster, inst.namespace, name)
        raise AssertionError(f"{exc}\n{json.dumps(st, indent=1)}\n{inst.logs()}") from None
    return result


def pods_by_component(inst: Installation, name: str) -> dict[str, list[str]]:
    """Pod names the kubelet ran for the job, by component (preflight, trainer)."""
    out: dict[str, list[str]] = {}
    for pod in inst.kubelet.logs:
        if pod.startswith(f"{name}-"):
            out.setdefault("preflight" if pod.startswith(f"{name}-preflight-") else "trainer", []).append(pod)
    return out


def test_finetunejob_end_to_end_with_operator_and_trainer_in_containers(
    installation: Installation, inputs: None, minio_env: dict[str, str], tmp_path: Path
) -> None:
    inst, cluster, ns = installation, installation.cluster, installation.namespace
    # The example's 30 steps take well under a second in the trainer: too short to be seen running.
    doc = finetunejob("quickstart", ns, hyperparameters={"maxSteps": QUICKSTART_STEPS},
                      checkpointing={"everySteps": QUICKSTART_STEPS // 3})
    seen_running: list[dict[str, Any]] = []

    def during(st: dict[str, Any]) -> None:
        if st.get("phase") == c.Phase.RUNNING and (st.get("progress") or {}).get("step", 0) > 0:
            seen_running.append(st)

    started = time.monotonic()
    status = run_job(inst, doc, timeout=900, during=during)
    print(f"FineTuneJob in containers: {status.get('phase')} after {time.monotonic() - started:.1f} s")
    assert status["phase"] == c.Phase.SUCCEEDED, f"{json.dumps(status, indent=1)}\n{inst.logs()}"

    # The preflight and the trainer ran as containers of the trainer image, both exit 0.
    pods = pods_by_component(inst, "quickstart")
    assert len(pods.get("preflight", [])) == 1 and len(pods.get("trainer", [])) == 1, pods
    assert {inst.kubelet.handled[p] for ps in pods.values() for p in ps} == {0}
    trainer_pod = pods["trainer"][0]
    spec = cluster.get_json("pod", trainer_pod, "-n", ns)["spec"]
    assert spec["containers"][0]["image"] == TRAINER_IMAGE
    assert spec["automountServiceAccountToken"] is False
    assert not [v for v in spec["volumes"] if v["name"].startswith("kube-api-access-")]
    assert inst.kubelet.containers[trainer_pod].startswith(f"fk-{ns}-{trainer_pod}-")

    # Progress and metrics while Running came from the trainer container's endpoint.
    assert seen_running, "the operator never showed progress from the trainer container while it ran"
    running = seen_running[-1]
    assert running["progress"]["totalSteps"] == doc["spec"]["hyperparameters"]["maxSteps"]
    assert {"loss", "tokensPerSecond"} <= set(running.get("metrics") or {}), running

    # The artifact in MinIO, with the sha256 of its manifest.
    out = doc["spec"]["output"]["uri"]
    artifact = status["artifact"]
    assert artifact["uri"] == out
    fs, root = storage.resolve(out)
    manifest_bytes = fs.cat_file(f"{root}/manifest.json")
    assert artifact["sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert artifact["sizeBytes"] == storage.verify(out).size_bytes
    assert [s for s, _ in storage.list_complete_checkpoints(f"{out}/{c.CHECKPOINTS_DIR}")] == [
        2 * QUICKSTART_STEPS // 3, QUICKSTART_STEPS]
    assert status["dataCheck"]["rows"] > 0
    assert (status.get("metrics") or {}).get("loss") is not None

    # The operator did all this as the chart's ServiceAccount: its only credential is the token the
    # kubelet projected for its pod, and the API server says whose it is.
    op_spec = cluster.get_json("pod", inst.operator_pod, "-n", ns)["spec"]
    assert op_spec["serviceAccountName"] == inst.service_account
    assert "KUBECONFIG" not in {e["name"] for e in op_spec["containers"][0].get("env", [])}
    (token_file,) = inst.kubelet.logs[inst.operator_pod].parent.glob("volumes/kube-api-access-*/token")
    assert whoami(cluster, token_file.read_text()) == f"system:serviceaccount:{ns}:{inst.service_account}"
    assert not re.search(r"forbidden|Not enough permissions", inst.operator_log(), re.IGNORECASE), \
        inst.operator_log()[-4000:]
    # The chart's probes held all along: Ready, never restarted (its livenessProbe polls /healthz).
    op_status = cluster.get_json("pod", inst.operator_pod, "-n", ns)["status"]
    assert op_status["containerStatuses"][0]["restartCount"] == 0 and op_status["containerStatuses"][0]["ready"]
    assert inst.operator_pod not in inst.kubelet.liveness_kills
    # Credentials: nowhere in the containers' logs or the pods.
    seen = inst.logs(tail=10**7) + cluster.kubectl("get", "pods,jobs,configmaps", "-n", ns, "-o", "json").stdout
    assert minio_env["AWS_SECRET_ACCESS_KEY"] not in seen


def whoami(cluster: TestCluster, token: str) -> str | None:
    import ssl
    import urllib.error

    ca = cluster.get_json("configmap", "kube-root-ca.crt", "-n", "default")["data"]["ca.crt"]
    req = urllib.request.Request(
        f"{cluster.server}/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=ssl.create_default_context(cadata=ca), timeout=10) as resp:
            return str(json.load(resp)["status"]["userInfo"]["username"])
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            return None
        raise


def test_trainer_container_deleted_mid_run_checkpoints_on_sigterm_and_the_job_resumes(
    installation: Installation, inputs: None, minio_env: dict[str, str]
) -> None:
    inst, cluster, ns = installation, installation.cluster, installation.namespace
    # No periodic checkpoint before the end: the one the job resumes from is the SIGTERM one. No
    # preflight (the first test ran one in a container).
    doc = finetunejob("deleted", ns, hyperparameters={"maxSteps": LONG_STEPS},
                      checkpointing={"everySteps": LONG_STEPS}, preflight={"enabled": False})
    out = doc["spec"]["output"]["uri"]
    watch = StepWatch(f"http://127.0.0.1:{TRAINER_METRICS_PORT}/metrics")
    started = time.monotonic()
    inst.cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    try:
        wait_until(lambda: watch.max_step >= 2 or _raise(inst), 600, "the trainer container to train 2 steps",
                   interval=0.05)
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{inst.logs()}") from None
    (pod1,) = pods_by_component(inst, "deleted")["trainer"]
    cluster.kubectl("delete", "pod", pod1, "-n", ns, "--wait=false")
    wait_until(lambda: inst.kubelet.handled.get(pod1) is not None or _raise(inst), 120,
               "the deleted trainer container to end")
    last_step = watch.stop()
    log1 = inst.kubelet.logs[pod1].read_text(errors="replace")
    assert inst.kubelet.handled[pod1] == c.ExitCode.PREEMPTED, log1[-3000:]
    assert pod1 in inst.kubelet.terminated_at, "the trainer stopped, but not because the kubelet sent SIGTERM"
    m = re.search(r"SIGTERM received: saving a checkpoint at step (\d+)", log1)
    assert m, log1[-3000:]
    sigterm_step = int(m.group(1))
    assert 2 <= sigterm_step < LONG_STEPS, "the deletion must come in the middle of training"
    steps = storage.list_complete_checkpoints(f"{out}/{c.CHECKPOINTS_DIR}")
    assert [s for s, _ in steps] == [sigterm_step]
    (message_file,) = inst.kubelet.logs[pod1].parent.glob("run-0/termination-log")
    message = TerminationMessage.model_validate_json(message_file.read_bytes())
    assert message.last_checkpoint is not None and message.last_checkpoint.step == sigterm_step
    assert last_step <= sigterm_step, f"steps after the checkpoint were lost ({last_step} > {sigterm_step})"

    status = run_job(inst, doc, timeout=600)
    print(f"deleted mid-run at step {sigterm_step}, resumed, {status.get('phase')} "
          f"after {time.monotonic() - started:.1f} s")
    assert status["phase"] == c.Phase.SUCCEEDED, f"{json.dumps(status, indent=1)}\n{inst.logs()}"
    trainers = pods_by_component(inst, "deleted")["trainer"]
    (pod2,) = [p for p in trainers if p != pod1]
    log2 = inst.kubelet.logs[pod2].read_text(errors="replace")
    assert inst.kubelet.handled[pod2] == 0, log2[-3000:]
    assert f"resuming from checkpoint step {sigterm_step} " in log2, log2[-3000:]
    # Exit 43 matched the Job's podFailurePolicy Ignore rule: nothing counted against backoffLimit.
    assert cluster.get_json("job", "deleted", "-n", ns)["status"].get("failed", 0) == 0
    assert status["artifact"]["uri"] == out


def _raise(inst: Installation) -> bool:
    if inst.kubelet.errors:
        raise AssertionError(f"fake kubelet: {inst.kubelet.errors}")
    return False


# ---- the trainer pod as the operator builds it ---------------------------------------------------

WRITE_PROBE = r"""
import errno, json, os, sys
def write(path):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("x")
        return 0
    except OSError as exc:
        return exc.errno
paths = json.loads(sys.argv[1])
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
report = {"writes": {p: write(p) for p in paths}, "uid": os.getuid(), "gid": os.getgid(),
          "token": os.path.exists(sa) or any(k.startswith("KUBECONFIG") for k in os.environ),
          "home": os.environ.get("HOME")}
open("/dev/termination-log", "w").write(json.dumps(report))
"""

#: Paths the probe writes, and whether the trainer pod lets it (the Job's emptyDirs only).
WRITES = {
    "/probe": False, "/opt/venv/probe": False, "/etc/probe": False, "/home/finetune/probe": False,
    "/var/tmp/probe": False, "/run/probe": False, f"{c.SPEC_MOUNT_DIR}/probe": False,
    f"{c.SCRATCH_DIR}/probe": True, f"{c.SCRATCH_DIR}/home/.cache/probe": True, "/tmp/probe": True,
    "/dev/shm/probe": True,
}


def test_trainer_container_under_the_pods_restrictions(
    cluster: TestCluster, namespace: str, k8s_client: Any, minio_env: dict[str, str], tmp_path: Path
) -> None:
    """The trainer's pod exactly as the operator builds it (securityContext, volumes, env, no token),
    with a probe in place of `finetune train`: the read-only root really is read-only, only the Job's
    emptyDirs are writable, uid 10001, and no API credentials are in the container."""
    require_image(TRAINER_IMAGE)
    doc = finetunejob("restricted", namespace)
    owner = builders.Owner(name="restricted", namespace=namespace, uid=str(uuid.uuid4()))
    children = builders.build_children(owner, parse_spec(doc["spec"]), builders.BuildOptions(trainer_image=TRAINER_IMAGE))
    job = children.job
    for obj in (children.config_map, job):
        obj["metadata"].pop("ownerReferences")  # no FineTuneJob owns them here (the GC would delete them)
    template = job["spec"]["template"]
    template["metadata"]["labels"][STAGE_KWOK_SKIP] = "true"
    container = template["spec"]["containers"][0]
    assert container["command"] == list(builders.TRAINER_COMMAND)
    container["command"] = ["python", "-c", WRITE_PROBE, json.dumps(list(WRITES))]
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
                   "stringData": dict(minio_env)}, namespace=namespace)
    cluster.apply([children.config_map, job], namespace=namespace)
    with FakeKubelet(k8s_client, namespace, tmp_path, runtime="podman") as kubelet:
        done = kubelet.wait_for(pod_count=1, timeout=180)
    (pod,) = done
    log = kubelet.logs[pod].read_text(errors="replace")
    assert done[pod] == 0, log[-3000:]
    state = cluster.get_json("pod", pod, "-n", namespace)["status"]["containerStatuses"][0]["state"]["terminated"]
    report = json.loads(state["message"])
    writes = {p: e == 0 for p, e in report["writes"].items()}
    assert writes == WRITES, report["writes"]
    # The refused ones are refused by the read-only filesystems, not by file permissions.
    assert {errno.errorcode[e] for e in report["writes"].values() if e} == {"EROFS"}, report["writes"]
    assert (report["uid"], report["gid"]) == (c.TRAINER_USER_ID, c.TRAINER_USER_ID)
    assert report["token"] is False
    assert report["home"] == f"{c.SCRATCH_DIR}/home"
