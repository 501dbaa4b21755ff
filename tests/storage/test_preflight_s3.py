"""The preflight on object storage: data and model on MinIO, only the model's small files fetched."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from finetune_api.resource import parse_spec
from finetune_trainer import preflight, storage

pytestmark = pytest.mark.cluster


@pytest.fixture
def model_bucket(minio_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> tuple[str, Any]:
    """A new bucket holding the tiny model's files at models/tiny (no manifest: the preflight reads
    the folder as a user's upload), and its filesystem; MinIO's credentials in the environment."""
    for key, value in minio_env.items():
        monkeypatch.setenv(key, value)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.resolve(f"s3://{bucket}")
    fs.mkdir(bucket)
    fs.put(str(tiny_model_dir), f"{bucket}/models/tiny", recursive=True)
    return bucket, fs


def test_preflight_reads_s3_data_and_only_the_models_config_and_tokenizer(
        model_bucket: tuple[str, Any], make_spec: Callable[..., dict[str, Any]], toy_data_dir: Path,
        tmp_path: Path) -> None:
    bucket, fs = model_bucket
    fs.put_file(str(toy_data_dir / "messages.jsonl"), f"{bucket}/data/part-0.jsonl")
    fs.put_file(str(toy_data_dir / "messages.jsonl"), f"{bucket}/data/part-1.jsonl")
    spec = parse_spec(make_spec(f"s3://{bucket}/out", model={"uri": f"s3://{bucket}/models/tiny"},
                                dataset={"train": f"s3://{bucket}/data/*.jsonl", "format": "messages",
                                         "maxSeqLength": 128}))
    report = preflight.run(spec, tmp_path / "work")
    assert not report.errors, report.errors
    assert report.rows == 96 and report.plan is not None and report.plan.setup.shape.params > 0
    fetched = {p.name for p in (tmp_path / "work").rglob("*") if p.is_file()}
    assert "config.json" in fetched and "tokenizer.json" in fetched
    assert not any(name.endswith(".safetensors") for name in fetched), fetched


def test_a_bad_row_in_s3_data_is_named_by_its_object_uri_not_the_local_copy(
        model_bucket: tuple[str, Any], make_spec: Callable[..., dict[str, Any]], toy_data_dir: Path,
        tmp_path: Path) -> None:
    bucket, fs = model_bucket
    fs.put_file(str(toy_data_dir / "prompt_completion.jsonl"), f"{bucket}/data/part-0.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a?", "completion": " b"}\n{"prompt": "c?", "completion": null}\n', encoding="utf-8")
    fs.put_file(str(bad), f"{bucket}/data/part-1.jsonl")
    for train, named in ((f"s3://{bucket}/data/*.jsonl", f"s3://{bucket}/data/part-1.jsonl"),
                         (f"s3://{bucket}/data/part-1.jsonl", f"s3://{bucket}/data/part-1.jsonl"),
                         (f"s3://{bucket}/data/", f"s3://{bucket}/data/part-1.jsonl")):
        spec = parse_spec(make_spec(f"s3://{bucket}/out", model={"uri": f"s3://{bucket}/models/tiny"},
                                    dataset={"train": train, "format": "prompt_completion"}))
        report = preflight.run(spec, tmp_path / "work")
        assert report.errors and report.errors[0].startswith(f"{named}: line 2: "), report.errors
        assert "'completion'" in report.errors[0]
        assert str(tmp_path) not in report.errors[0]
