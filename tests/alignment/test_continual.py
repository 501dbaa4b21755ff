"""Continual fine-tuning: with replay or regularisation the earlier task is forgotten less."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_api.resource import parse_spec
from finetune_trainer.runner import Overrides, run_job
from harness.model_plugin import toy_facts

QUIET = Overrides(serve_metrics=False, progress=False)
COLORS = sorted({c for _, c in toy_facts()})
HP = {"maxSteps": 20, "batchSize": 8, "learningRate": 1e-2, "scheduler": "constant", "warmupRatio": 0.0, "seed": 7}


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_a() -> list[dict[str, str]]:
    return [{"prompt": f"What color is the {t}?", "completion": f" The {t} is {c}."} for t, c in toy_facts()]


def task_b() -> list[dict[str, str]]:
    # The same questions answered in another form: learning B overwrites A's answer pattern
    # ("The <thing> is <color>."), which A's held-out rows test, unless something protects it.
    return [{"prompt": f"What color is the {t}?", "completion": f" I do not know {c}!"} for t, c in toy_facts()]


def held_out_loss(model_dir: Path, adapter: Path, rows: list[dict[str, str]]) -> float:
    """Mean completion-token loss of base + adapter on `rows` (same masks as training)."""
    from finetune_api.spec import DatasetSpec
    from finetune_trainer import data
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    ds = DatasetSpec.model_validate({"train": "/x.jsonl", "format": "prompt_completion"})
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            ex = data.tokenize_example(row, tok, ds)
            labels = torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss
            total += float(loss) * n
            count += n
    return total / count


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("continual-data")
    a = task_a()
    return {"a_train": _write(d / "a_train.jsonl", a[:36]), "a_held": a[36:],
            "b": _write(d / "b.jsonl", task_b())}


def test_replay_and_regularisation_reduce_forgetting(make_spec: Callable[..., dict[str, Any]],
                                                     tiny_model_dir: Path, tasks: dict[str, Any],
                                                     tmp_path: Path) -> None:
    def job(name: str, train: Path, **objective: Any) -> dict[str, Any]:
        spec = make_spec(tmp_path / name, dataset={"train": str(train), "format": "prompt_completion",
                                                     "validationSplit": 0.1},
                         hyperparameters=HP, objective={"type": "sft", **objective})
        return run_job(parse_spec(spec), overrides=QUIET).metrics

    job("a", tasks["a_train"])
    earlier = str(tmp_path / "a")
    loss_a = held_out_loss(tiny_model_dir, tmp_path / "a", tasks["a_held"])

    plain = job("plain", tasks["b"], continual={"fromArtifact": earlier})
    replay = job("replay", tasks["b"], continual={
        "fromArtifact": earlier, "replay": {"data": str(tasks["a_train"]), "ratio": 0.5}})
    l2 = job("l2", tasks["b"], continual={
        "fromArtifact": earlier, "regularization": {"type": "l2", "weight": 0.05}})
    rise = {name: held_out_loss(tiny_model_dir, tmp_path / name, tasks["a_held"]) - loss_a
            for name in ("plain", "replay", "l2")}
    print("earlier-task loss", loss_a, "rise", rise)
    assert rise["plain"] > 0.1, "task B must really overwrite task A for the comparison to mean anything"
    assert rise["replay"] < rise["plain"]
    assert rise["l2"] < rise["plain"]
    # Every run learned task B (the protection did not simply stop training).
    for m in (plain, replay, l2):
        assert m["tuned"]["evalLoss"] < m["base"]["evalLoss"]
    # The recipe's own forgetting report (replay data held out) and the penalty's bookkeeping.
    assert replay["continual"]["replayRows"] == round(0.5 * 43 / 0.5)
    assert replay["continual"]["earlierTaskLossAfter"] > replay["continual"]["earlierTaskLossBefore"]
    assert l2["continual"]["regularization"] == "l2" and l2["continual"]["distanceFromStart"] > 0


def test_replay_mix_is_seeded_and_sized() -> None:
    from finetune_trainer.continual import mix_replay, replay_count

    new = [{"i": f"new{i}"} for i in range(30)]
    old = [{"i": f"old{i}"} for i in range(5)]
    assert replay_count(30, 5, 0.25) == 10  # 10 / (30 + 10) = 0.25
    mixed = mix_replay(new, old, 0.25, seed=3)
    assert len(mixed) == 40 and sum(r["i"].startswith("old") for r in mixed) == 10
    assert {r["i"] for r in mixed if r["i"].startswith("old")} == {r["i"] for r in old}  # cycled, all used
    assert mixed == mix_replay(new, old, 0.25, seed=3) != mix_replay(new, old, 0.25, seed=4)


def test_l2_and_ewc_penalties_and_the_trainer_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    from finetune_trainer.continual import WeightAnchor, _collate_one, estimate_fisher, with_weight_penalty
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"input_ids": ids, "labels": ids} for ids in (tok(r["prompt"] + r["completion"])["input_ids"]
                                                          for r in task_a()[:6])]
    fisher = estimate_fisher(model, rows, _collate_one, samples=4)
    values = torch.cat([f.flatten() for f in fisher.values()])
    assert values.min() >= 0 and values.mean() == pytest.approx(1.0, rel=1e-4)
    assert values.max() > 10 * values.median()  # some weights matter far more than others

    l2 = WeightAnchor.capture(model, "l2", 0.5)
    ewc = WeightAnchor.capture(model, "ewc", 0.5, fisher)
    assert float(l2.penalty().detach()) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    n = sum(p.numel() for p in model.parameters())
    assert float(l2.penalty()) == pytest.approx(0.5 * n * 0.01, rel=1e-3)
    assert float(ewc.penalty()) == pytest.approx(0.5 * 0.01 * float(values.sum()), rel=1e-3)

    # Inside a Trainer: the training loss is the model's loss plus the penalty.
    cls = with_weight_penalty(Trainer, l2)
    trainer = cls(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    batch = _collate_one(rows[:1])
    model.train()
    plain = float(model(**batch).loss)
    assert float(trainer.compute_loss(model, batch)) == pytest.approx(plain + float(l2.penalty()), rel=1e-4)
