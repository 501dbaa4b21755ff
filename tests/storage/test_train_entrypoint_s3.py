"""`finetune train` (the container's entry point) against MinIO, as the trainer pod runs it.

Model and data come from s3://, checkpoints and the artifact go to s3://; SIGTERM in the middle
exits PREEMPTED after a checkpoint, and the restarted trainer resumes from it and publishes an
artifact whose manifest sha256 is the one in the termination message.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from finetune_api.constants import Env, ExitCode, Reason
from finetune_api.status import TerminationMessage
from finetune_trainer import storage

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FINETUNE = Path(sys.executable).with_name("finetune")
MAX_STEPS, EVERY = 30, 10


def start(tmp: Path, name: str, spec: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[bytes]:
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **env,
        Env.SPEC_PATH: str(spec_path),
        Env.TERMINATION_LOG: str(tmp / f"{name}.termination"),
        Env.METRICS_PORT: "0",
    }
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([str(FINETUNE), "train"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)


def termination(tmp: Path, name: str) -> TerminationMessage:
    return TerminationMessage.model_validate_json((tmp / f"{name}.termination").read_bytes())


def tail(tmp: Path, name: str) -> str:
    return (tmp / f"{name}.log").read_text(errors="replace")[-4000:]


@pytest.fixture
def s3_job(
    minio_env: dict[str, str],
    tiny_model_dir: Path,
    toy_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[dict[str, Any], dict[str, str]]:
    for k, v in minio_env.items():
        monkeypatch.setenv(k, v)
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    fs, _ = storage.resolve(f"s3://{bucket}")
    fs.mkdir(bucket)
    storage.publish(tiny_model_dir, f"s3://{bucket}/models/tiny", kind="artifact")
    fs.put_file(str(toy_data_dir / "prompt_completion.jsonl"), f"{bucket}/data/train.jsonl")
    spec = {
        "model": {"uri": f"s3://{bucket}/models/tiny"},
        "dataset": {
            "train": f"s3://{bucket}/data/train.jsonl",
            "format": "prompt_completion",
            "maxSeqLength": 64,
            "validationSplit": 0.25,
        },
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "hyperparameters": {
            "maxSteps": MAX_STEPS,
            "batchSize": 8,
            "learningRate": 1e-2,
            "warmupRatio": 0.0,
            "scheduler": "constant",
            "seed": 7,
        },
        "resources": {"gpusPerNode": 0},
        "checkpointing": {"everySteps": EVERY, "keep": 2, "resume": "auto"},
        "output": {"uri": f"s3://{bucket}/out/job"},
    }
    env = {
        **os.environ,
        **minio_env,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    return spec, env


@pytest.mark.timeout(1200)
def test_finetune_train_preempted_then_resumed_on_s3(
    s3_job: tuple[dict[str, Any], dict[str, str]], tmp_path: Path
) -> None:
    spec, env = s3_job
    out = spec["output"]["uri"]
    ckpts = f"{out}/checkpoints"

    # Preempt once the first periodic checkpoint is complete in the bucket.
    proc = start(tmp_path, "first", spec, env)
    deadline = time.monotonic() + 600
    while not storage.list_complete_checkpoints(ckpts):
        assert proc.poll() is None, (
            f"exited {proc.returncode} before a checkpoint:\n{tail(tmp_path, 'first')}"
        )
        assert time.monotonic() < deadline, "no checkpoint in 600 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=300)
    assert code == ExitCode.PREEMPTED, tail(tmp_path, "first")
    msg = termination(tmp_path, "first")
    assert (msg.outcome, msg.reason) == ("preempted", Reason.PREEMPTED)
    assert msg.last_checkpoint is not None and msg.last_checkpoint.step >= EVERY
    newest = storage.list_complete_checkpoints(ckpts)[-1]
    assert (msg.last_checkpoint.step, msg.last_checkpoint.uri) == newest
    assert storage.read_manifest(out) is None, "a preempted run must not publish an artifact"

    # Restart: resumes from that checkpoint and finishes.
    proc = start(tmp_path, "second", spec, env)
    assert proc.wait(timeout=900) == 0, tail(tmp_path, "second")
    log = tail(tmp_path, "second")
    assert f"resuming from checkpoint step {newest[0]}" in (tmp_path / "second.log").read_text(
        errors="replace"
    ), log
    msg = termination(tmp_path, "second")
    assert msg.outcome == "succeeded" and msg.artifact is not None
    fs, root = storage.resolve(out)
    assert msg.artifact.sha256 == hashlib.sha256(fs.cat_file(f"{root}/manifest.json")).hexdigest()
    assert msg.artifact.uri == out
    manifest = storage.verify(out)
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json"} <= {
        f.path for f in manifest.files
    }
    assert json.loads(fs.cat_file(f"{root}/metrics.json"))["train"]["steps"] == MAX_STEPS

    # Credentials appear nowhere the trainer wrote.
    secret = env["AWS_SECRET_ACCESS_KEY"]
    for name in ("first", "second"):
        assert secret not in (tmp_path / f"{name}.log").read_text(errors="replace")
        assert secret not in (tmp_path / f"{name}.termination").read_text()
    assert secret.encode() not in fs.cat_file(f"{root}/manifest.json")


def test_finetune_train_missing_bucket_exits_permanent(
    s3_job: tuple[dict[str, Any], dict[str, str]], tmp_path: Path
) -> None:
    spec, env = s3_job
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out"
    spec = {**spec, "output": {"uri": missing}}
    proc = start(tmp_path, "missing", spec, env)
    assert proc.wait(timeout=300) == ExitCode.PERMANENT, tail(tmp_path, "missing")
    msg = termination(tmp_path, "missing")
    assert msg.outcome == "failed" and missing.split("/")[2] in msg.message
    assert "transient error" not in tail(tmp_path, "missing"), "a permanent error was retried"
    assert env["AWS_SECRET_ACCESS_KEY"] not in tail(tmp_path, "missing") + msg.message
