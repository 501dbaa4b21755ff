"""output.save merged with method ia3: the API accepts it (only prompt learning cannot be merged), so
the artifact must hold merged/ (recipes/base.save), equal to base + adapter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from finetune_api.constants import MERGED_DIR
from finetune_api.resource import parse_spec
from finetune_trainer.runner import Overrides, run_job


def test_ia3_merged_is_written_and_matches_the_adapter(make_spec: Callable[..., dict[str, Any]],
                                                       tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ia3"
    spec = make_spec(out, method={"type": "ia3"}, hyperparameters={"maxSteps": 4, "learningRate": 3e-2},
                     evaluation={"baseline": False})
    spec["output"]["save"] = ["adapter", "merged"]
    result = run_job(parse_spec(spec), overrides=Overrides(serve_metrics=False, progress=False))
    assert (out / MERGED_DIR / "config.json").is_file()
    assert any(f.path.startswith(f"{MERGED_DIR}/") for f in result.manifest.files)  # type: ignore[union-attr]
    batch = result.recipe.tokenizer(["What color is the sky?"], return_tensors="pt")  # type: ignore[union-attr]
    merged = AutoModelForCausalLM.from_pretrained(out / MERGED_DIR, dtype=torch.float32).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapter(**batch).logits, atol=1e-4, rtol=0)
