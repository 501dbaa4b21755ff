"""finetune_api.layout: where checkpoints live and which URIs are paths in the trainer's pod; the
trainer's storage layer and URI resolution use the same functions."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_api import layout
from finetune_api.constants import PVC_MOUNT_ROOT


def test_checkpoints_live_under_the_output() -> None:
    assert layout.checkpoints_uri("s3://bucket/jobs/a/") == "s3://bucket/jobs/a/checkpoints"
    assert layout.step_uri(layout.checkpoints_uri("/out"), 300) == "/out/checkpoints/step-300"


@pytest.mark.parametrize(("uri", "path"), [
    ("pvc://models/llama/v1", f"{PVC_MOUNT_ROOT}/models/llama/v1"),  # mounted by the operator: read in place
    ("file:///data/train.jsonl", "/data/train.jsonl"),
    ("/data/train.jsonl", "/data/train.jsonl"),
    ("./train.jsonl", "./train.jsonl"),
    ("../train.jsonl", "../train.jsonl"),
    ("s3://bucket/train.jsonl", None),
    ("HuggingFaceTB/SmolLM2-135M", None),
    ("hf://HuggingFaceTB/SmolLM2-135M", None),
])
def test_local_uris(uri: str, path: str | None) -> None:
    assert layout.local_path(uri) == path
    assert layout.is_local(uri) is (path is not None)


def test_trainer_decides_locality_with_the_same_function(tmp_path: Path) -> None:
    """pvc:// was remote for the trainer's URI resolution and local for its storage layer."""
    from finetune_trainer import storage, uris

    assert uris.is_local is layout.is_local and storage.is_local is layout.is_local
    assert uris.resolve("pvc://models/llama", tmp_path) == Path(PVC_MOUNT_ROOT, "models/llama")
    assert storage.resolve("pvc://models/llama")[1] == f"{PVC_MOUNT_ROOT}/models/llama"
    assert uris.resolve("org/model", tmp_path) is None  # a Hugging Face id
