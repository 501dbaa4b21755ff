"""Fixtures of the Kueue tests: a test cluster of their own with Kueue's real controller manager.

A cluster of their own: Kueue's webhooks see every Job of the cluster they serve, and a Kueue
test must not be able to slow down or refuse the Jobs of the other tests. It shares the session's
MinIO. Each test gets a namespace with its own ClusterQueue (only that namespace may use it, so
quota held by a previous test's leftovers cannot change what a test sees) and LocalQueue, and the
operator (a process, as in tests/operator) watching that namespace.
"""

from __future__ import annotations

import contextlib
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.cluster import STAGE_HOLD, MinioServer, TestCluster, wait_until
from harness.kueue import KueueCluster, KueueController, Queues

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from operator_harness import OperatorProcess


@pytest.fixture(scope="package")
def kueue_cluster(_cluster_session_dir: Path, minio: MinioServer) -> Iterator[KueueCluster]:
    cluster = TestCluster(_cluster_session_dir / "kueue-k8s", name="finetune-kueue", minio=minio)
    kueue = KueueController(cluster, cluster.state_dir / "kueue")
    try:
        cluster.start()
        kueue.start()
        yield KueueCluster(cluster, kueue)
    finally:
        kueue.stop()
        cluster.stop()


@pytest.fixture
def queues(kueue_cluster: KueueCluster, request: pytest.FixtureRequest) -> Iterator[Queues]:
    """A fresh namespace with a LocalQueue on a ClusterQueue of 8 GPUs of its own."""
    cluster = kueue_cluster.cluster
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    namespace = f"{base or 't'}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    wait_until(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", namespace,
                                       check=False).returncode == 0,
               30, f"the default service account in namespace {namespace}")
    q = kueue_cluster.kueue.create_queues(namespace, gpus=8)
    yield q
    # A held pod left on a node would keep the next test's 8-GPU pod off it: let them finish (a
    # finished pod holds no resources) before the namespace goes.
    def running() -> list[str]:
        pods = cluster.get_json("pods", "-n", namespace)["items"]
        return [p["metadata"]["name"] for p in pods if p["status"].get("phase") in ("Pending", "Running")]

    for name in running():
        cluster.kubectl("annotate", "pod", name, "-n", namespace, "--overwrite", f"{STAGE_HOLD}=false", check=False)
    # (A pod the fake kubelet ran is not kwok's to finish: after a failed test it may stay.)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not running(), 60, f"the pods of {namespace} to finish")
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found", check=False)
    cluster.kubectl("delete", "clusterqueue.kueue.x-k8s.io", q.cluster_queue, "--wait=false",
                    "--ignore-not-found", check=False)


@pytest.fixture
def kueue_operator(kueue_cluster: KueueCluster, queues: Queues, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kueue_cluster.cluster, queues.namespace, tmp_path)
    op.start(wait_ready=False)
    # A loaded CI machine can take a while to import Kopf and the Kubernetes client.
    wait_until(op.ready, 180, f"the operator to be ready (log: {op.log_path})")
    yield op
    op.stop()
