"""The fake kubelet runs a Job's pod as a local process and reports it like a kubelet does."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from harness.cluster import STAGE_KWOK_SKIP, gpu_job_manifest, wait_until
from harness.kubelet import FakeKubelet

pytestmark = pytest.mark.cluster

SCRIPT = """
import json, os, sys
spec = open(os.environ["FINETUNE_SPEC_PATH"]).read()
msg = {"spec": json.loads(spec), "index": os.environ.get("INDEX"), "token": os.environ["TOKEN"]}
open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write(json.dumps(msg))
print("hello from the pod")
sys.exit(int(os.environ["CODE"]))
"""


def job(name: str, code: int) -> dict[str, Any]:
    manifest = gpu_job_manifest(name, labels={STAGE_KWOK_SKIP: "true"})
    pod = manifest["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "spec", "configMap": {"name": "spec-cm"}}]
    pod["containers"][0].update(
        {
            "command": [Path(sys.executable).name, "-c", SCRIPT],
            "env": [
                {"name": "FINETUNE_SPEC_PATH", "value": "/etc/finetune/spec.json"},
                {"name": "CODE", "value": str(code)},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "INDEX", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            ],
            "volumeMounts": [{"name": "spec", "mountPath": "/etc/finetune", "readOnly": True}],
        }
    )
    return manifest


@pytest.mark.parametrize("code", [0, 42])
def test_fake_kubelet_runs_the_pod_and_reports_its_exit(
    cluster: Any, namespace: str, k8s_client: Any, tmp_path: Path, code: int
) -> None:
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "spec-cm"},
                "data": {"spec.json": json.dumps({"model": {"uri": "./m"}})},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "creds"},
                "stringData": {"token": "t0k3n"},
            },
        ],
        namespace=namespace,
    )
    with FakeKubelet(k8s_client, namespace, tmp_path, path=[str(Path(sys.executable).parent)]) as kubelet:
        cluster.apply(job("runs", code), namespace=namespace)
        done = kubelet.wait_for(pod_count=1, timeout=180)
    assert list(done.values()) == [code]
    (pod_name,) = done
    assert "hello from the pod" in kubelet.logs[pod_name].read_text()
    pod = cluster.get_json("pod", pod_name, "-n", namespace)
    assert pod["status"]["phase"] == ("Succeeded" if code == 0 else "Failed")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == code
    assert json.loads(terminated["message"]) == {
        "spec": {"model": {"uri": "./m"}},
        "index": namespace,
        "token": "t0k3n",
    }
    condition = "Complete" if code == 0 else "Failed"
    wait_until(
        lambda: any(
            c["type"] == condition and c["status"] == "True"
            for c in cluster.get_json("job", "runs", "-n", namespace)["status"].get("conditions", [])
        ),
        60,
        f"the Job's {condition} condition",
    )


TERM_SCRIPT = """
import os, signal, sys, time
def on_term(signum, frame):
    open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write("got SIGTERM")
    if os.environ["ON_TERM"] == "exit":
        sys.exit(43)
signal.signal(signal.SIGTERM, on_term)
print("running", flush=True)
while True:
    time.sleep(0.1)
"""


@pytest.mark.parametrize(("on_term", "code"), [("exit", 43), ("ignore", 137)])
def test_fake_kubelet_stops_a_deleted_pod_like_a_kubelet(
    cluster: Any, namespace: str, k8s_client: Any, tmp_path: Path, on_term: str, code: int
) -> None:
    """Deleting a running pod: SIGTERM; SIGKILL after the grace period if still running; then the
    terminal status (exit code, termination message) and the pod object removed."""
    import threading
    import time

    manifest = gpu_job_manifest("term", labels={STAGE_KWOK_SKIP: "true"})
    pod_spec = manifest["spec"]["template"]["spec"]
    grace = 3 if code == 137 else 30
    pod_spec["terminationGracePeriodSeconds"] = grace
    pod_spec["containers"][0].update({
        "command": [Path(sys.executable).name, "-c", TERM_SCRIPT],
        "env": [{"name": "ON_TERM", "value": on_term}],
    })
    with FakeKubelet(k8s_client, namespace, tmp_path, path=[str(Path(sys.executable).parent)]) as kubelet:
        cluster.apply(manifest, namespace=namespace)
        (pod_name,) = wait_until(lambda: [n for n, p in kubelet.logs.items()
                                          if "running" in p.read_text()], 120, "the pod's process to run")
        # The kubelet reports the terminal status, then removes the pod: a watch sees every version.
        from kubernetes import client, watch

        seen: dict[str, Any] = {}
        stream = watch.Watch()

        def poll() -> None:
            for event in stream.stream(client.CoreV1Api(k8s_client).list_namespaced_pod, namespace,
                                       field_selector=f"metadata.name={pod_name}", timeout_seconds=90):
                pod = event["object"]
                for cs in pod.status.container_statuses or []:
                    if cs.state and cs.state.terminated and not seen:
                        t = cs.state.terminated
                        seen.update(phase=pod.status.phase, exitCode=t.exit_code, message=t.message)
                if event["type"] == "DELETED":
                    return

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        start = time.monotonic()
        cluster.kubectl("delete", "pod", pod_name, "-n", namespace, "--wait=false")
        done = kubelet.wait_for(pod_count=1, timeout=60)
        elapsed = time.monotonic() - start
        assert done == {pod_name: code}
        if code == 137:
            assert elapsed >= grace, f"SIGKILL before the {grace} s grace period ({elapsed:.1f} s)"
        else:
            assert elapsed < grace, f"a process that exits on SIGTERM was not let go before SIGKILL ({elapsed:.1f} s)"
        wait_until(lambda: not cluster.kubectl("get", "pod", pod_name, "-n", namespace, "--ignore-not-found",
                                               "-o", "name").stdout.strip(), 30, "the pod object to be removed")
        watcher.join(30)
        stream.stop()
        assert (seen.get("phase"), seen.get("exitCode"), seen.get("message")) == ("Failed", code, "got SIGTERM"), seen
