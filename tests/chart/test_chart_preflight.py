"""The chart's `preflight` values reach the operator's flags, as the operator parses them."""

from __future__ import annotations

import pytest
from finetune_operator.builders import GpuMemory, PreflightOptions
from finetune_operator.settings import parse_settings

from .helm import CHART, helm_binary, one, render, run_helm, set_args

pytestmark = pytest.mark.skipif(helm_binary() is None, reason="helm is not built (make tools)")

FULL = "ft-finetune-operator"


def settings_of(values: dict[str, object] | None = None, name: str = FULL) -> PreflightOptions:
    (container,) = one(render(values or {}), "Deployment", name)["spec"]["template"]["spec"]["containers"]
    return parse_settings(container["args"], env={}).preflight


def test_default_values_are_the_operators_defaults_and_name_no_gpu_memory() -> None:
    assert settings_of() == PreflightOptions()


def test_preflight_values_become_the_operators_settings() -> None:
    got = settings_of({"preflight": {"cpu": "500m", "memory": "1Gi", "memoryLimit": "4Gi", "scratchSize": "50Gi",
                                     "timeoutSeconds": 600,
                                     "gpuMemory": {"NVIDIA-H200": "141Gi", "NVIDIA-A100-SXM4-40GB": "40Gi",
                                                   "default": "80Gi"}}})
    assert got == PreflightOptions(
        cpu="500m", memory="1Gi", memory_limit="4Gi", scratch_size="50Gi", timeout_seconds=600,
        gpu_memory=GpuMemory(by_product=(("NVIDIA-A100-SXM4-40GB", "40Gi"), ("NVIDIA-H200", "141Gi")),
                             default="80Gi"))


@pytest.mark.parametrize("values, complaint", [
    ({"preflight": {"gpuMemory": {"NVIDIA-H200": "lots"}}}, "gpuMemory"),
    ({"preflight": {"timeoutSeconds": 0}}, "timeoutSeconds"),
    ({"preflight": {"memroy": "1Gi"}}, "memroy"),
])
def test_schema_rejects_bad_preflight_values(values: dict[str, object], complaint: str) -> None:
    proc = run_helm(["template", "ft", str(CHART), *set_args(values)], check=False)
    assert proc.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in proc.stderr and complaint in proc.stderr
