"""`finetune run` of every objective (sft, dpo, reward, ppo): exit 0, a summary in the objective's
own metrics, and a "load it with" snippet that, executed as printed, loads the artifact."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api.constants import API_VERSION, KIND, MANIFEST_FILE, ExitCode
from finetune_cli.main import main as finetune
from harness.snippets import load_snippet, run_snippet

HP = {"batchSize": 8, "scheduler": "constant", "warmupRatio": 0.0, "seed": 7}
LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def run_manifest(tmp: Path, name: str, spec: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}))
    code = finetune(["run", str(path), "--no-progress", "--metrics-port", "0"])
    out, err = capsys.readouterr()
    return code, out, err


def number(printed: str, label: str) -> list[float]:
    """The numbers on the summary line that starts with `label`."""
    m = re.search(rf"^  {re.escape(label)}\s+(.*)$", printed, re.M)
    assert m, f"no {label!r} line in:\n{printed}"
    return [float(x) for x in re.findall(r"-?\d+\.\d+", m.group(1))]


def test_sft(make_spec: Callable[..., dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sft"
    code, printed, err = run_manifest(tmp_path, "sft", make_spec(out, hyperparameters={**HP, "maxSteps": 4}), capsys)
    assert code == ExitCode.SUCCESS, err[-3000:]
    assert len(number(printed, "eval loss")) == 2 and len(number(printed, "perplexity")) == 2
    snippet = load_snippet(printed)
    assert run_snippet(snippet, "print(type(model).__name__, len(tokenizer))").startswith("PeftModelForCausalLM ")


def test_dpo(make_spec: Callable[..., dict[str, Any]], toy_data_dir: Path, tmp_path: Path,
             capsys: pytest.CaptureFixture[str]) -> None:
    """Today: trains, publishes, then exits 1 with KeyError: 'perplexity' while printing."""
    out = tmp_path / "dpo"
    spec = make_spec(out, dataset={"train": str(toy_data_dir / "preference.jsonl"), "format": "preference"},
                     objective={"type": "dpo"}, method=LORA, hyperparameters={**HP, "maxSteps": 4, "learningRate": 1e-2})
    code, printed, err = run_manifest(tmp_path, "dpo", spec, capsys)
    assert code == ExitCode.SUCCESS, err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    base, tuned = number(printed, "reward margin")
    assert (base, tuned) == (pytest.approx(metrics["base"]["rewardMargin"], abs=1e-3),
                             pytest.approx(metrics["tuned"]["rewardMargin"], abs=1e-3))
    assert len(number(printed, "preference accuracy")) == 2 and len(number(printed, "eval loss")) == 2
    assert "perplexity" not in printed
    assert run_snippet(load_snippet(printed), "print(type(model).__name__)").strip() == "PeftModelForCausalLM"


@pytest.fixture(scope="module")
def reward_model(make_spec: Callable[..., dict[str, Any]], toy_data_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A full reward model trained through `finetune run` (the PPO test scores with it)."""
    tmp = tmp_path_factory.mktemp("reward-run")
    spec = make_spec(tmp / "rm", dataset={"train": str(toy_data_dir / "preference.jsonl"), "format": "preference"},
                     method={"type": "full"}, objective={"type": "reward"},
                     hyperparameters={**HP, "maxSteps": 4, "learningRate": 3e-3})
    path = tmp / "reward.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "rm"}, "spec": spec}))
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.main", "run", str(path), "--no-progress",
                           "--metrics-port", "0"], capture_output=True, text=True, timeout=600)
    return {"code": proc.returncode, "out": proc.stdout, "err": proc.stderr, "uri": tmp / "rm"}


def test_reward(reward_model: dict[str, Any]) -> None:
    assert reward_model["code"] == ExitCode.SUCCESS, reward_model["err"][-3000:]
    printed = reward_model["out"]
    assert len(number(printed, "pair accuracy")) == 2 and len(number(printed, "reward margin")) == 2
    assert "perplexity" not in printed
    # A reward model is a sequence classifier: the printed snippet must load it as one.
    assert run_snippet(load_snippet(printed), "print(type(model).__name__, model.config.num_labels)").split() == [
        "LlamaForSequenceClassification", "1"]


def test_ppo(make_spec: Callable[..., dict[str, Any]], reward_model: dict[str, Any], tmp_path: Path,
             capsys: pytest.CaptureFixture[str]) -> None:
    assert (reward_model["uri"] / MANIFEST_FILE).is_file(), reward_model["err"][-3000:]
    out = tmp_path / "ppo"
    spec = make_spec(out, method=LORA, objective={"type": "ppo", "ppo": {
        "rewardModel": str(reward_model["uri"]), "responseLength": 4, "ppoEpochs": 1}},
        hyperparameters={**HP, "maxSteps": 2, "learningRate": 1e-2})
    code, printed, err = run_manifest(tmp_path, "ppo", spec, capsys)
    assert code == ExitCode.SUCCESS, err[-3000:]
    assert len(number(printed, "held-out reward")) == 2
    assert "perplexity" not in printed
    assert run_snippet(load_snippet(printed), "print(type(model).__name__)").strip() == "PeftModelForCausalLM"
