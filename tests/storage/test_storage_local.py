"""The storage layer on local paths: manifests, verification, checkpoint listing and pruning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from finetune_api import layout
from finetune_api.constants import MANIFEST_FILE, PVC_MOUNT_ROOT
from finetune_api.status import Manifest
from finetune_trainer import storage
from finetune_trainer.storage import IntegrityError, StorageError


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


FILES = {
    "adapter_config.json": b'{"r": 8}',
    "weights/a.safetensors": bytes(range(256)) * 1000,
    "README.md": b"hi",
}


def test_publish_writes_manifest_describing_every_file(tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src", FILES)
    dest = f"file://{tmp_path}/out"
    manifest, artifact = storage.publish(
        src, dest, kind="artifact", spec={"method": {"type": "lora"}}, versions={"peft": "0.21.2"}
    )

    raw = (tmp_path / "out" / MANIFEST_FILE).read_bytes()
    assert artifact.sha256 == hashlib.sha256(raw).hexdigest()
    assert artifact.size_bytes == sum(len(b) for b in FILES.values())
    assert artifact.uri == dest
    on_disk = Manifest.model_validate_json(raw)
    assert on_disk == manifest
    assert {f.path: (f.sha256, f.size_bytes) for f in on_disk.files} == {
        rel: (hashlib.sha256(data).hexdigest(), len(data)) for rel, data in FILES.items()
    }
    assert json.loads(raw)["versions"] == {"peft": "0.21.2"}
    assert storage.verify(dest) == manifest
    assert storage.artifact_of(dest) == artifact
    # Local URIs are read in place.
    assert storage.fetch(dest, tmp_path / "unused") == tmp_path / "out"
    assert not (tmp_path / "unused").exists()


def test_verify_detects_a_changed_or_missing_file(tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src", FILES)
    out = tmp_path / "out"
    storage.publish(src, str(out), kind="artifact")
    (out / "README.md").write_bytes(b"ho")  # same size, other bytes
    with pytest.raises(IntegrityError, match=r"README\.md: sha256/size mismatch"):
        storage.verify(str(out))
    (out / "README.md").unlink()
    with pytest.raises(StorageError, match=r"README\.md") as err:
        storage.verify(str(out))
    assert err.value.permanent


def test_prefix_without_manifest_is_incomplete(tmp_path: Path) -> None:
    out = make_dir(tmp_path / "out", FILES)  # files but no manifest: an interrupted upload
    assert storage.read_manifest(str(out)) is None
    assert storage.artifact_of(str(out)) is None
    with pytest.raises(StorageError, match="incomplete"):
        storage.verify(str(out))


def test_republish_replaces_the_manifest(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    storage.publish(make_dir(tmp_path / "a", {"x.bin": b"1"}), out, kind="checkpoint", step=5)
    manifest, _ = storage.publish(
        make_dir(tmp_path / "b", {"x.bin": b"22", "y.bin": b"3"}), out, kind="checkpoint", step=5
    )
    assert storage.verify(out) == manifest
    assert [f.path for f in manifest.files] == ["x.bin", "y.bin"]
    # A stale manifest in the source folder is never uploaded as a file of the new one.
    src = make_dir(tmp_path / "c", {"z": b"z", MANIFEST_FILE: b"{}"})
    manifest, _ = storage.publish(src, out, kind="checkpoint", step=6)
    assert [f.path for f in manifest.files] == ["z"]


def test_checkpoint_listing_and_pruning(tmp_path: Path) -> None:
    ckpts = f"file://{tmp_path}/checkpoints"
    for step in (10, 20, 30, 40):
        storage.publish(
            make_dir(tmp_path / f"s{step}", {"w": str(step).encode()}),
            layout.step_uri(ckpts, step),
            kind="checkpoint",
            step=step,
        )
    # Incomplete ones: an old leftover and one newer than every complete one (upload in progress).
    make_dir(tmp_path / "checkpoints" / "step-5", {"w": b"partial"})
    make_dir(tmp_path / "checkpoints" / "step-50", {"w": b"partial"})
    (tmp_path / "checkpoints" / "not-a-step").mkdir()

    assert storage.list_complete_checkpoints(ckpts) == [(s, f"{ckpts}/step-{s}") for s in (10, 20, 30, 40)]
    storage.prune_checkpoints(ckpts, keep=2)
    assert [s for s, _ in storage.list_complete_checkpoints(ckpts)] == [30, 40]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["not-a-step", "step-30", "step-40", "step-50"]
    assert storage.list_complete_checkpoints(f"file://{tmp_path}/nothing-here") == []


def test_resolve_maps_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.resolve("pvc://models/llama/v1")[1] == f"{PVC_MOUNT_ROOT}/models/llama/v1"
    assert storage.resolve(f"file://{tmp_path}/x/")[1] == f"{tmp_path}/x"
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("./data/train.jsonl")[1] == f"{tmp_path}/data/train.jsonl"
    assert storage.is_local("./data") and not storage.is_local("s3://bucket/x")
    with pytest.raises(StorageError, match="not a storage URI") as err:
        storage.resolve("HuggingFaceTB/SmolLM2-135M")
    assert err.value.permanent
    with pytest.raises(StorageError, match="no such file"):
        storage.fetch(f"file://{tmp_path}/missing", tmp_path)


def test_transient_errors_are_retried_and_permanent_ones_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.setattr(
        storage, "RETRY", storage.RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.02)
    )
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        return "ok"

    assert storage._retry("upload to", "s3://b/k", flaky) == "ok"
    assert len(calls) == 3

    calls.clear()

    def denied() -> None:
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(StorageError) as err:
        storage._retry("upload to", "s3://b/k", denied)
    assert err.value.permanent and len(calls) == 1 and "s3://b/k" in str(err.value)

    calls.clear()

    def down() -> None:
        calls.append(1)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    with pytest.raises(StorageError, match="after 4 attempts") as err:
        storage._retry("upload to", "s3://b/k", down)
    assert not err.value.permanent and len(calls) == 4


def test_error_messages_never_carry_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    err = StorageError(
        "upload to s3://b/k failed: signature for s3cr3t-value-123 wrong", uri="s3://b/k", permanent=True
    )
    assert "s3cr3t-value-123" not in str(err) and "s3://b/k" in str(err)
    # The access key ID is not masked: it is an identifier, and masking it would mangle URIs.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "finetune")
    err = StorageError(
        "write to s3://finetune-quickstart/out failed", uri="s3://finetune-quickstart/out", permanent=True
    )
    assert "s3://finetune-quickstart/out" in str(err)
