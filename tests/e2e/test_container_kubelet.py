"""The fake kubelet's container mode: a pod's container runs from its image under podman with what
the pod spec says (command/args, env, volumes, user, read-only root, capabilities, no privilege
escalation, the service-account token only where the spec mounts one), and is reported and
stopped as a kubelet does. The operator image serves as a plain Python image here.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness.cluster import STAGE_KWOK_SKIP, TestCluster, free_port, wait_until
from harness.images import OPERATOR_IMAGE, require_image
from harness.kubelet import FakeKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: What the probe reports (as its termination message, at most 4 KiB) about the container it runs in.
PROBE = r"""
import errno, json, os, socket, sys

def write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return line.split()[1]

def fstype(path):
    types = {m.split()[1]: m.split()[2] for m in open("/proc/mounts")}
    return types.get(path)

def read(path):
    try:
        return open(path).read()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

api = socket.create_connection((os.environ["KUBERNETES_SERVICE_HOST"], int(os.environ["KUBERNETES_SERVICE_PORT"])), 5)
api.close()
report = {
    "argv": sys.argv[1:],
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "env": {k: os.environ.get(k) for k in ("PLAIN", "FROM_SECRET", "FROM_CM", "POD_NAME", "POD_NS")},
    "host_env": "FAKE_KUBELET_HOST_ONLY" in os.environ,
    "cm": read("/etc/cfg/greeting"), "cm_write": write("/etc/cfg/new"),
    "secret": read("/etc/sec/key"), "secret_mode": oct(os.stat("/etc/sec/key").st_mode & 0o777),
    "empty_dir": write("/work/out"), "empty_dir_type": fstype("/work") != "tmpfs",
    "shm": write("/dev/shm/out"), "shm_type": fstype("/dev/shm"),
    "root": write("/opt/probe"), "etc": write("/etc/probe"), "tmp": write("/tmp/probe"),
    "cap_eff": status("CapEff"), "no_new_privs": status("NoNewPrivs"),
    "token_dir": os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount"),
}
open("/dev/termination-log", "w").write(json.dumps(report))
print("probe done", flush=True)
sys.exit(int(os.environ["CODE"]))
"""


def probe_pod(name: str, code: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {STAGE_KWOK_SKIP: "true"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 2345, "runAsGroup": 3456, "fsGroup": 4567},
            "containers": [{
                "name": "probe",
                "image": OPERATOR_IMAGE,
                "command": ["python", "-c", PROBE],
                "args": ["$(PLAIN)", "$$(PLAIN)", "$(UNDEFINED)"],
                "env": [
                    {"name": "PLAIN", "value": "plain value"},
                    {"name": "CODE", "value": str(code)},
                    {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "probe-secret", "key": "password"}}},
                    {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "probe-cm", "key": "greeting"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                ],
                "volumeMounts": [
                    {"name": "cfg", "mountPath": "/etc/cfg"},
                    {"name": "sec", "mountPath": "/etc/sec", "readOnly": True},
                    {"name": "work", "mountPath": "/work"},
                    {"name": "shm", "mountPath": "/dev/shm"},
                ],
                "securityContext": {
                    "runAsUser": 10001,  # the container's wins over the pod's
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "probe-cm"}},
                {"name": "sec", "secret": {"secretName": "probe-secret", "defaultMode": 0o440}},
                {"name": "work", "emptyDir": {}},
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Mi"}},
            ],
        },
    }


def terminated(cluster: TestCluster, namespace: str, pod: str) -> dict[str, Any]:
    obj = cluster.get_json("pod", pod, "-n", namespace)
    state: dict[str, Any] = obj["status"]["containerStatuses"][0]["state"]["terminated"]
    return {"phase": obj["status"]["phase"], **state}


def test_container_runs_with_the_pods_env_volumes_user_and_restrictions(
    cluster: TestCluster, namespace: str, k8s_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_image(OPERATOR_IMAGE)
    monkeypatch.setenv("FAKE_KUBELET_HOST_ONLY", "1")  # the test's own environment stays out of the pod
    cluster.apply([
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe-cm"}, "data": {"greeting": "hello"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "probe-secret"},
         "stringData": {"password": "s3cr3t", "key": "k3y"}},
    ], namespace=namespace)
    started = time.monotonic()
    with FakeKubelet(k8s_client, namespace, tmp_path, runtime="podman") as kubelet:
        cluster.apply(probe_pod("probe", 3), namespace=namespace)
        done = kubelet.wait_for(pod_count=1, timeout=180)
    print(f"container pod ran in {time.monotonic() - started:.1f} s")
    assert done == {"probe": 3}, kubelet.logs["probe"].read_text()
    assert "probe done" in kubelet.logs["probe"].read_text()
    state = terminated(cluster, namespace, "probe")
    assert (state["phase"], state["exitCode"], state["reason"]) == ("Failed", 3, "Error")
    report = json.loads(state["message"])
    # command replaces the entrypoint, args follow it, $(VAR) expanded as Kubernetes does.
    assert report["argv"] == ["plain value", "$(PLAIN)", "$(UNDEFINED)"]
    assert report["env"] == {"PLAIN": "plain value", "FROM_SECRET": "s3cr3t", "FROM_CM": "hello",
                             "POD_NAME": "probe", "POD_NS": namespace}
    assert report["host_env"] is False
    # The container's runAsUser, the pod's runAsGroup, fsGroup as a supplementary group.
    assert (report["uid"], report["gid"]) == (10001, 3456)
    assert 4567 in report["groups"]
    # Volumes: ConfigMap and Secret read-only (the Secret's 0440 readable through fsGroup), emptyDir
    # writable, medium Memory a tmpfs.
    assert (report["cm"], report["cm_write"]) == ("hello", "EROFS")
    assert (report["secret"], report["secret_mode"]) == ("k3y", "0o440")
    assert (report["empty_dir"], report["empty_dir_type"]) == ("ok", True)
    assert (report["shm"], report["shm_type"]) == ("ok", "tmpfs")
    # The root filesystem is read-only, with nothing writable slipped in (no tmpfs at /tmp).
    assert (report["root"], report["etc"], report["tmp"]) == ("EROFS", "EROFS", "EROFS")
    # No capabilities, no privilege escalation, no API token (automountServiceAccountToken: false).
    assert report["cap_eff"] == "0000000000000000"
    assert report["no_new_privs"] == "1"
    assert report["token_dir"] is False
    # The container is gone once the pod has ended.
    assert kubelet.containers["probe"].startswith(f"fk-{namespace}-probe-")


TOKEN_PROBE = r"""
import json, os, ssl, urllib.request
d = "/var/run/secrets/kubernetes.io/serviceaccount"
ns = open(d + "/namespace").read()
ctx = ssl.create_default_context(cafile=d + "/ca.crt")
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
req = urllib.request.Request(
    f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
    data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
    headers={"Authorization": "Bearer " + open(d + "/token").read(), "Content-Type": "application/json"})
user = json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["status"]["userInfo"]["username"]
open("/dev/termination-log", "w").write(json.dumps({"namespace": ns, "user": user}))
print("token works", flush=True)
import time
while True:
    time.sleep(1)
"""


def test_a_pod_that_mounts_a_token_gets_its_service_accounts_bound_token(
    cluster: TestCluster, namespace: str, k8s_client: Any, tmp_path: Path
) -> None:
    """automountServiceAccountToken left on: the ServiceAccount admission puts the kube-api-access
    projected volume into the pod; the kubelet fills it from the TokenRequest API (bound to the pod),
    and the container authenticates as the ServiceAccount over verified TLS on loopback."""
    require_image(OPERATOR_IMAGE)
    cluster.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}}, namespace=namespace)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "token", "labels": {STAGE_KWOK_SKIP: "true"}},
        "spec": {"serviceAccountName": "reader", "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": OPERATOR_IMAGE, "command": ["python", "-c", TOKEN_PROBE],
                                 "securityContext": {"runAsUser": 10001, "readOnlyRootFilesystem": True}}]},
    }
    with FakeKubelet(k8s_client, namespace, tmp_path, runtime="podman") as kubelet:
        cluster.apply(pod, namespace=namespace)
        wait_until(lambda: "token works" in kubelet.logs["token"].read_text() if "token" in kubelet.logs else False,
                   120, "the container to use its token", interval=0.5)
        volumes = cluster.get_json("pod", "token", "-n", namespace)["spec"]["volumes"]
        (api_access,) = [v for v in volumes if v["name"].startswith("kube-api-access-")]
        token_file = next(tmp_path.glob(f"token/volumes/{api_access['name']}/token"))
        token = token_file.read_text()
        assert _whoami(cluster, token) == f"system:serviceaccount:{namespace}:reader"
        cluster.kubectl("delete", "pod", "token", "-n", namespace, "--wait=false")
        done = kubelet.wait_for(pod_count=1, timeout=60)
    assert done == {"token": 137}  # it ignores SIGTERM: killed after the 1 s grace period
    # The termination message of a killed container is still what it wrote.
    with open(kubelet.logs["token"].parent / "run-0" / "termination-log") as f:
        assert json.load(f) == {"namespace": namespace, "user": f"system:serviceaccount:{namespace}:reader"}
    # Bound to the pod: once the pod is gone, the token is refused.
    wait_until(lambda: _whoami(cluster, token) is None, 30, "the pod-bound token to be refused")


def _whoami(cluster: TestCluster, token: str) -> str | None:
    ca = cluster.get_json("configmap", "kube-root-ca.crt", "-n", "default")["data"]["ca.crt"]
    ctx = ssl.create_default_context(cadata=ca)
    req = urllib.request.Request(
        f"{cluster.server}/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return str(json.load(resp)["status"]["userInfo"]["username"])
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            return None
        raise


TERM_SCRIPT = r"""
import os, signal, sys, time
def on_term(signum, frame):
    open("/dev/termination-log", "w").write("got SIGTERM as pid %d" % os.getpid())
    if os.environ["ON_TERM"] == "exit":
        sys.exit(43)
signal.signal(signal.SIGTERM, on_term)
print("running", flush=True)
while True:
    time.sleep(0.1)
"""


@pytest.mark.parametrize(("on_term", "code"), [("exit", 43), ("ignore", 137)])
def test_deleting_the_pod_sends_sigterm_to_the_container_then_sigkill(
    cluster: TestCluster, namespace: str, k8s_client: Any, tmp_path: Path, on_term: str, code: int
) -> None:
    require_image(OPERATOR_IMAGE)
    grace = 3 if code == 137 else 30
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "term", "labels": {STAGE_KWOK_SKIP: "true"}},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                 "terminationGracePeriodSeconds": grace,
                 "containers": [{"name": "c", "image": OPERATOR_IMAGE, "command": ["python", "-c", TERM_SCRIPT],
                                 "env": [{"name": "ON_TERM", "value": on_term}]}]},
    }
    with FakeKubelet(k8s_client, namespace, tmp_path, runtime="podman") as kubelet:
        cluster.apply(pod, namespace=namespace)
        wait_until(lambda: "term" in kubelet.logs and "running" in kubelet.logs["term"].read_text(), 120,
                   "the container to run", interval=0.3)
        from kubernetes import client, watch

        seen: dict[str, Any] = {}
        stream = watch.Watch()

        def poll() -> None:
            for event in stream.stream(client.CoreV1Api(k8s_client).list_namespaced_pod, namespace,
                                       field_selector="metadata.name=term", timeout_seconds=90):
                obj = event["object"]
                for cs in obj.status.container_statuses or []:
                    if cs.state and cs.state.terminated and not seen:
                        t = cs.state.terminated
                        seen.update(phase=obj.status.phase, exitCode=t.exit_code, message=t.message)
                if event["type"] == "DELETED":
                    return

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        start = time.monotonic()
        cluster.kubectl("delete", "pod", "term", "-n", namespace, "--wait=false")
        done = kubelet.wait_for(pod_count=1, timeout=60)
        elapsed = time.monotonic() - start
        assert done == {"term": code}
        if code == 137:
            assert elapsed >= grace, f"SIGKILL before the {grace} s grace period ({elapsed:.1f} s)"
        else:
            assert elapsed < grace, f"a container that exits on SIGTERM was not let go before SIGKILL ({elapsed:.1f} s)"
        wait_until(lambda: not cluster.kubectl("get", "pod", "term", "-n", namespace, "--ignore-not-found",
                                               "-o", "name").stdout.strip(), 30, "the pod object to be removed")
        watcher.join(30)
        stream.stop()
    # The signal reached the container's own PID 1 (no init in between, as in a pod).
    assert (seen.get("phase"), seen.get("exitCode"), seen.get("message")) == ("Failed", code, "got SIGTERM as pid 1")
    from harness.images import podman

    assert not podman("ps", "-a", "--filter", f"name={kubelet.containers['term']}", "-q").stdout.strip()


def test_a_container_that_cannot_start_is_reported_as_a_kubelet_does(
    cluster: TestCluster, namespace: str, k8s_client: Any, tmp_path: Path
) -> None:
    """A command the image does not have: StartError, exit code 128, the runtime's message; a pod
    whose image is not built: waiting ErrImageNeverPull (nothing is ever pulled)."""
    require_image(OPERATOR_IMAGE)
    missing = "localhost/finetune-no-such-image:dev"
    pods = [{
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {STAGE_KWOK_SKIP: "true"}},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                 "containers": [{"name": "c", "image": image, "command": ["/no/such/executable"]}]},
    } for name, image in (("nocommand", OPERATOR_IMAGE), ("noimage", missing))]
    with FakeKubelet(k8s_client, namespace, tmp_path, runtime="podman") as kubelet:
        cluster.apply(pods, namespace=namespace)
        wait_until(lambda: kubelet.handled.get("nocommand") is not None and kubelet.errors, 120,
                   "both pods to be handled", interval=0.3)
        waiting = cluster.get_json("pod", "noimage", "-n", namespace)["status"]["containerStatuses"][0]["state"]
        assert waiting["waiting"]["reason"] == "ErrImageNeverPull" and missing in waiting["waiting"]["message"]
        # Deleting a pod whose container never ran removes it at once.
        cluster.kubectl("delete", "pod", "noimage", "-n", namespace, "--wait=false")
        wait_until(lambda: not cluster.kubectl("get", "pod", "noimage", "-n", namespace, "--ignore-not-found",
                                               "-o", "name").stdout.strip(), 30, "the pod object to be removed")
    state = terminated(cluster, namespace, "nocommand")
    assert (state["phase"], state["exitCode"], state["reason"]) == ("Failed", 128, "StartError")
    assert "/no/such/executable" in state["message"], state["message"]
    (error,) = kubelet.errors
    assert error.startswith("noimage: ") and missing in error


RESTART_SCRIPT = r"""
import os, sys
marker = "/data/first-run-was-here"
if not os.path.exists(marker):
    open(marker, "w").write("x")
    print("first run fails", flush=True)
    sys.exit(1)
print("second run finds the emptyDir as the first left it", flush=True)
"""


def test_restart_policy_on_failure_restarts_the_container_and_keeps_its_empty_dir(
    cluster: TestCluster, namespace: str, k8s_client: Any, tmp_path: Path
) -> None:
    require_image(OPERATOR_IMAGE)
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "again", "labels": {STAGE_KWOK_SKIP: "true"}},
        "spec": {"restartPolicy": "OnFailure", "automountServiceAccountToken": False,
                 "securityContext": {"runAsUser": 10001},
                 "containers": [{"name": "c", "image": OPERATOR_IMAGE, "command": ["python", "-c", RESTART_SCRIPT],
                                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                 "volumes": [{"name": "data", "emptyDir": {}}]},
    }
    with FakeKubelet(k8s_client, namespace, tmp_path, runtime="podman") as kubelet:
        cluster.apply(pod, namespace=namespace)
        done = kubelet.wait_for(pod_count=1, timeout=120)
    assert done == {"again": 0}
    log = kubelet.logs["again"].read_text()
    assert "first run fails" in log and "second run finds the emptyDir" in log, log
    status = cluster.get_json("pod", "again", "-n", namespace)["status"]
    (cs,) = status["containerStatuses"]
    assert status["phase"] == "Succeeded"
    assert cs["restartCount"] == 1 and cs["lastState"]["terminated"]["exitCode"] == 1, cs


def test_memory_limit_is_enforced(
    cluster: TestCluster, namespace: str, k8s_client: Any, tmp_path: Path
) -> None:
    """A container past its memory limit is killed (137). (podman on these cgroup-v1 hosts does not
    flag OOMKilled, so the reason is whatever the runtime says.)"""
    require_image(OPERATOR_IMAGE)
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hungry", "labels": {STAGE_KWOK_SKIP: "true"}},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                 "containers": [{"name": "c", "image": OPERATOR_IMAGE,
                                 "command": ["python", "-c", "x = bytearray(256 * 2**20); print('survived')"],
                                 "resources": {"limits": {"memory": "64Mi"}}}]},
    }
    with FakeKubelet(k8s_client, namespace, tmp_path, runtime="podman") as kubelet:
        cluster.apply(pod, namespace=namespace)
        done = kubelet.wait_for(pod_count=1, timeout=120)
    assert done == {"hungry": 137}, kubelet.logs["hungry"].read_text()
    state = terminated(cluster, namespace, "hungry")
    assert (state["phase"], state["exitCode"]) == ("Failed", 137)
    assert "survived" not in kubelet.logs["hungry"].read_text()


PROBED_SERVER = r"""
import functools, http.server, os, sys
first = not os.path.exists("/data/ran")
open("/data/ran", "w").close()
open("/srv/ready", "w").write("ok")
if first:
    print("first run: not alive", flush=True)
else:
    open("/srv/alive", "w").write("ok")
    print("second run: alive", flush=True)
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory="/srv")
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""


def test_probes_decide_ready_and_a_failing_liveness_probe_restarts_the_container(
    cluster: TestCluster, namespace: str, k8s_client: Any, tmp_path: Path
) -> None:
    require_image(OPERATOR_IMAGE)
    port = free_port()
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probed", "labels": {STAGE_KWOK_SKIP: "true"}},
        "spec": {"restartPolicy": "Always", "automountServiceAccountToken": False,
                 "terminationGracePeriodSeconds": 2, "securityContext": {"runAsUser": 10001},
                 "containers": [{
                     "name": "c", "image": OPERATOR_IMAGE, "command": ["python", "-c", PROBED_SERVER, str(port)],
                     "ports": [{"name": "http", "containerPort": port}],
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1},
                     "livenessProbe": {"httpGet": {"path": "/alive", "port": port}, "periodSeconds": 1,
                                       "initialDelaySeconds": 1, "failureThreshold": 2},
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "srv", "mountPath": "/srv"}],
                 }],
                 "volumes": [{"name": "data", "emptyDir": {}}, {"name": "srv", "emptyDir": {}}]},
    }

    def ready_after_restart() -> dict[str, Any] | None:
        status: dict[str, Any] = cluster.get_json("pod", "probed", "-n", namespace)["status"]
        (cs,) = status.get("containerStatuses") or [{}]
        ready = any(x["type"] == "Ready" and x["status"] == "True" for x in status.get("conditions", []))
        return status if ready and cs.get("restartCount") == 1 else None

    with FakeKubelet(k8s_client, namespace, tmp_path, runtime="podman") as kubelet:
        cluster.apply(pod, namespace=namespace)
        try:
            status = wait_until(ready_after_restart, 90, "the restarted container to be Ready", interval=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{kubelet.logs['probed'].read_text()}") from None
        (cs,) = status["containerStatuses"]
        # The first run served /ready but not /alive: killed (it ignores SIGTERM as PID 1: SIGKILL).
        assert cs["lastState"]["terminated"]["exitCode"] == 137, cs
        assert status["phase"] == "Running" and cs["ready"] is True and "running" in cs["state"]
        assert kubelet.liveness_kills == {"probed": 1}
        time.sleep(3)  # alive now: no further kill
        assert kubelet.liveness_kills == {"probed": 1}
        cluster.kubectl("delete", "pod", "probed", "-n", namespace, "--wait=false")
        assert kubelet.wait_for(pod_count=1, timeout=60) == {"probed": 137}
    log = kubelet.logs["probed"].read_text()
    assert "first run: not alive" in log and "second run: alive" in log, log
