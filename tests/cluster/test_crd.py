"""The FineTuneJob CRD and the examples on a real API server."""

from __future__ import annotations

import pytest
from api.test_examples import LOCAL_EXAMPLES
from harness.cluster import CRDS_DIR, REPO_ROOT, TestCluster

pytestmark = pytest.mark.cluster


def test_apply_crds_and_lora_example_then_get_ftj(cluster: TestCluster, namespace: str) -> None:
    out = cluster.kubectl("apply", "-f", str(CRDS_DIR)).stdout
    assert "customresourcedefinition.apiextensions.k8s.io/finetunejobs.finetune.dev" in out
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                    "crd/finetunejobs.finetune.dev")
    example = REPO_ROOT / "examples" / "lora.yaml"
    out = cluster.kubectl("apply", "-n", namespace, "-f", str(example)).stdout
    assert "finetunejob.finetune.dev/" in out and "created" in out

    table = cluster.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "METHOD", "MODEL", "PROGRESS", "LOSS", "AGE"], table
    assert len(table) == 2, table
    row = table[1].split()
    assert row[0] == "llama-lora-support"
    assert "lora" in row and "meta-llama/Llama-3.2-1B-Instruct" in row


def test_every_example_is_accepted_by_the_api_server(cluster: TestCluster, namespace: str) -> None:
    examples = sorted((REPO_ROOT / "examples").glob("*.yaml"))
    # Those for `finetune run` (a local output path) are refused by the API server on purpose.
    ftj = [p for p in examples if "kind: FineTuneJob" in p.read_text() and p.stem not in LOCAL_EXAMPLES]
    assert ftj, "no FineTuneJob examples in examples/"
    args = ["apply", "--dry-run=server", "-n", namespace]
    for p in ftj:
        args += ["-f", str(p)]
    proc = cluster.kubectl(*args, check=False)
    assert proc.returncode == 0, proc.stderr
