"""The preflight on the test cluster, through a real preflight pod: the operator's Job runs
`finetune preflight` (the fake kubelet runs the pod with the venv's `finetune`) on data in MinIO.
A bad dataset fails the FineTuneJob before any GPU Job or pod exists; a good one passes, lands in
status, and only then is the GPU Job created, and it runs."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_api import constants as c
from finetune_trainer import storage
from harness.cluster import STAGE_KWOK_SKIP, TestCluster, free_port, wait_until
from harness.kubelet import FakeKubelet
from harness.s3_inputs import publish_model_once, s3_bucket
from operator_harness import METRICS_URL_ANNOTATION, OperatorProcess, children, condition, events, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

VENV_BIN = str(Path(sys.executable).parent)
BUCKET = "preflight-e2e"
MODEL = f"s3://{BUCKET}/models/tiny-llama"
SECRET = "s3-credentials"


@pytest.fixture
def inputs(minio_env: dict[str, str], tiny_model_dir: Path, toy_data_dir: Path, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The tiny model and two datasets in MinIO: the toy data, and a file whose line 3 is cut off."""
    for k, v in minio_env.items():
        monkeypatch.setenv(k, v)
    fs = s3_bucket(BUCKET)
    publish_model_once(tiny_model_dir, MODEL)
    good = f"{BUCKET}/data/good.jsonl"
    fs.put_file(str(toy_data_dir / "prompt_completion.jsonl"), good)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a?", "completion": " b"}\n{"prompt": "c?", "completion": " d"}\n{"prompt": "e?", \n',
                   encoding="utf-8")
    fs.put_file(str(bad), f"{BUCKET}/data/bad.jsonl")
    return {"good": f"s3://{good}", "bad": f"s3://{BUCKET}/data/bad.jsonl"}


@pytest.fixture
def preflight_operator(cluster: TestCluster, namespace: str, tmp_path: Path,
                       minio_env: dict[str, str]) -> Iterator[OperatorProcess]:
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "stringData": minio_env},
                  namespace=namespace)
    # The fake GPU nodes are H200s (harness.cluster.GPU_PRODUCT); the other pools get 80Gi.
    op = OperatorProcess(cluster, namespace, tmp_path, "--preflight-gpu-memory", "NVIDIA-H200=141Gi,default=80Gi")
    op.start(wait_ready=False)
    wait_until(op.ready, 180, f"the operator to be ready (log: {op.log_path})")
    yield op
    op.stop()


def manifest(name: str, train: str, metrics_port: int) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION, "kind": c.KIND,
        # The fake kubelet runs the pods (preflight and trainer) instead of kwok.
        "metadata": {"name": name, "labels": {STAGE_KWOK_SKIP: "true"},
                     "annotations": {METRICS_URL_ANNOTATION: f"http://127.0.0.1:{metrics_port}/metrics"}},
        "spec": {
            "model": {"uri": MODEL},
            "dataset": {"train": train, "format": "prompt_completion", "maxSeqLength": 64, "validationSplit": 0.25},
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}},
            "hyperparameters": {"maxSteps": 2, "batchSize": 4},
            "resources": {"gpusPerNode": 1, "nodeSelector": {c.GPU_PRODUCT_LABEL: "NVIDIA-H200"}},
            "evaluation": {"baseline": False},
            "output": {"uri": f"s3://{BUCKET}/out/{name}", "credentialsSecret": {"name": SECRET}},
        },
    }


def jobs(cluster: TestCluster, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: j for j in children(cluster, namespace, name, "jobs")}


def run_to_phase(cluster: TestCluster, namespace: str, k8s_client: Any, op: OperatorProcess, tmp_path: Path,
                 doc: dict[str, Any], phase: str, timeout: float,
                 metrics_port: int | None = None) -> tuple[dict[str, Any], FakeKubelet, str]:
    """Apply the FineTuneJob with the fake kubelet running its pods; its status once in `phase`, the
    kubelet (what it ran) and the tail of each pod's log."""
    extra_env = {"OMP_NUM_THREADS": "1"}
    if metrics_port is not None:
        extra_env[c.Env.METRICS_PORT] = str(metrics_port)
    with FakeKubelet(k8s_client, namespace, tmp_path / "kubelet", path=[VENV_BIN], extra_env=extra_env) as kubelet:
        cluster.apply(doc, namespace=namespace)
        status = wait_phase(cluster, namespace, doc["metadata"]["name"], phase, timeout=timeout, op=op)
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in kubelet.logs.values())
    return status, kubelet, logs


def test_bad_data_fails_the_job_before_any_gpu_job_or_pod_exists(
    cluster: TestCluster, namespace: str, k8s_client: Any, inputs: dict[str, str],
    preflight_operator: OperatorProcess, tmp_path: Path,
) -> None:
    port = free_port()
    status, kubelet, logs = run_to_phase(cluster, namespace, k8s_client, preflight_operator, tmp_path,
                                         manifest("bad", inputs["bad"], port), c.Phase.FAILED, 300, port)
    failed = condition(status, c.ConditionType.FAILED)
    assert failed is not None and failed["reason"] == c.Reason.INVALID_DATA, f"{json.dumps(status, indent=1)}\n{logs}"
    # The loader's one line: the file, the line, what was wrong.
    assert failed["message"].startswith(f"{inputs['bad']}: line 3"), failed
    checked = condition(status, c.ConditionType.DATA_CHECKED)
    assert checked is not None and (checked["status"], checked["reason"]) == ("False", c.Reason.INVALID_DATA)
    # One pod ran, the preflight's, with its exit code 42; no GPU Job was ever made.
    assert list(kubelet.handled.values()) == [c.ExitCode.PERMANENT]
    assert set(jobs(cluster, namespace, "bad")) == {"bad-preflight"}
    pods = children(cluster, namespace, "bad", "pods")
    assert [p["metadata"]["labels"][c.LABEL_COMPONENT] for p in pods] == ["preflight"]
    assert not any(c.GPU_RESOURCE in json.dumps(ct.get("resources")) for p in pods for ct in p["spec"]["containers"])
    told = [(e["type"], e["reason"]) for e in events(cluster, namespace, "bad")]
    assert ("Normal", c.Reason.CHECKING_DATA) in told and ("Warning", c.Reason.INVALID_DATA) in told, told
    assert "jobName" not in status


def test_good_data_passes_lands_in_status_and_then_the_gpu_job_runs(
    cluster: TestCluster, namespace: str, k8s_client: Any, inputs: dict[str, str],
    preflight_operator: OperatorProcess, tmp_path: Path,
) -> None:
    port = free_port()
    status, kubelet, logs = run_to_phase(cluster, namespace, k8s_client, preflight_operator, tmp_path,
                                         manifest("good", inputs["good"], port), c.Phase.SUCCEEDED, 600, port)
    checked = condition(status, c.ConditionType.DATA_CHECKED)
    assert checked is not None and (checked["status"], checked["reason"]) == ("True", c.Reason.DATA_VALID), logs
    check = status["dataCheck"]
    assert check["rows"] == 48 and check["tokens"] > 48 and check["truncatedShare"] == 0
    # Checked against the H200 pool's memory the operator was given; a tiny model fits with room.
    assert check["gpuMemoryBytes"] == 141 * 2**30 and 0 < check["memoryPerGpuBytes"] < check["gpuMemoryBytes"]
    assert check["largestBatch"] >= 4
    # The preflight pod ran first, then the GPU Job's pod: both exited 0.
    assert list(kubelet.handled.values()) == [0, 0], logs
    pods = sorted(children(cluster, namespace, "good", "pods"), key=lambda p: p["metadata"]["creationTimestamp"])
    assert [p["metadata"]["labels"][c.LABEL_COMPONENT] for p in pods] == ["preflight", "trainer"]
    preflight_done = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
    assert pods[1]["metadata"]["creationTimestamp"] >= preflight_done
    assert set(jobs(cluster, namespace, "good")) == {"good-preflight", "good"} and status["jobName"] == "good"
    told = [e["reason"] for e in events(cluster, namespace, "good")]
    assert told.index(c.Reason.CHECKING_DATA) < told.index(c.Reason.DATA_VALID) < told.index(c.Reason.CREATED), told
    assert status["artifact"]["uri"] == f"s3://{BUCKET}/out/good"


def test_a_plan_that_does_not_fit_the_pools_gpus_fails_with_will_not_fit(
    cluster: TestCluster, namespace: str, k8s_client: Any, inputs: dict[str, str],
    preflight_operator: OperatorProcess, tiny_tokenizer_dir: Path, tmp_path: Path,
) -> None:
    """Full fine-tuning of a model of Llama 3.1 8B's shape (its config and a tokenizer in MinIO, no
    weights: the preflight never reads them) on a pool of 40 GiB GPUs, named by GPU feature
    discovery's memory label in the nodeSelector."""
    from transformers import LlamaConfig

    folder = tmp_path / "llama-8b-shape"
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(folder)
    fs, _ = storage.resolve(f"s3://{BUCKET}")
    for f in [folder / "config.json", *tiny_tokenizer_dir.iterdir()]:
        fs.put_file(str(f), f"{BUCKET}/models/llama-8b-shape/{f.name}")
    port = free_port()
    doc = manifest("big", inputs["good"], port)
    doc["spec"]["model"] = {"uri": f"s3://{BUCKET}/models/llama-8b-shape"}
    doc["spec"]["method"] = {"type": "full"}
    doc["spec"]["resources"] = {"gpusPerNode": 1, "nodeSelector": {c.GPU_MEMORY_LABEL: "40960"}}
    status, kubelet, logs = run_to_phase(cluster, namespace, k8s_client, preflight_operator, tmp_path,
                                         doc, c.Phase.FAILED, 300)
    failed = condition(status, c.ConditionType.FAILED)
    assert failed is not None and failed["reason"] == c.Reason.WILL_NOT_FIT, f"{json.dumps(status, indent=1)}\n{logs}"
    assert failed["message"].startswith("will not fit: needs about ") and "the GPU has 40.0 GiB" in failed["message"]
    check = status["dataCheck"]
    assert check["gpuMemoryBytes"] == 40960 * 2**20 and check["memoryPerGpuBytes"] > check["gpuMemoryBytes"]
    assert check["largestBatch"] == 0 and check["rows"] == 48
    assert list(kubelet.handled.values()) == [c.ExitCode.PERMANENT]
    assert set(jobs(cluster, namespace, "big")) == {"big-preflight"}
