"""Preemption end to end, with Kueue's real controller and the real trainer.

A low-priority FineTuneJob trains (its pod run by the fake kubelet: `finetune train` on the tiny
model, data and checkpoints in MinIO) on all 8 GPUs of the queue. A high-priority one arrives:
Kueue evicts the low one -> suspends its Job -> the Job controller deletes the pod -> the kubelet
sends SIGTERM -> the trainer saves a checkpoint and exits 43 -> the pod fails in a way the Job's
podFailurePolicy ignores (no backoff counted) -> the FineTuneJob is Pending again, waiting for
Kueue. When the high one finishes, Kueue readmits the low one; its new pod resumes from the
checkpoint and finishes with the same adapter weights as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api import constants as c
from finetune_api.status import TerminationMessage
from finetune_trainer import storage
from harness.cluster import STAGE_HOLD, STAGE_KWOK_SKIP, free_port, wait_until
from harness.kubelet import FakeKubelet
from harness.kueue import HIGH_PRIORITY, LOW_PRIORITY, KueueCluster, Queues
from harness.s3_inputs import publish_model_once, s3_bucket
from harness.step_watch import StepWatch
from operator_harness import (
    METRICS_URL_ANNOTATION,
    OperatorProcess,
    condition,
    events,
    ftj_status,
    wait_phase,
    wait_status,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
BUCKET = "kueue-preemption"
# Long enough (about 20 s of the tiny model on an idle core) that the preemption, which starts
# only once the operator's status shows a few steps, lands in the middle of training.
MAX_STEPS = 1200


def spec(q: Queues, output: str, gpus: int) -> dict[str, Any]:
    return {
        "model": {"uri": f"s3://{BUCKET}/models/tiny-llama"},
        "dataset": {"train": f"s3://{BUCKET}/data/train.jsonl", "format": "prompt_completion",
                    "maxSeqLength": 64, "validationSplit": 0.25},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "hyperparameters": {"maxSteps": MAX_STEPS, "batchSize": 8, "learningRate": 1.0e-2,
                            "scheduler": "constant", "warmupRatio": 0.0, "seed": 7},
        "resources": {"gpusPerNode": gpus},
        # No periodic checkpoint before the end: the one the job resumes from is the SIGTERM one.
        "checkpointing": {"everySteps": MAX_STEPS, "keep": 2, "resume": "auto"},
        "output": {"uri": output, "credentialsSecret": {"name": "s3-credentials"}, "save": ["adapter"]},
        "queueName": q.local_queue,
        # This tests preemption of the GPU Job; the preflight before it has its own tests (tests/operator).
        "preflight": {"enabled": False},
    }


def ftj(name: str, q: Queues, labels: dict[str, str], annotations: dict[str, str], gpus: int = 8) -> dict[str, Any]:
    return {"apiVersion": c.API_VERSION, "kind": c.KIND,
            "metadata": {"name": name, "namespace": q.namespace, "labels": labels, "annotations": annotations},
            "spec": spec(q, f"s3://{BUCKET}/out/{q.namespace}/{name}", gpus)}


@pytest.fixture
def inputs(minio_env: dict[str, str], tiny_model_dir: Path, toy_data_dir: Path,
           monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in minio_env.items():
        monkeypatch.setenv(k, v)
    fs = s3_bucket(BUCKET)
    publish_model_once(tiny_model_dir, f"s3://{BUCKET}/models/tiny-llama")
    fs.put_file(str(toy_data_dir / "prompt_completion.jsonl"), f"{BUCKET}/data/train.jsonl")


def adapter_weights(uri: str, dest: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    local = storage.fetch(uri, dest)
    return dict(load_file(str(local / "adapter_model.safetensors")))


def test_high_priority_job_preempts_training_which_resumes_from_its_sigterm_checkpoint(
    kueue_cluster: KueueCluster, queues: Queues, kueue_operator: OperatorProcess, inputs: None,
    minio_env: dict[str, str], tmp_path: Path,
) -> None:
    cluster, ns = kueue_cluster.cluster, queues.namespace
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                   "stringData": dict(minio_env)}, namespace=ns)
    port = free_port()
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    low = ftj("low", queues, labels={STAGE_KWOK_SKIP: "true", c.KUEUE_PRIORITY_CLASS_LABEL: LOW_PRIORITY},
              annotations={METRICS_URL_ANNOTATION: metrics_url})
    high = ftj("high", queues, labels={c.KUEUE_PRIORITY_CLASS_LABEL: HIGH_PRIORITY},
               annotations={STAGE_HOLD: "true"})
    low_out = low["spec"]["output"]["uri"]
    api = cluster.api_client()
    try:
        # The fake GPU node runs the pod on this CPU: one trainer process, not one per GPU.
        env = {c.Env.METRICS_PORT: str(port), c.Env.NPROC_PER_NODE: "1", "OMP_NUM_THREADS": "1"}
        with FakeKubelet(api, ns, tmp_path / "kubelet", path=[str(VENV_BIN)], extra_env=env) as kubelet:
            cluster.apply(low)
            first = StepWatch(metrics_url)

            def training() -> bool:
                if kubelet.errors:
                    raise AssertionError(f"fake kubelet: {kubelet.errors}")
                return bool((ftj_status(cluster, ns, "low").get("progress") or {}).get("step", 0) >= 2)

            try:
                wait_until(training, 300, "the low-priority job to train a few steps", interval=0.3)
            except (AssertionError, TimeoutError) as exc:
                pods = cluster.kubectl("get", "pods", "-n", ns, "-o", "wide").stdout
                described = cluster.kubectl("describe", "pods", "-n", ns).stdout[-3000:]
                logs = {n: p.read_text(errors="replace")[-1500:] for n, p in kubelet.logs.items()}
                raise AssertionError(f"{exc}\n{json.dumps(ftj_status(cluster, ns, 'low'), indent=1)}\n{pods}\n"
                                     f"{described}\nkubelet handled {kubelet.handled}, logs {logs}\n"
                                     f"operator log:\n{kueue_operator.log_tail()}") from None
            job = cluster.get_json("job", "low", "-n", ns)
            assert job["metadata"]["labels"][c.KUEUE_PRIORITY_CLASS_LABEL] == LOW_PRIORITY

            # The high-priority job needs all 8 GPUs: Kueue preempts the low one.
            cluster.apply(high)
            ((pod1, code1),) = kubelet.wait_for(pod_count=1, timeout=120).items()
            last_step = first.stop()
            log1 = kubelet.logs[pod1].read_text(errors="replace")
            assert code1 == c.ExitCode.PREEMPTED, log1[-3000:]
            assert pod1 in kubelet.terminated_at, "the trainer stopped, but not because the kubelet sent SIGTERM"
            m = re.search(r"SIGTERM received: saving a checkpoint at step (\d+)", log1)
            assert m, log1[-3000:]
            sigterm_step = int(m.group(1))
            assert 2 <= sigterm_step < MAX_STEPS, "the preemption must come in the middle of training"
            ((ckpt_step, _),) = storage.list_complete_checkpoints(f"{low_out}/{c.CHECKPOINTS_DIR}")
            assert ckpt_step == sigterm_step
            message = TerminationMessage.model_validate_json(
                (tmp_path / "kubelet" / pod1 / "termination-log").read_bytes())
            assert message.last_checkpoint is not None and message.last_checkpoint.step == ckpt_step
            # Optimizer steps the preemption cost: those done after the checkpoint it resumes from.
            lost = last_step - ckpt_step
            assert lost <= 0, f"{lost} optimizer steps lost (metrics showed {last_step}, checkpoint {ckpt_step})"

            # Back to waiting, not failed, nothing counted against backoffLimit.
            st = wait_status(cluster, ns, "low",
                             lambda s: s.get("phase") == c.Phase.PENDING
                             and (condition(s, c.ConditionType.ADMITTED) or {}).get("status") == "False",
                             "the preempted job to wait in the queue again", timeout=60, op=kueue_operator)
            assert condition(st, c.ConditionType.RUNNING)["reason"] == c.Reason.QUEUED  # type: ignore[index]
            wait_until(lambda: any(e["reason"] == c.Reason.QUEUED and e["type"] == "Warning"
                                   for e in events(cluster, ns, "low")), 30, "a Warning event: back in the queue")
            job = cluster.get_json("job", "low", "-n", ns)
            assert job["spec"]["suspend"] is True
            assert job["status"].get("failed", 0) == 0, job["status"]
            wait_phase(cluster, ns, "high", c.Phase.RUNNING, timeout=60, op=kueue_operator)

            # The high-priority job finishes; Kueue readmits the low one, which resumes.
            for pod in cluster.get_json("pods", "-n", ns, "-l", f"{c.LABEL_JOB_NAME}=high")["items"]:
                cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", ns, "--overwrite",
                                f"{STAGE_HOLD}=false")
            wait_phase(cluster, ns, "high", c.Phase.SUCCEEDED, timeout=60, op=kueue_operator)
            st = wait_phase(cluster, ns, "low", c.Phase.SUCCEEDED, timeout=600, op=kueue_operator)
            done = kubelet.wait_for(pod_count=2, timeout=60)
        pod2 = next(p for p in done if p != pod1)
        assert done[pod2] == 0
        log2 = kubelet.logs[pod2].read_text(errors="replace")
        assert f"resuming from checkpoint step {ckpt_step} " in log2, log2[-3000:]
        assert cluster.get_json("job", "low", "-n", ns)["status"].get("failed", 0) == 0
        assert (condition(st, c.ConditionType.ADMITTED) or {}).get("status") == "True"
    finally:
        api.close()

    # The same spec, never interrupted, on this machine: the same adapter.
    manifest = tmp_path / "baseline.yaml"
    manifest.write_text(yaml.safe_dump(ftj("baseline", queues, {}, {})))
    baseline_out = f"s3://{BUCKET}/out/{ns}/baseline"
    run = subprocess.run([str(VENV_BIN / "finetune"), "run", str(manifest), "--output", baseline_out,
                          "--no-progress", "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # as in the pod: same sums, same order
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    import torch

    resumed, baseline = adapter_weights(low_out, tmp_path / "resumed"), adapter_weights(baseline_out, tmp_path / "b")
    assert resumed.keys() == baseline.keys() and resumed
    for k in baseline:
        torch.testing.assert_close(resumed[k], baseline[k], rtol=1e-5, atol=1e-6, msg=f"weights differ in {k}")
    print(json.dumps({"preempted_at_step": sigterm_step, "checkpoint_step": ckpt_step,
                      "optimizer_steps_lost": max(lost, 0), "max_steps": MAX_STEPS}))
    assert ftj_status(cluster, ns, "low")["phase"] == c.Phase.SUCCEEDED
