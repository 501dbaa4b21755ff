"""pytest plugin `harness.cluster_plugin`: the real test cluster and MinIO as fixtures.

Session-scoped (started once, on first use, and torn down at the end of the session):

- `minio` -> harness.cluster.MinioServer: a MinIO server on 127.0.0.1. `.endpoint`
  ("http://127.0.0.1:PORT"), `.access_key`, `.secret_key`, `.region`, and `.env`, the dict
  {AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION} for S3 clients.
- `minio_env` -> that dict.
- `cluster` -> harness.cluster.TestCluster: etcd, kube-apiserver, kube-controller-manager,
  kube-scheduler and kwok on 127.0.0.1, 4 fake GPU nodes (gpu-node-0..3: 8 x nvidia.com/gpu,
  NVIDIA-H200, taint nvidia.com/gpu=present:NoSchedule) and 1 CPU node (cpu-node-0, no taint),
  the CRDs of crds/*.yaml installed (Established), and the `minio` server above. Members:
  `.kubeconfig` (Path), `.server` ("https://127.0.0.1:PORT"), `.kubectl(*args, input=None,
  check=True, timeout=60)` -> CompletedProcess, `.apply(yaml_or_obj_or_list, namespace=None)`,
  `.get_json(*args)`, `.wait_condition("job/x", "Complete", namespace=...)`,
  `.api_get(path)` / `.api_request(method, path, body)` (in-process HTTP as admin),
  `.api_client()` (kubernetes.client.ApiClient), `.install_crds()`, `.component_pids()`,
  `.env` (KUBECONFIG, KUBECACHEDIR, AWS_* and PATH with .tools/bin), `.minio`,
  `.gpu_node_names`, `.cpu_node_names`, `.state_dir`, `.logs_dir` (component logs).
- `k8s_client` -> kubernetes.client.ApiClient for the cluster.

Function-scoped:

- `kubectl` -> cluster.kubectl (raises harness.cluster.KubectlError, with stderr, on failure).
- `namespace` -> name of a fresh namespace (default service account ready), deleted afterwards.

Pods on the fake nodes follow the kwok stages in harness/stages; steer them with pod (template)
annotations, built by harness.cluster.stage_annotations(exit_code=, delay=, disruption=, hold=):
`test.finetune.dev/exit-code`, `.../delay`, `.../disruption`, `.../hold`, and the label
`test.finetune.dev/kwok-skip: "true"` for pods a test drives itself (hack/tools/README.md has the
table). harness.cluster.gpu_job_manifest() is a plain GPU Job. A missing tool is an error, never
a skip: `make test` runs `make tools` first. FINETUNE_KEEP_CLUSTER_STATE=1 keeps the state
directory (.tools/test-clusters/<pid>/) with its logs after the session.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import (
    TEST_STATE_ROOT,
    KubectlError,
    MinioServer,
    TestCluster,
    reap_stale_test_clusters,
    wait_until,
)

__all__ = ["KubectlError"]


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (CI timeout, `timeout`, a killed make) becomes KeyboardInterrupt, so pytest still
    # runs the session teardown and no cluster process outlives the run.
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def _cluster_session_dir() -> Iterator[Path]:
    """One directory per test session (per process) holding the cluster's and MinIO's state."""
    reap_stale_test_clusters()
    path = TEST_STATE_ROOT / str(os.getpid())
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / "owner.pid").write_text(str(os.getpid()))
    yield path
    if not os.environ.get("FINETUNE_KEEP_CLUSTER_STATE"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def minio(_cluster_session_dir: Path) -> Iterator[MinioServer]:
    server = MinioServer(_cluster_session_dir / "minio")
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def minio_env(minio: MinioServer) -> dict[str, str]:
    return dict(minio.env)


@pytest.fixture(scope="session")
def cluster(_cluster_session_dir: Path, minio: MinioServer) -> Iterator[TestCluster]:
    c = TestCluster(_cluster_session_dir / "k8s", minio=minio)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def k8s_client(cluster: TestCluster) -> Iterator[Any]:
    api = cluster.api_client()
    yield api
    api.close()


@pytest.fixture
def kubectl(cluster: TestCluster) -> Any:
    return cluster.kubectl


@pytest.fixture
def namespace(cluster: TestCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base or 't'}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    wait_until(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name,
                                       check=False).returncode == 0,
               30, f"the default service account in namespace {name}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
