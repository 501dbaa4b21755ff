"""A real, local test cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the
kwok controller (started by `kwokctl --runtime=binary` from the binaries `make tools` builds into
.tools/bin), fake GPU nodes, the CRDs from crds/, and a MinIO server. Everything listens on
127.0.0.1 on free ports, with fresh data under one state directory, so a test session can run while
a `make cluster` one is up.

    python -m harness.cluster up      # make cluster: starts it in the background, prints KUBECONFIG and MinIO
    python -m harness.cluster down    # make cluster-down: stops every process, removes the state
    python -m harness.cluster status  # prints what `up` printed, if it is running

Pods on the fake nodes are driven by the kwok Stages in harness/stages (see STAGE_* below).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = Path(os.environ.get("FINETUNE_TOOLS_BIN", str(REPO_ROOT / ".tools" / "bin"))).resolve()
STAGES_DIR = Path(__file__).resolve().parent / "stages"
#: The CRDs every cluster installs (FINETUNE_CRDS_DIR overrides it, e.g. to debug a broken CRD).
CRDS_DIR = Path(os.environ.get("FINETUNE_CRDS_DIR", str(REPO_ROOT / "crds"))).resolve()
#: State of the cluster `make cluster` starts (fixed, so `make cluster-down` finds it).
DEV_STATE_DIR = REPO_ROOT / ".tools" / "cluster"
#: Test sessions put their cluster in a directory of their own under here.
TEST_STATE_ROOT = REPO_ROOT / ".tools" / "test-clusters"

CONTROL_PLANE_TOOLS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "kwokctl",
)
MINIO_TOOLS = ("minio",)

# Annotations and labels the kwok stages in harness/stages understand. They must be on the pod
# (for a Job: on its pod template).
#: "N": the running pod's containers terminate with exit code N (0: Succeeded, else Failed).
STAGE_EXIT_CODE = "test.finetune.dev/exit-code"
#: Go duration ("5s", "1m"): how long after the pod is Running the exit or disruption happens.
STAGE_DELAY = "test.finetune.dev/delay"
#: A DisruptionTarget reason (PreemptionByScheduler, EvictionByEvictionAPI, DeletionByTaintManager,
#: DeletionByPodGC, TerminationByKubelet): the pod fails with that DisruptionTarget condition.
STAGE_DISRUPTION = "test.finetune.dev/disruption"
#: "true": the pod stays Running (even a Job's) until the annotation is removed or set to "false".
STAGE_HOLD = "test.finetune.dev/hold"
#: Label; "true": kwok leaves the pod alone entirely (no Running, no completion, no final delete).
STAGE_KWOK_SKIP = "test.finetune.dev/kwok-skip"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-H200"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
#: What a pod needs to land on a fake GPU node.
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def stage_annotations(
    exit_code: int | None = None,
    delay: str | None = None,
    disruption: str | None = None,
    hold: bool = False,
) -> dict[str, str]:
    """Pod (template) annotations for the kwok test stages.

    Without any, a Job's pod runs and then succeeds at once (kwok's default), another pod keeps
    running. exit_code=N: the pod terminates with N after delay; disruption=REASON: it fails with a
    DisruptionTarget condition of that reason (exit code 137 unless exit_code is given) after delay;
    hold=True: it stays Running until the hold annotation is removed or set to "false".
    """
    ann: dict[str, str] = {}
    if exit_code is not None:
        ann[STAGE_EXIT_CODE] = str(int(exit_code))
    if disruption is not None:
        ann[STAGE_DISRUPTION] = disruption
    if delay is not None:
        ann[STAGE_DELAY] = delay
    if hold:
        ann[STAGE_HOLD] = "true"
    return ann


def gpu_job_manifest(
    name: str,
    *,
    gpus: int = 1,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    backoff_limit: int = 0,
    image: str = "registry.invalid/trainer:test",
) -> dict[str, Any]:
    """A plain batch/v1 Job whose one pod asks for `gpus` nvidia.com/gpu and tolerates GPU nodes."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"annotations": dict(annotations or {}), "labels": dict(labels or {})},
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [dict(GPU_TOLERATION)],
                    "containers": [{
                        "name": "trainer",
                        "image": image,
                        "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
                    }],
                },
            },
        },
    }


class ToolMissingError(RuntimeError):
    """A binary `make tools` builds is not there."""


class ClusterError(RuntimeError):
    """The cluster did not come up (the message carries the relevant logs)."""


def tool(name: str) -> Path:
    """Path of a binary built by `make tools`; raises ToolMissingError when it is not there."""
    path = TOOLS_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ToolMissingError(
            f"{path} is missing: the test cluster's tools are built by `make tools` "
            f"(bash hack/tools/build.sh; `make test` runs it first)"
        )
    return path


def require_tools(names: Iterable[str]) -> None:
    missing = [n for n in names if not (TOOLS_BIN / n).is_file()]
    if missing:
        raise ToolMissingError(
            f"missing in {TOOLS_BIN}: {', '.join(missing)}. The test cluster's tools are built by "
            f"`make tools` (bash hack/tools/build.sh; `make test` runs it first)."
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Polls predicate until it returns something truthy; raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (ClusterError, ToolMissingError):
            raise
        except Exception as exc:  # reported if we time out
            last_exc = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- processes -----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _proc_exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_ours(pid: int, marker: str) -> bool:
    """A process we started for this state dir: a binary from .tools/bin whose args name the dir."""
    exe = _proc_exe(pid)
    return exe.startswith(str(TOOLS_BIN) + os.sep) and marker in _proc_cmdline(pid)


def _processes_of(marker: str) -> list[int]:
    """Every live process run from .tools/bin whose command line mentions marker (a state dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _is_ours(int(entry), marker):
            pids.append(int(entry))
    return pids


def _terminate(pids: Iterable[int], marker: str, grace: float = 2.0) -> None:
    """SIGTERM (to the process group when the process leads one), then SIGKILL after grace."""
    targets = [p for p in set(pids) if _pid_alive(p) and _is_ours(p, marker)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            # Reap our own children so they do not linger as zombies.
            for pid in targets:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
            targets = [p for p in targets if _pid_alive(p)]
            if not targets:
                return
            time.sleep(0.05)


# ---- MinIO ---------------------------------------------------------------------------------------


class MinioServer:
    """A MinIO server on 127.0.0.1 with its data under state_dir."""

    access_key = "finetune"
    secret_key = "finetune-minio-secret"
    region = "us-east-1"

    def __init__(self, state_dir: Path, port: int = 0) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.console_port = 0
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What an S3 client (boto3, s3fs, the trainer) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
        }

    @property
    def log_path(self) -> Path:
        return self.state_dir / "minio.log"

    def start(self) -> None:
        """Starts the process; wait_ready() waits for it to serve."""
        minio = tool("minio")
        data = self.state_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.console_port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "AWS_"))},
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_REGION": self.region,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",
        }
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(minio), "server", "--quiet", "--address", f"127.0.0.1:{self.port}",
                 "--console-address", f"127.0.0.1:{self.console_port}", str(data)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        (self.state_dir / "minio.pid").write_text(str(self.pid))
        atexit.register(self.stop)

    def ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise ClusterError(f"minio exited with {self._proc.returncode}:\n{_tail(self.log_path)}")
        try:
            with urllib.request.urlopen(f"{self.endpoint}/minio/health/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        try:
            wait_until(self.ready, timeout, f"MinIO at {self.endpoint}")
        except TimeoutError as exc:
            raise ClusterError(f"{exc}\n{_tail(self.log_path)}") from None

    def stop(self) -> None:
        if self.pid:
            _terminate([self.pid], str(self.state_dir))
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)
        self.pid = None
        atexit.unregister(self.stop)

    def detach(self) -> None:
        """Leaves the server running when this process exits (`up`)."""
        atexit.unregister(self.stop)

    def to_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "port": self.port, "pid": self.pid, "env": self.env,
                "state_dir": str(self.state_dir)}


# ---- the cluster ---------------------------------------------------------------------------------


def gpu_node_manifest(name: str, gpus: int = 8) -> dict[str, Any]:
    """A fake GPU node as the NVIDIA device plugin and GPU feature discovery would present it."""
    resources = {"cpu": "96", "memory": "1536Gi", "pods": "110", "ephemeral-storage": "4Ti",
                 GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": name,
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.memory": "143771",
            },
        },
        "spec": {"taints": [dict(GPU_TAINT)]},
        "status": {"allocatable": dict(resources), "capacity": dict(resources)},
    }


def cpu_node_manifest(name: str) -> dict[str, Any]:
    """A fake node without GPUs or taints, for pods that need no GPU (an operator, a Deployment)."""
    resources = {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "1Ti"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux",
                       "kubernetes.io/hostname": name, "type": "kwok"},
        },
        "status": {"allocatable": dict(resources), "capacity": dict(resources)},
    }


class TestCluster:
    """A local control plane with fake GPU nodes, the project's CRDs and (unless given one) MinIO.

    >>> c = TestCluster(state_dir); c.start(); c.kubectl("get", "nodes"); c.stop()
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        state_dir: Path,
        *,
        name: str = "finetune-test",
        gpu_nodes: int = 4,
        cpu_nodes: int = 1,
        gpus_per_node: int = 8,
        minio: MinioServer | None = None,
        crds_dir: Path = CRDS_DIR,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.name = name
        self.gpu_nodes = gpu_nodes
        self.cpu_nodes = cpu_nodes
        self.gpus_per_node = gpus_per_node
        self.crds_dir = crds_dir
        self._own_minio = minio is None
        self.minio = minio if minio is not None else MinioServer(self.state_dir / "minio")
        self.timings: dict[str, float] = {}
        self.server = ""
        self._started = False
        self._restarts = 0
        self._http: tuple[str, int, ssl.SSLContext] | None = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def kwok_workdir(self) -> Path:
        return self.state_dir / "kwok"

    @property
    def cluster_dir(self) -> Path:
        return self.kwok_workdir / "clusters" / self.name

    @property
    def logs_dir(self) -> Path:
        return self.cluster_dir / "logs"

    @property
    def gpu_node_names(self) -> list[str]:
        return [f"gpu-node-{i}" for i in range(self.gpu_nodes)]

    @property
    def cpu_node_names(self) -> list[str]:
        return [f"cpu-node-{i}" for i in range(self.cpu_nodes)]

    @property
    def env(self) -> dict[str, str]:
        """KUBECONFIG (and kubectl's KUBECACHEDIR), the MinIO AWS_* variables, PATH with .tools/bin first."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(self.state_dir / "kube-cache"),
            **self.minio.env,
            "PATH": f"{TOOLS_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> TestCluster:
        require_tools(CONTROL_PLANE_TOOLS + (MINIO_TOOLS if self._own_minio else ()))
        t0 = time.monotonic()
        self._clean_state()
        self.state_dir.mkdir(parents=True)
        (self.state_dir / "owner.pid").write_text(str(os.getpid()))
        self._started = True
        atexit.register(self.stop)
        try:
            if self._own_minio:
                self.minio.state_dir.mkdir(parents=True, exist_ok=True)
                self.minio.start()
            self._create_control_plane(timeout)
            self.timings["control_plane"] = time.monotonic() - t0
            self._create_nodes()
            self.timings["nodes_created"] = time.monotonic() - t0
            self._wait_apiserver_ready(timeout=90)
            self.timings["apiserver_ready"] = time.monotonic() - t0
            self.install_crds()
            self.timings["crds_established"] = time.monotonic() - t0
            self._wait_usable(timeout=60)
            if self._own_minio:
                self.minio.wait_ready()
            self.timings["total"] = time.monotonic() - t0
            self._write_state()
        except BaseException:
            self.stop(keep_state=True)
            raise
        return self

    def stop(self, keep_state: bool = False) -> None:
        """Kills every process of this cluster (and its own MinIO); removes the state unless told."""
        if not self.state_dir.exists():
            return
        marker = str(self.state_dir)
        pids = list(self.component_pids().values())
        if self._own_minio:
            self.minio.stop()
        _terminate(pids, marker)
        leftovers = _processes_of(marker)
        if leftovers:
            _terminate(leftovers, marker)
        if not keep_state and not os.environ.get("FINETUNE_KEEP_CLUSTER_STATE"):
            shutil.rmtree(self.state_dir, ignore_errors=True)
        atexit.unregister(self.stop)
        self._started = False

    def detach(self) -> None:
        """Leaves the cluster running when this process exits (`up`)."""
        atexit.unregister(self.stop)
        self.minio.detach()

    def _clean_state(self) -> None:
        if self.state_dir.exists():
            _terminate(_processes_of(str(self.state_dir)), str(self.state_dir))
            shutil.rmtree(self.state_dir)

    def _kwokctl_config(self) -> str:
        options = {
            "runtime": "binary",
            "bindAddress": "127.0.0.1",
            "kubeApiserverBinary": str(tool("kube-apiserver")),
            "kubeControllerManagerBinary": str(tool("kube-controller-manager")),
            "kubeSchedulerBinary": str(tool("kube-scheduler")),
            "kubectlBinary": str(tool("kubectl")),
            "etcdBinary": str(tool("etcd")),
            "kwokControllerBinary": str(tool("kwok")),
            # Real admission (ServiceAccount, Priority, webhooks, ...), as on a real cluster.
            "kubeAdmission": True,
            "kubeAuthorization": True,
            "disableQPSLimits": True,
        }
        # Ports from the kernel's ephemeral range: kwokctl's own choice (counting down from 32767,
        # checked but not held) can collide when two clusters are created at the same moment.
        for key in ("kubeApiserverPort", "etcdPort", "etcdPeerPort", "kubeControllerManagerPort",
                    "kubeSchedulerPort", "kwokControllerPort"):
            options[key] = free_port()
        conf = {
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
            "kind": "KwokctlConfiguration",
            "options": options,
            # Test data need not survive a power cut.
            "componentsPatches": [
                {"name": "etcd", "extraArgs": [{"key": "unsafe-no-fsync", "value": "true"}]},
                # One instance each: without leader election a slow lease renewal on a loaded
                # machine cannot make them exit ("leaderelection lost") in the middle of a session.
                {"name": "kube-controller-manager", "extraArgs": [{"key": "leader-elect", "value": "false"}]},
                {"name": "kube-scheduler", "extraArgs": [{"key": "leader-elect", "value": "false"}]},
            ],
        }
        docs = [json.dumps(conf)]
        for stage in sorted(STAGES_DIR.glob("*.yaml")):
            docs.append(stage.read_text())
        return "\n---\n".join(docs) + "\n"

    def _kwokctl(self, *args: str, timeout: float) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KWOK_")},
            "KWOK_WORKDIR": str(self.kwok_workdir),
        }
        log = self.state_dir / "kwokctl.log"
        with open(log, "ab") as out:
            proc = subprocess.run([str(tool("kwokctl")), *args], env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout + 30, check=False)
        if proc.returncode != 0:
            raise ClusterError(f"kwokctl {args[0]} {args[1]} failed ({proc.returncode}):\n{_tail(log)}\n"
                               f"{self._component_logs()}")

    def component_pids(self) -> dict[str, int]:
        """The control-plane processes kwokctl started: component name -> pid."""
        pids = {}
        for pidfile in (self.cluster_dir / "pids").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pids[pidfile.stem] = int(pidfile.read_text().strip())
        return pids

    def dead_components(self) -> list[str]:
        return sorted(name for name, pid in self.component_pids().items() if not _pid_alive(pid))

    def _revive(self) -> None:
        """Restarts components that exited. On a loaded machine the apiserver can take longer to
        become healthy than kube-controller-manager waits for it at start (10 s, then it exits);
        `kwokctl start cluster` starts again exactly the components whose process is gone."""
        dead = self.dead_components()
        if not dead:
            return
        self._restarts += 1
        if self._restarts > 3:
            raise ClusterError(f"components keep exiting: {', '.join(dead)}\n{self._component_logs()}")
        # kwokctl skips a component whose pid file names a live process, and an exited process
        # not yet reaped (a zombie) looks live to it: drop the pid files of the dead ones.
        for name in dead:
            (self.cluster_dir / "pids" / f"{name}.pid").unlink(missing_ok=True)
        self._kwokctl("start", "cluster", "--name", self.name, "--timeout", "60s", timeout=60)

    def _create_control_plane(self, timeout: float) -> None:
        config = self.state_dir / "kwokctl.yaml"
        config.write_text(self._kwokctl_config())
        cmd = [
            "create", "cluster",
            "--name", self.name,
            "--config", str(config),
            "--kubeconfig", str(self.kubeconfig),
            "--runtime", "binary",
            # Every binary given explicitly, so kwokctl never downloads anything.
            "--kube-apiserver-binary", str(tool("kube-apiserver")),
            "--kube-controller-manager-binary", str(tool("kube-controller-manager")),
            "--kube-scheduler-binary", str(tool("kube-scheduler")),
            "--etcd-binary", str(tool("etcd")),
            "--kwok-controller-binary", str(tool("kwok")),
            "--kube-admission",
            "--timeout", f"{int(timeout)}s",
            "--quiet-pull",
        ]
        self._kwokctl(*cmd, timeout=timeout)
        self.server = self.kubectl("config", "view", "--minify", "-o",
                                   "jsonpath={.clusters[0].cluster.server}").stdout.strip()
        if not self.server.startswith(("https://127.0.0.1:", "http://127.0.0.1:")):
            raise ClusterError(f"the API server is not on loopback: {self.server!r}")

    def _component_logs(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(self.logs_dir.glob("*.log")):
            parts.append(f"--- {log.name}\n{_tail(log, lines)}")
        return "\n".join(parts)

    def _create_nodes(self) -> None:
        items = [gpu_node_manifest(n, self.gpus_per_node) for n in self.gpu_node_names]
        items += [cpu_node_manifest(n) for n in self.cpu_node_names]
        # Posted as soon as the API server accepts them, before it is fully ready (it serves
        # writes before its last post-start hooks finish): that overlaps with its start-up.
        pending = {item["metadata"]["name"]: item for item in items}

        def post_all() -> bool:
            self._revive()
            for name, item in list(pending.items()):
                code, resp = self.api_request("POST", "/api/v1/nodes", item)
                if code in (201, 409):  # created, or created by an earlier attempt
                    del pending[name]
                elif code not in (429, 500, 503, 504):
                    raise ClusterError(f"creating node {name}: HTTP {code}: {resp}")
            return not pending

        wait_until(post_all, 90, "the fake nodes to be created", interval=0.25)

    def crd_files(self) -> list[Path]:
        return sorted(Path(self.crds_dir).glob("*.yaml")) if Path(self.crds_dir).is_dir() else []

    def install_crds(self, timeout: float = 60) -> list[str]:
        """Applies every crds/*.yaml and waits for each CRD to be Established; returns their names."""
        files = self.crd_files()
        if not files:
            return []
        args: list[str] = ["apply"]
        for f in files:
            args += ["-f", str(f)]
        out = self.kubectl(*args, "-o", "name").stdout.split()
        names = [n for n in out if n.startswith("customresourcedefinition")]
        for name in names:
            path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name.split('/', 1)[1]}"

            def established(path: str = path) -> bool:
                code, crd = self.api_get(path)
                return code == 200 and any(c["type"] == "Established" and c["status"] == "True"
                                           for c in (crd.get("status") or {}).get("conditions") or [])

            wait_until(established, timeout, f"{name} to be Established", interval=0.25)
        return names

    def wait_condition(self, obj: str, condition: str, namespace: str | None = None,
                       status: str = "True", timeout: float = 60) -> dict[str, Any]:
        """Polls until obj ("kind/name") has status.conditions[type=condition].status == status;
        returns the object. (`kubectl wait` errors out on an object whose conditions are null.)"""
        args = ["get", obj, "-o", "json"] + (["-n", namespace] if namespace else [])

        def met() -> dict[str, Any] | None:
            item = json.loads(self.kubectl(*args).stdout)
            conds = (item.get("status") or {}).get("conditions") or []
            return item if any(c.get("type") == condition and c.get("status") == status
                               for c in conds) else None

        result: dict[str, Any] = wait_until(met, timeout, f"{obj} to be {condition}={status}")
        return result

    def api_get(self, path: str, timeout: float = 10) -> tuple[int, Any]:
        """GET path from the API server as the admin, in-process (no kubectl, so polling costs
        next to no CPU); returns (HTTP status, parsed JSON or text)."""
        return self.api_request("GET", path, timeout=timeout)

    def api_request(self, method: str, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
        """One request to the API server as the admin; returns (HTTP status, parsed JSON or text)."""
        if self._http is None:
            import yaml

            kc = yaml.safe_load(self.kubeconfig.read_text())
            cluster, user = kc["clusters"][0]["cluster"], kc["users"][0]["user"]
            url = urllib.parse.urlsplit(cluster["server"])
            ctx = ssl.create_default_context(cafile=cluster["certificate-authority"])
            ctx.load_cert_chain(user["client-certificate"], user["client-key"])
            self._http = (url.hostname or "127.0.0.1", url.port or 443, ctx)
        host, port, ctx = self._http
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, body.decode(errors="replace")

    def _wait_apiserver_ready(self, timeout: float) -> None:
        def ready() -> bool:
            self._revive()
            return self.api_get("/readyz")[0] == 200

        wait_until(ready, timeout, "kube-apiserver /readyz", interval=0.25)

    def _wait_usable(self, timeout: float) -> None:
        t0 = time.monotonic() - self.timings.get("crds_established", 0.0)
        nodes = self.gpu_node_names + self.cpu_node_names

        def schedulable() -> bool:
            # kwok marks the nodes Ready; TaintNodesByCondition added node.kubernetes.io/not-ready
            # at creation, which the node lifecycle controller (kube-controller-manager) removes.
            self._revive()
            code, data = self.api_get("/api/v1/nodes")
            if code != 200:
                return False
            ok = set()
            for node in data["items"]:
                ready = any(c["type"] == "Ready" and c["status"] == "True"
                            for c in node.get("status", {}).get("conditions") or [])
                tainted = any(tn["key"].startswith("node.kubernetes.io/")
                              for tn in node["spec"].get("taints") or [])
                if ready and not tainted:
                    ok.add(node["metadata"]["name"])
            return ok >= set(nodes)

        wait_until(schedulable, timeout, "the nodes to be Ready and schedulable", interval=0.25)
        self.timings["nodes_schedulable"] = time.monotonic() - t0

        # ServiceAccount admission rejects pods until the default service account exists.
        def default_sa() -> bool:
            self._revive()
            return self.api_get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

        wait_until(default_sa, timeout, "the default service account", interval=0.25)

    def _write_state(self) -> None:
        state = {
            "name": self.name,
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "minio": self.minio.to_dict(),
            "own_minio": self._own_minio,
            "gpu_nodes": self.gpu_node_names,
            "cpu_nodes": self.cpu_node_names,
            "timings": self.timings,
        }
        (self.state_dir / "cluster.json").write_text(json.dumps(state, indent=2))

    @classmethod
    def from_state(cls, state_dir: Path) -> TestCluster:
        """The cluster whose state is in state_dir (started by another process, e.g. `up`)."""
        state_dir = Path(state_dir).resolve()
        info = json.loads((state_dir / "cluster.json").read_text())
        minio = MinioServer(Path(info["minio"]["state_dir"]), port=info["minio"]["port"])
        minio.pid = info["minio"]["pid"]
        c = cls(state_dir, name=info["name"], gpu_nodes=len(info["gpu_nodes"]),
                cpu_nodes=len(info["cpu_nodes"]), minio=minio)
        c._own_minio = bool(info["own_minio"])
        c.server = info["server"]
        c.timings = info.get("timings", {})
        return c

    def is_running(self) -> bool:
        return self.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0

    # -- using it ------------------------------------------------------------------------------
    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs .tools/bin/kubectl against this cluster; raises CalledProcessError (with stderr
        in its message) when check and it fails."""
        return run_kubectl(self.kubeconfig, *args, input=input, check=check, timeout=timeout, env=env)

    def apply(self, manifest: str | Mapping[str, Any] | Sequence[Mapping[str, Any]],
              namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """kubectl apply -f - of YAML text, an object, or a list of objects."""
        if not isinstance(manifest, str):
            if isinstance(manifest, Mapping):
                manifest = json.dumps(manifest)
            else:
                manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifest)})
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        return self.kubectl(*args, input=manifest)

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for this cluster (the official Python client)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(configuration=cfg)

    def summary(self) -> str:
        lines = [
            f"export KUBECONFIG={self.kubeconfig}",
            f"# API server {self.server}; {len(self.gpu_node_names)} fake GPU nodes "
            f"({self.gpus_per_node} x {GPU_RESOURCE}, {GPU_PRODUCT}, taint "
            f"{GPU_TAINT['key']}={GPU_TAINT['value']}:{GPU_TAINT['effect']}), "
            f"{len(self.cpu_node_names)} CPU node(s); kubectl: {TOOLS_BIN / 'kubectl'}",
            f"# MinIO (S3) endpoint {self.minio.endpoint}  access key {self.minio.access_key}  "
            f"secret key {self.minio.secret_key}  region {self.minio.region}",
        ]
        lines += [f"export {k}={v}" for k, v in self.minio.env.items()]
        return "\n".join(lines)


def run_kubectl(
    kubeconfig: Path | str,
    *args: str,
    input: str | None = None,
    check: bool = True,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    # kubectl's discovery cache is keyed by host:port; ports are reused by later clusters, whose
    # APIs differ (CRDs): keep the cache with the cluster, not in ~/.kube/cache.
    cache = str(Path(kubeconfig).parent / "kube-cache")
    full_env = {**os.environ, "KUBECACHEDIR": cache, **(env or {}), "KUBECONFIG": str(kubeconfig)}
    proc = subprocess.run([str(tool("kubectl")), *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env=full_env, check=False)
    if check and proc.returncode != 0:
        raise KubectlError(proc)
    return proc


class KubectlError(subprocess.CalledProcessError):
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(proc.returncode, proc.args, proc.stdout, proc.stderr)

    def __str__(self) -> str:
        args = " ".join(str(a) for a in self.cmd[1:])
        return f"kubectl {args} failed ({self.returncode}): {(self.stderr or '').strip()}"


def reap_stale_test_clusters(root: Path = TEST_STATE_ROOT) -> None:
    """Stops clusters left by test sessions that died without cleaning up (e.g. SIGKILL)."""
    if not root.is_dir():
        return
    for d in root.iterdir():
        # Each session names its directory after its pid (harness.cluster_plugin).
        owner = int(d.name) if d.name.isdigit() else -1
        if owner > 0 and owner != os.getpid() and _pid_alive(owner):
            continue
        _terminate(_processes_of(str(d.resolve())), str(d.resolve()))
        shutil.rmtree(d, ignore_errors=True)


# ---- `make cluster` / `make cluster-down` --------------------------------------------------------


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEV_STATE_DIR)
    parser.add_argument("--gpu-nodes", type=int, default=4)
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir.resolve()

    existing = None
    if (state_dir / "cluster.json").exists():
        with contextlib.suppress(Exception):
            existing = TestCluster.from_state(state_dir)

    if args.command == "down":
        if existing is not None:
            existing.stop()
        else:
            # No (readable) state: still stop anything started from that directory.
            _terminate(_processes_of(str(state_dir)), str(state_dir))
            shutil.rmtree(state_dir, ignore_errors=True)
        left = _processes_of(str(state_dir))
        if left:
            print(f"cluster-down: processes still running: {left}", file=sys.stderr)
            return 1
        print(f"cluster-down: stopped; removed {state_dir}")
        return 0

    if args.command == "status":
        if existing is None or not existing.is_running():
            print("no cluster running (make cluster starts one)")
            return 1
        print(existing.summary())
        return 0

    # up
    if existing is not None and existing.is_running() and existing.minio.ready():
        print("# already running (make cluster-down stops it)")
        print(existing.summary())
        return 0
    cluster = TestCluster(state_dir, name="finetune-dev", gpu_nodes=args.gpu_nodes)
    try:
        cluster.start()
    except Exception as exc:
        print(f"cluster up failed: {exc}\n(logs kept in {state_dir}; make cluster-down removes them)",
              file=sys.stderr)
        return 1
    # Leave it running: the processes are in sessions of their own and outlive this one.
    cluster.detach()
    print(f"# cluster up in {cluster.timings['total']:.1f}s (make cluster-down stops it)")
    print(cluster.summary())
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
