"""Test inputs in the session's MinIO (credentials from the process environment, as storage.resolve reads them)."""

from __future__ import annotations

from pathlib import Path

import fsspec
from finetune_api import constants as c
from finetune_trainer import storage


def s3_bucket(name: str) -> fsspec.AbstractFileSystem:
    """The filesystem of s3://NAME, the bucket created when missing (tests share one MinIO per session)."""
    fs, _ = storage.resolve(f"s3://{name}")
    if not fs.exists(name):
        fs.mkdir(name)
    return fs


def publish_model_once(model_dir: Path, uri: str) -> None:
    """Publish the model folder at URI as an artifact (manifest last), unless its manifest is already there."""
    fs, path = storage.resolve(uri)
    if not fs.exists(f"{path}/{c.MANIFEST_FILE}"):
        storage.publish(model_dir, uri, kind="artifact")
