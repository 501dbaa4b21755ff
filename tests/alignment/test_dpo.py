"""DPO on the tiny model: held-out reward margin and preference accuracy rise; bad data exits 42."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_api.constants import API_VERSION, KIND, METRICS_FILE, ExitCode
from finetune_api.resource import parse_spec
from finetune_trainer import run_manifest
from finetune_trainer.runner import Overrides, run_job

QUIET = Overrides(serve_metrics=False, progress=False)


def dpo_spec(make_spec: Callable[..., dict[str, Any]], out: Path, train: Path, **sections: Any) -> dict[str, Any]:
    return make_spec(
        out,
        dataset={"train": str(train), "format": "preference", "validationSplit": 0.25},
        objective={"type": "dpo", "preference": {"beta": 0.1, "lossType": "sigmoid"}},
        hyperparameters={"maxSteps": 12, "batchSize": 8, "learningRate": 1e-2, "scheduler": "constant",
                         "warmupRatio": 0.0, "seed": 7},
        evaluation={"metrics": ["loss", "bleu", "rouge", "win_rate"], "generationSamples": 4, "maxNewTokens": 8},
        **sections,
    )


def test_dpo_lora_raises_margin_and_accuracy(make_spec: Callable[..., dict[str, Any]], toy_data_dir: Path,
                                             tmp_path: Path) -> None:
    spec = parse_spec(dpo_spec(make_spec, tmp_path / "out", toy_data_dir / "preference.jsonl"))
    result = run_job(spec, overrides=QUIET)
    m = result.metrics
    # Before training the LoRA adapter is zero, so policy == reference: margin 0, no pair won.
    assert m["base"]["rewardMargin"] == pytest.approx(0.0, abs=1e-6)
    assert m["tuned"]["rewardMargin"] > m["base"]["rewardMargin"] + 0.1
    assert m["tuned"]["preferenceAccuracy"] >= 0.9 > m["base"]["preferenceAccuracy"]
    # The policy itself moved toward the chosen answers and away from the rejected ones.
    assert (m["tuned"]["chosenLogp"] - m["tuned"]["rejectedLogp"]) > (m["base"]["chosenLogp"] - m["base"]["rejectedLogp"])
    assert m["tuned"]["evalLoss"] < m["base"]["evalLoss"]
    # Generation metrics ran on 4 held-out prompts and landed in metrics.json and the summary.
    gen = m["generation"]
    assert gen["generationSamples"] == 4 and 0 <= gen["win_rate"] <= 1 and 0 <= gen["rougeL"] <= 1
    on_disk = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
    assert on_disk["summary"]["rewardMargin"] == pytest.approx(m["tuned"]["rewardMargin"])
    assert "win_rate" in on_disk["summary"]
    # The artifact is an adapter (no second full model was needed for the reference).
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _manifest(tmp_path: Path, spec: dict[str, Any]) -> Path:
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "dpo-bad"}, "spec": spec}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


PAIRS = [{"prompt": f"What color is thing {i}?", "chosen": f" It is color {i}.", "rejected": " I do not know."}
         for i in range(8)]


@pytest.mark.parametrize(
    ("rows", "fields", "expected"),
    [
        ([{k: v for k, v in r.items() if k != "rejected"} for r in PAIRS], {},
         r"line 1: missing column 'rejected'"),
        ([{**r, "rejected": r["chosen"]} for r in PAIRS], {},
         r"column 'chosen' equals column 'rejected' in every row"),
        ([{**r, "q": ""} for r in PAIRS], {"prompt": "q"}, r"line 1: empty prompt: column 'q' is missing or empty"),
        ([*PAIRS[:3], {**PAIRS[3], "chosen": "  "}, *PAIRS[4:]], {}, r"line 4: column 'chosen' is empty"),
    ],
    ids=["missing-rejected", "identical-everywhere", "empty-prompt", "empty-chosen"],
)
def test_bad_preference_data_is_permanent(make_spec: Callable[..., dict[str, Any]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], rows: list[dict[str, Any]],
                                          fields: dict[str, str], expected: str) -> None:
    import re

    data = _write(tmp_path / "prefs.jsonl", rows)
    spec = dpo_spec(make_spec, tmp_path / "out", data)
    spec["dataset"]["fields"] = fields
    code = run_manifest.main([str(_manifest(tmp_path, spec)), "--no-progress", "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert code == ExitCode.PERMANENT
    assert str(data) in err
    assert re.search(expected, err), err
