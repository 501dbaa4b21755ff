"""The chart installs the image it ships: its operator container starts from the built image.

`helm template` renders the chart; the operator Deployment's container (command, args, env, ports,
probes, security context, writable volumes) is run as given in the operator image with podman, as the
chart's ServiceAccount: the chart's RBAC objects are applied to the test cluster and the container
gets that ServiceAccount's token, CA and namespace where a pod gets them
(/var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST/PORT), so the operator logs in
in-cluster exactly as in a pod. Then the probes' paths on their declared ports and the metrics port
must answer.

The chart is rendered with `watch.namespaces` set to the test's namespace (one Role there, the chart's
namespaced mode): with the default (all namespaces) the operator would reconcile the FineTuneJobs of
every other test on the shared cluster. Everything else is the chart's defaults. The container shares
the host's network (the API server listens on loopback); the chart's ports 8080/8081 must be free
(the test waits up to PORT_WAIT_S for them).
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from chart.helm import find, one, render
from finetune_operator.metrics import NAMES as METRIC_NAMES
from harness.cluster import TestCluster
from harness.images import OPERATOR_IMAGE, podman, require_image

pytestmark = pytest.mark.cluster
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: How long to wait for the chart's fixed ports (8080/8081) to be free on the host.
PORT_WAIT_S = 300


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


@pytest.fixture
def rendered(cluster: TestCluster, namespace: str) -> Iterator[list[dict[str, Any]]]:
    """The chart rendered for the test's namespace, its RBAC objects applied (and removed afterwards)."""
    release = f"img{uuid.uuid4().hex[:6]}"
    objs = render({"watch": {"namespaces": [namespace]}}, release=release, namespace=namespace)
    rbac = [o for o in objs if o["kind"] in RBAC_KINDS]
    cluster.apply(rbac)
    try:
        yield objs
    finally:
        for o in rbac:
            if o["kind"].startswith("Cluster"):
                cluster.kubectl("delete", o["kind"].lower(), o["metadata"]["name"], "--ignore-not-found",
                                "--wait=false", check=False)


def service_account_files(cluster: TestCluster, namespace: str, sa: str, into: Path) -> tuple[str, int]:
    """token, ca.crt and namespace of `sa` as a pod gets them; returns the API server's host and port."""
    into.mkdir()
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    cl = admin["clusters"][0]["cluster"]
    ca = (base64.b64decode(cl["certificate-authority-data"]).decode() if "certificate-authority-data" in cl
          else Path(cl["certificate-authority"]).read_text())
    for name, text in (("token", token), ("ca.crt", ca), ("namespace", namespace)):
        (into / name).write_text(text)
        (into / name).chmod(0o644)
    into.chmod(0o755)
    url = urlsplit(cl["server"])
    assert url.hostname in ("127.0.0.1", "localhost"), cl["server"]
    return url.hostname or "127.0.0.1", url.port or 443


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(found)


def podman_run_args(deploy: dict[str, Any], namespace: str, sa_dir: Path, api: tuple[str, int],
                    volume_root: Path) -> list[str]:
    """`podman run` arguments for the Deployment's one container, from its pod template."""
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    psc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    gid = sc.get("runAsGroup", psc.get("runAsGroup", uid))
    assert uid, "the chart runs the operator as a fixed non-root uid"
    args = ["--network=host", f"--user={uid}:{gid}", "-e", f"KUBERNETES_SERVICE_HOST={api[0]}",
            "-e", f"KUBERNETES_SERVICE_PORT={api[1]}", "-v", f"{sa_dir}:{SA_DIR}:ro"]
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    drop = sc.get("capabilities", {}).get("drop", [])
    args += [f"--cap-drop={cap}" for cap in drop]
    if sc.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    for env in container.get("env", []):
        if "value" in env:
            args += ["-e", f"{env['name']}={env['value']}"]
        else:
            assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, env
            args += ["-e", f"{env['name']}={namespace}"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        assert "emptyDir" in volumes[mount["name"]], f"not an emptyDir: {mount}"
        directory = volume_root / mount["name"]
        directory.mkdir(parents=True)
        directory.chmod(0o777)  # what the kubelet makes of an emptyDir
        args += ["-v", f"{directory}:{mount['mountPath']}:rw"]
    if container.get("command"):
        args += ["--entrypoint", json.dumps(container["command"])]
    return args


def test_chart_command_args_ports_and_probes_start_in_the_operator_image(
    cluster: TestCluster, namespace: str, rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    require_image(OPERATOR_IMAGE)
    deploy = one(rendered, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The chart's image is the one `make images` builds locally: same name and version.
    labels = json.loads(podman("image", "inspect", OPERATOR_IMAGE).stdout)[0]["Labels"]
    repository, tag = container["image"].rsplit(":", 1)
    assert repository.endswith("/" + labels["org.opencontainers.image.title"])
    assert tag == labels["org.opencontainers.image.version"]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    needed = {*ports.values(), *(container_port(container, g["port"]) for g in probes.values())}
    # Another test's operator container (the container e2e runs the same chart) may hold them for a while.
    deadline = time.monotonic() + PORT_WAIT_S
    while (busy := sorted(p for p in needed if not port_is_free(p))) and time.monotonic() < deadline:
        time.sleep(2)
    assert not busy, f"ports {busy} of the chart's operator container are taken on this machine ({PORT_WAIT_S} s)"

    sa = pod["serviceAccountName"]
    assert one(find(rendered, "ServiceAccount"), "ServiceAccount", sa)
    api = service_account_files(cluster, namespace, sa, tmp_path / "sa")
    name = f"chart-args-{uuid.uuid4().hex[:8]}"
    run = podman_run_args(deploy, namespace, tmp_path / "sa", api, tmp_path / "volumes")
    podman("run", "-d", "--name", name, *run, OPERATOR_IMAGE, *container.get("args", []), timeout=120)
    try:
        answers: dict[str, tuple[int, str]] = {}
        deadline = time.monotonic() + 120  # imports and Kopf's start on a loaded 2-core machine
        urls = {kind: f"http://127.0.0.1:{container_port(container, g['port'])}{g['path']}"
                for kind, g in probes.items()}
        urls["metrics"] = f"http://127.0.0.1:{ports['metrics']}/metrics"
        while time.monotonic() < deadline:
            answers = {kind: get(url) for kind, url in urls.items()}
            if all(status == 200 for status, _ in answers.values()):
                break
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", f"the operator container is {state}:\n{podman('logs', name).stderr}"
            time.sleep(1)
        logs = podman("logs", name)
        log = logs.stdout + logs.stderr
        assert all(status == 200 for status, _ in answers.values()), (
            {k: (s, b[:200]) for k, (s, b) in answers.items()}, log[-4000:])
        assert f"# TYPE {METRIC_NAMES['jobs']} gauge" in answers["metrics"][1], answers["metrics"][1][:500]
        assert "Forbidden" not in log and " 403" not in log, log[-4000:]
    finally:
        podman("rm", "-f", "-t", "5", name, check=False, timeout=60)

