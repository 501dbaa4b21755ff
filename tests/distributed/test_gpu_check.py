"""The GPU check script's code path, exercised on CPU with a tiny model (the real run needs an H200)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--cpu", "--steps", "3", "--warmup", "1", "--batch", "2",
         "--seq", "32", "--runs", "lora,qlora-4bit,dora", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    runs = {r["run"]: r for r in doc["results"]}
    assert set(runs) == {"lora", "qlora-4bit", "dora"}
    for r in runs.values():
        assert r["steps"] == 3 and r["tokens_per_second"] > 0 and r["first_loss"] is not None
        assert 0 < r["trainable_parameters"] < r["parameters"]
    assert "| lora |" in out.with_suffix(".md").read_text()
