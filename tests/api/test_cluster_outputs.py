"""On the cluster an output must outlive the pod (s3://, pvc://); `finetune run` writes local paths."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from api.bad_manifests import BASE


def validate(path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finetune_cli.main", "validate", *flags, str(path)],
                          capture_output=True, text=True, timeout=120)


def manifest(tmp_path: Path, uri: str) -> Path:
    doc = copy.deepcopy(BASE)
    doc["spec"]["output"] = {"uri": uri}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("uri", ["file:///srv/out", "/srv/out", "./runs/out"])
def test_local_output_is_refused_for_the_cluster_and_fine_for_finetune_run(tmp_path: Path, uri: str) -> None:
    path = manifest(tmp_path, uri)
    cluster = validate(path)
    assert cluster.returncode == 1
    assert cluster.stderr.strip().splitlines() == [
        f'{path}: <root>: Invalid value: "object": spec.output.uri must be s3:// or pvc:// for a job on the '
        "cluster: a file:// or local path would be written inside the trainer's pod and deleted with it "
        "(local outputs are for finetune run)"]
    local = validate(path, "--local")
    assert local.returncode == 0, local.stderr


@pytest.mark.parametrize("uri", ["s3://models/out", "pvc://models-claim/out"])
def test_durable_output_is_accepted(tmp_path: Path, uri: str) -> None:
    result = validate(manifest(tmp_path, uri))
    assert result.returncode == 0, result.stderr
