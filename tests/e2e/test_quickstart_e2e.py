"""End to end: examples/cluster-quickstart.yaml -> operator -> Job -> pod (run by the fake kubelet)
-> `finetune train` -> adapter and manifest in MinIO -> FineTuneJob Succeeded with the artifact.

The example is applied as written, plus two test-only metadata entries the operator propagates to
the pod: the label that keeps kwok off the pod (the fake kubelet runs it instead) and the
annotation that points the operator's scraper at the local trainer's metrics port.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api.constants import (
    CREDENTIALS_MOUNT_DIR,
    LABEL_COMPONENT,
    ConditionType,
    Env,
    Phase,
    Reason,
    StorageEnv,
)
from finetune_trainer import storage
from harness.cluster import STAGE_KWOK_SKIP, free_port, wait_until
from harness.kubelet import FakeKubelet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from operator_harness import METRICS_URL_ANNOTATION, OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "cluster-quickstart.yaml"
VENV_BIN = str(Path(sys.executable).parent)


def example() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


@pytest.fixture
def bucket_with_inputs(
    minio_env: dict[str, str], tiny_model_dir: Path, toy_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The bucket of the example, holding the tiny model and the toy data; no previous output."""
    for k, v in minio_env.items():
        monkeypatch.setenv(k, v)
    spec = example()["spec"]
    bucket = spec["output"]["uri"].removeprefix("s3://").split("/")[0]
    fs, _ = storage.resolve(f"s3://{bucket}")
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    storage.publish(tiny_model_dir, spec["model"]["uri"], kind="artifact")
    fs.put_file(str(toy_data_dir / "prompt_completion.jsonl"), spec["dataset"]["train"].removeprefix("s3://"))
    _, out = storage.resolve(spec["output"]["uri"])
    if fs.exists(out):
        fs.rm(out, recursive=True)
    return bucket


@pytest.fixture
def operator_process(cluster: Any, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, namespace, tmp_path).start(wait_ready=False)
    # A loaded CI machine can take a while to import Kopf and the Kubernetes client.
    wait_until(op.ready, 180, f"the operator to be ready (log: {op.log_path})")
    yield op
    op.stop()


def secret(env: dict[str, str], **override: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": example()["spec"]["output"]["credentialsSecret"]["name"]},
        "stringData": {**env, **override},
    }


def run_quickstart(
    cluster: Any,
    namespace: str,
    k8s_client: Any,
    tmp_path: Path,
    timeout: float = 900,
) -> tuple[dict[str, Any], FakeKubelet]:
    port = free_port()
    doc = example()
    doc["metadata"]["labels"] = {STAGE_KWOK_SKIP: "true"}
    doc["metadata"]["annotations"] = {METRICS_URL_ANNOTATION: f"http://127.0.0.1:{port}/metrics"}
    name = doc["metadata"]["name"]
    with FakeKubelet(
        k8s_client,
        namespace,
        tmp_path / "kubelet",
        path=[VENV_BIN],
        extra_env={"FINETUNE_METRICS_PORT": str(port), "OMP_NUM_THREADS": "1"},
    ) as kubelet:
        cluster.apply(doc, namespace=namespace)

        def finished() -> dict[str, Any] | None:
            obj = cluster.get_json("finetunejob", name, "-n", namespace)
            return obj if (obj.get("status") or {}).get("phase") in Phase.TERMINAL else None

        obj = wait_until(finished, timeout, f"FineTuneJob {name} to finish", interval=1.0)
    return obj, kubelet


def everything_visible(cluster: Any, namespace: str, op: OperatorProcess, kubelet: FakeKubelet) -> str:
    parts = [op.log_path.read_text(errors="replace")]
    parts += [p.read_text(errors="replace") for p in kubelet.logs.values()]
    for kind in ("finetunejobs", "events", "configmaps", "jobs", "pods"):
        parts.append(cluster.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)
    return "\n".join(parts)


def test_quickstart_from_kubectl_apply_to_adapter_in_minio(
    cluster: Any,
    namespace: str,
    k8s_client: Any,
    minio_env: dict[str, str],
    bucket_with_inputs: str,
    operator_process: OperatorProcess,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    cluster.apply(secret(minio_env), namespace=namespace)
    obj, kubelet = run_quickstart(cluster, namespace, k8s_client, tmp_path)
    status = obj["status"]
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in kubelet.logs.values())
    assert status["phase"] == Phase.SUCCEEDED, (
        f"{json.dumps(status, indent=1)}\n{logs}\n{operator_process.log_tail()}"
    )
    # The preflight pod (spec.preflight is on by default) passed first, then the trainer ran.
    assert list(kubelet.handled.values()) == [0, 0]
    assert status["dataCheck"]["rows"] > 0 and status["dataCheck"]["tokens"] > status["dataCheck"]["rows"]
    assert any(x["type"] == ConditionType.DATA_CHECKED and x["status"] == "True" for x in status["conditions"])

    out = example()["spec"]["output"]["uri"]
    artifact = status["artifact"]
    assert artifact["uri"] == out
    fs, root = storage.resolve(out)
    manifest_bytes = fs.cat_file(f"{root}/manifest.json")
    assert artifact["sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    manifest = storage.verify(out)
    assert artifact["sizeBytes"] == manifest.size_bytes
    assert [s for s, _ in storage.list_complete_checkpoints(f"{out}/checkpoints")] == [20, 30]

    # The artifact is a working adapter for the base model.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = storage.fetch(out, tmp_path / "artifact")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, local)
        after = tuned(ids).logits
    assert not torch.allclose(before, after), "the adapter changes nothing"

    # Credentials: nowhere in logs, status, events, the ConfigMap, the Job, the pod or the manifest.
    seen = everything_visible(cluster, namespace, operator_process, kubelet)
    assert minio_env["AWS_SECRET_ACCESS_KEY"] not in seen
    assert minio_env["AWS_SECRET_ACCESS_KEY"].encode() not in manifest_bytes


def test_wrong_credentials_fail_the_job_once_naming_the_uri(
    cluster: Any,
    namespace: str,
    k8s_client: Any,
    minio_env: dict[str, str],
    bucket_with_inputs: str,
    operator_process: OperatorProcess,
    tmp_path: Path,
) -> None:
    wrong = "wrong-secret-for-the-e2e-test"
    cluster.apply(secret(minio_env, AWS_SECRET_ACCESS_KEY=wrong), namespace=namespace)
    obj, kubelet = run_quickstart(cluster, namespace, k8s_client, tmp_path, timeout=600)
    status = obj["status"]
    assert status["phase"] == Phase.FAILED, json.dumps(status, indent=1)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    assert "s3://finetune-quickstart/" in failed["message"], failed
    # The preflight reads the data with the same credentials: its exit 42 fails the job before any
    # GPU pod exists (one pod, no retries).
    assert list(kubelet.handled.values()) == [42]
    assert [p["metadata"]["labels"][LABEL_COMPONENT] for p in cluster.get_json("pods", "-n", namespace)["items"]] == [
        "preflight"]
    pods = cluster.get_json("pods", "-n", namespace)["items"]
    assert len(pods) == 1
    assert failed["reason"] in (Reason.PERMANENT_ERROR, Reason.STORAGE_ERROR), failed
    seen = everything_visible(cluster, namespace, operator_process, kubelet)
    assert wrong not in seen and minio_env["AWS_SECRET_ACCESS_KEY"] not in seen


def test_credentials_mounted_as_files_reach_the_trainer(
    cluster: Any,
    namespace: str,
    k8s_client: Any,
    minio_env: dict[str, str],
    bucket_with_inputs: str,
    tmp_path: Path,
) -> None:
    """`finetune operator --credentials-as-files` (chart trainerPods.credentialsAsFiles): the Secret
    is a read-only volume, the pod's environment has no credential, and the trainer (whose
    environment the fake kubelet builds from the pod alone) reaches MinIO with the files."""
    op = OperatorProcess(cluster, namespace, tmp_path, "--credentials-as-files").start(wait_ready=False)
    try:
        wait_until(op.ready, 180, f"the operator to be ready (log: {op.log_path})")
        cluster.apply(secret(minio_env), namespace=namespace)
        obj, kubelet = run_quickstart(cluster, namespace, k8s_client, tmp_path)
        status = obj["status"]
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in kubelet.logs.values())
        assert status["phase"] == Phase.SUCCEEDED, f"{json.dumps(status, indent=1)}\n{logs}\n{op.log_tail()}"
        assert storage.verify(example()["spec"]["output"]["uri"]).files

        # The trainer's pod (the preflight's, before it, gets the same credentials volume).
        (pod,) = [p for p in cluster.get_json("pods", "-n", namespace)["items"]
                  if p["metadata"]["labels"][LABEL_COMPONENT] == "trainer"]
        (container,) = pod["spec"]["containers"]
        assert not any(e.get("valueFrom", {}).get("secretKeyRef") for e in container["env"])
        assert not {e["name"] for e in container["env"]} & set(StorageEnv.ALL)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env[Env.CREDENTIALS_DIR] == CREDENTIALS_MOUNT_DIR
        (volume,) = [v for v in pod["spec"]["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == example()["spec"]["output"]["credentialsSecret"]["name"]
        seen = everything_visible(cluster, namespace, op, kubelet)
        assert minio_env["AWS_SECRET_ACCESS_KEY"] not in seen
    finally:
        op.stop()
