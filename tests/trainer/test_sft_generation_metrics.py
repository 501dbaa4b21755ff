"""The SFT recipe's generation metrics: BLEU, ROUGE, win-rate, and accuracy/F1 against the label
column, in metrics.json and in the termination message (status.metrics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_api import parse_spec
from finetune_api.constants import METRICS_FILE, Env
from finetune_api.status import TerminationMessage
from finetune_cli.main import main as finetune
from finetune_trainer.data import canonical_rows, load_splits
from finetune_trainer.errors import DataError
from harness.model_plugin import toy_facts

WANTED = ["loss", "perplexity", "bleu", "rouge", "win_rate", "accuracy", "f1"]


def _row(thing: str, love: bool, label: str | None = None) -> dict[str, str]:
    sentiment = "positive" if love else "negative"
    return {
        "review": f"{'love' if love else 'hate'}: {thing}",
        "completion": f" The answer is {sentiment}.",
        # The label column is the gold class; by default it agrees with the completion's wording.
        "sentiment": label if label is not None else sentiment,
    }


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sentiment_run(make_spec: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`finetune train` on a learnable sentiment task with every generation metric asked."""
    tmp = tmp_path_factory.mktemp("sentiment")
    things = [t for t, _ in toy_facts()]
    train = _write(tmp / "train.jsonl", [_row(t, love) for t in things for love in (True, False)])
    held = [_row(t, love) for t in things[:4] for love in (True, False)]
    # A noisy gold label: the text says positive, the label column says negative. Only a metric
    # that reads the label column counts a "positive" answer to this prompt as wrong.
    held[0] = _row(things[0], True, label="negative")
    validation = _write(tmp / "validation.jsonl", held)
    spec = make_spec(
        tmp / "ignored",
        dataset={"train": str(train), "validation": str(validation), "validationSplit": None,
                 "fields": {"prompt": "review", "label": "sentiment"}},
        hyperparameters={"maxSteps": 60},
        evaluation={"metrics": WANTED, "generationSamples": len(held), "maxNewTokens": 16},
    )
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    mp = pytest.MonkeyPatch()
    mp.setenv(Env.SPEC_PATH, str(spec_file))
    mp.setenv(Env.OUTPUT_URI, str(tmp / "artifact"))
    mp.setenv(Env.METRICS_PORT, "0")
    mp.setenv(Env.TERMINATION_LOG, str(tmp / "termination-log"))
    try:
        code = finetune(["train"])
    finally:
        mp.undo()
    return {"code": code, "out": tmp / "artifact", "termination": tmp / "termination-log", "held": held}


def _tuned_answers(out: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    from finetune_trainer.evaluation.generation import generate_answers
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(out)
    return generate_answers(model, AutoTokenizer.from_pretrained(out), prompts, max_new_tokens=max_new_tokens)


def test_generation_metrics_land_in_metrics_json_and_status(sentiment_run: dict[str, Any]) -> None:
    assert sentiment_run["code"] == 0
    metrics = json.loads((sentiment_run["out"] / METRICS_FILE).read_text())
    gen = metrics["generation"]
    for key in ("bleu", "rouge1", "rouge2", "rougeL", "win_rate", "accuracy", "f1"):
        assert key in gen, key
    assert gen["generationSamples"] == len(sentiment_run["held"])
    assert gen["win_rate_wins"] + gen["win_rate_ties"] + gen["win_rate_losses"] == len(sentiment_run["held"])
    assert 0 <= gen["bleu"] <= 100 + 1e-9 and all(0 <= gen[k] <= 1 + 1e-9 for k in ("rouge1", "rougeL", "win_rate", "f1"))
    # The random-weight base model answers noise; the tuned one answers like the references.
    assert gen["win_rate"] > 0.5 and gen["rougeL"] > 0.5
    msg = TerminationMessage.model_validate_json(sentiment_run["termination"].read_bytes())
    assert msg.outcome == "succeeded"
    for key in ("bleu", "rouge1", "rougeL", "win_rate", "accuracy", "f1"):
        assert msg.metrics[key] == pytest.approx(gen[key]), key
        assert metrics["summary"][key] == pytest.approx(gen[key]), key


def test_accuracy_and_f1_are_scored_against_the_label_column(sentiment_run: dict[str, Any]) -> None:
    from finetune_trainer.evaluation.classification import classification_metrics

    held = sentiment_run["held"]
    gen = json.loads((sentiment_run["out"] / METRICS_FILE).read_text())["generation"]
    answers = _tuned_answers(sentiment_run["out"], [r["review"] for r in held], 16)
    by_label = classification_metrics(answers, [r["sentiment"] for r in held])
    by_reference = classification_metrics(answers, [r["completion"] for r in held])
    # The tuned model learned the task: it calls the noisy row's review positive, which only the
    # label column marks wrong, so the two ways of scoring differ and we can tell which was used.
    assert "positive" in answers[0], answers
    assert by_label["accuracy"] != pytest.approx(by_reference["accuracy"])
    assert gen["accuracy"] == pytest.approx(by_label["accuracy"])
    assert gen["f1"] == pytest.approx(by_label["f1"])
    assert gen["accuracy"] >= 0.75


def test_label_column_is_kept_and_checked(make_spec: Any, tmp_path: Path) -> None:
    data = _write(tmp_path / "d.jsonl", [_row("apple", True), _row("pear", False)])
    spec = parse_spec(make_spec(tmp_path / "o", dataset={
        "train": str(data), "validation": str(data), "validationSplit": None, "fields": {"prompt": "review", "label": "sentiment"}}))
    splits = load_splits(spec.dataset, tmp_path, seed=0)
    assert [r["label"] for r in splits.eval] == ["positive", "negative"]
    from finetune_trainer.data import Row

    with pytest.raises(DataError, match=r"d\.jsonl: line 2: column 'sentiment' \(dataset\.fields\.label\)"):
        canonical_rows([Row("d.jsonl: line 1", _row("apple", True)),
                        Row("d.jsonl: line 2", {"review": "x", "completion": "y"})], spec.dataset)
