"""MinIO: the S3 endpoint tests and the trainer's storage code use (s3fs through fsspec)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
from harness.cluster import MinioServer

pytestmark = pytest.mark.cluster


def test_bucket_write_read_with_explicit_endpoint(minio: MinioServer) -> None:
    fs = fsspec.filesystem(
        "s3", key=minio.access_key, secret=minio.secret_key, endpoint_url=minio.endpoint,
        client_kwargs={"region_name": minio.region}, skip_instance_cache=True,
    )
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    assert fs.exists(bucket)
    payload = b"adapter weights \x00\x01" * 1000
    fs.pipe(f"{bucket}/run-1/adapter.safetensors", payload)
    assert fs.cat(f"{bucket}/run-1/adapter.safetensors") == payload
    assert fs.ls(f"{bucket}/run-1", detail=False) == [f"{bucket}/run-1/adapter.safetensors"]
    with fs.open(f"{bucket}/run-1/metrics.jsonl", "w") as f:
        f.write('{"step": 1, "loss": 2.5}\n')
    with fsspec.open(f"s3://{bucket}/run-1/metrics.jsonl", "r", key=minio.access_key,
                     secret=minio.secret_key, endpoint_url=minio.endpoint) as f:
        assert f.read() == '{"step": 1, "loss": 2.5}\n'


def test_env_dict_alone_configures_s3fs(minio: MinioServer, minio_env: dict[str, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a trainer pod gets: only the AWS_* variables, no explicit endpoint or keys."""
    assert set(minio_env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"}
    for key, value in minio_env.items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    bucket = f"env-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/x.txt", b"hello")
    assert fs.cat(f"{bucket}/x.txt") == b"hello"
    # Wrong credentials are refused: the server really checks them.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key")
    bad = fsspec.filesystem("s3", skip_instance_cache=True)
    with pytest.raises(PermissionError):
        bad.cat(f"{bucket}/x.txt")


def test_trainer_storage_publishes_and_fetches_through_minio(
    minio_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The trainer's storage layer (finetune_trainer.storage), configured by the env dict only."""
    from finetune_trainer import storage

    for key, value in minio_env.items():
        monkeypatch.setenv(key, value)
    bucket = f"st-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    files = {"adapter_model.safetensors": b"\x00weights" * 4096, "sub/adapter_config.json": b'{"r": 16}'}
    for rel, data in files.items():
        (src / rel).write_bytes(data)

    uri = f"s3://{bucket}/runs/r1/adapter"
    manifest, artifact = storage.publish(src, uri, kind="artifact")
    assert artifact.uri == uri and sorted(f.path for f in manifest.files) == sorted(files)
    back = storage.fetch(uri, tmp_path / "back")
    assert {rel: (back / rel).read_bytes() for rel in files} == files
