"""Publishing over an older artifact leaves exactly the new manifest's files (checkpoints/ aside),
on a local path and on S3 (MinIO); manifest.json gets the mode of the other files."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api.constants import API_VERSION, CHECKPOINTS_DIR, KIND, MANIFEST_FILE, ExitCode
from finetune_trainer import storage

OLD = {"adapter_model.safetensors": b"old-weights", "merged/model.safetensors": b"m" * 5000,
       "merged/config.json": b"{}", "old_tokenizer.json": b"{}"}
NEW = {"adapter_model.safetensors": b"new-weights!", "tokenizer.json": b'{"v": 2}'}


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def stored(uri: str) -> dict[str, bytes]:
    fs, root = storage.resolve(uri)
    return {k[len(root) + 1 :]: bytes(fs.cat_file(k)) for k in fs.find(root)}


def republish(uri: str, tmp: Path) -> None:
    """An older artifact with merged/ and a checkpoint, then a new one without merged/."""
    storage.publish(make_dir(tmp / "old", OLD), uri, kind="artifact", spec={"v": 1})
    storage.publish(make_dir(tmp / "ckpt", {"w.bin": b"c"}), f"{uri}/{CHECKPOINTS_DIR}/step-2", kind="checkpoint", step=2)
    manifest, _ = storage.publish(make_dir(tmp / "new", NEW), uri, kind="artifact", spec={"v": 2})
    assert {f.path for f in manifest.files} == set(NEW)
    on_store = stored(uri)
    # Exactly the new files, the manifest, and the checkpoint prefix (its own manifest) remain.
    assert set(on_store) == {*NEW, MANIFEST_FILE, f"{CHECKPOINTS_DIR}/step-2/w.bin",
                             f"{CHECKPOINTS_DIR}/step-2/{MANIFEST_FILE}"}, sorted(on_store)
    assert all(on_store[rel] == data for rel, data in NEW.items())
    assert storage.verify(uri) == manifest
    assert storage.list_complete_checkpoints(f"{uri}/{CHECKPOINTS_DIR}") == [(2, f"{uri}/{CHECKPOINTS_DIR}/step-2")]


def test_local_republish_removes_what_the_new_manifest_does_not_list(tmp_path: Path) -> None:
    out = tmp_path / "out"
    republish(f"file://{out}", tmp_path)
    assert not (out / "merged").exists(), "the emptied merged/ folder stays"


def test_local_manifest_has_the_mode_of_the_other_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    storage.publish(make_dir(tmp_path / "src", NEW), str(out), kind="artifact")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes[MANIFEST_FILE] == modes["adapter_model.safetensors"] == modes["tokenizer.json"], modes


def test_a_folder_that_never_held_an_artifact_keeps_its_other_files(tmp_path: Path) -> None:
    """Only an older artifact is cleared: a user's own folder (no manifest.json) is not emptied."""
    out = make_dir(tmp_path / "out", {"notes.txt": b"mine"})
    storage.publish(make_dir(tmp_path / "src", NEW), str(out), kind="artifact")
    assert (out / "notes.txt").read_bytes() == b"mine"


def test_checkpoint_republish_removes_stale_files(tmp_path: Path) -> None:
    """A step-N prefix saved again after a restart holds only the new save's files."""
    uri = str(tmp_path / "step-5")
    storage.publish(make_dir(tmp_path / "a", {"x.bin": b"1", "optimizer.pt": b"o"}), uri, kind="checkpoint", step=5)
    manifest, _ = storage.publish(make_dir(tmp_path / "b", {"x.bin": b"22"}), uri, kind="checkpoint", step=5)
    assert set(stored(uri)) == {"x.bin", MANIFEST_FILE}
    assert storage.verify(uri) == manifest


@pytest.mark.cluster
def test_s3_republish_removes_what_the_new_manifest_does_not_list(
    minio_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uuid

    for key, value in minio_env.items():
        monkeypatch.setenv(key, value)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.resolve(f"s3://{bucket}")
    fs.mkdir(bucket)
    # A sibling prefix that shares the name's beginning must not be touched.
    storage.publish(make_dir(tmp_path / "sib", {"keep.bin": b"k"}), f"s3://{bucket}/jobs/a-2", kind="artifact")
    republish(f"s3://{bucket}/jobs/a", tmp_path)
    assert set(stored(f"s3://{bucket}/jobs/a-2")) == {"keep.bin", MANIFEST_FILE}


def test_finetune_run_with_resume_never_replaces_the_older_artifact(
    make_spec: Callable[..., dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Today: the older run's merged/ (a whole model) stays beside the new manifest.json."""
    from finetune_cli.main import main as finetune

    out = tmp_path / "out"
    lora = {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    hp = {"maxSteps": 2, "batchSize": 8, "seed": 7}
    for i, save in enumerate((["adapter", "merged"], ["adapter"])):
        spec = make_spec(out, method=lora, hyperparameters=hp, checkpointing={"resume": "never"})
        spec["output"]["save"] = save
        job = tmp_path / f"job{i}.yaml"
        job.write_text(yaml.safe_dump({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "again"},
                                       "spec": spec}))
        assert finetune(["run", str(job), "--no-progress", "--metrics-port", "0"]) == ExitCode.SUCCESS, \
            capsys.readouterr().err[-3000:]
        capsys.readouterr()
    manifest = storage.verify(str(out))
    listed = {f.path for f in manifest.files}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not (out / "merged").exists()
    assert {p for p in on_disk if not p.startswith(f"{CHECKPOINTS_DIR}/")} == listed | {MANIFEST_FILE}
