"""Every bad manifest the API server can judge (CRD schema and CEL rules) is rejected by
`kubectl apply` with the same message `finetune validate` prints (table: tests/api/bad_manifests.py)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from api.bad_manifests import BAD_MANIFESTS, Bad
from harness.cluster import TestCluster

pytestmark = pytest.mark.cluster

SERVER_JUDGED = [b for b in BAD_MANIFESTS if b.server]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-manifests")
    files = {}
    for bad in SERVER_JUDGED:
        files[bad.name] = folder / f"{bad.name}.yaml"
        files[bad.name].write_text(bad.text)
    return files


@pytest.fixture(scope="module")
def validate_errors(bad_files: dict[str, Path]) -> dict[str, str]:
    """`finetune validate` over all the files at once: its error lines, per manifest name."""
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.main", "validate", *map(str, bad_files.values())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    return {name: "\n".join(ln for ln in lines if ln.startswith(f"{path}: ")) for name, path in bad_files.items()}


@pytest.fixture(scope="module")
def bad_namespace(cluster: TestCluster) -> Iterator[str]:
    name = f"bad-manifests-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_the_table_has_server_judged_manifests() -> None:
    assert len(SERVER_JUDGED) >= 10, "too few bad manifests marked server=True"


@pytest.mark.parametrize("bad", SERVER_JUDGED, ids=lambda b: b.name)
def test_api_server_rejects_bad_manifest_like_finetune_validate(
    bad: Bad, cluster: TestCluster, bad_namespace: str, bad_files: dict[str, Path],
    validate_errors: dict[str, str],
) -> None:
    assert bad.message in validate_errors[bad.name], f"finetune validate said: {validate_errors[bad.name]!r}"
    applied = cluster.kubectl("apply", "-n", bad_namespace, "-f", str(bad_files[bad.name]), check=False)
    assert applied.returncode != 0, f"the API server accepted {bad.name}: {applied.stdout}"
    assert bad.message in applied.stderr, applied.stderr
