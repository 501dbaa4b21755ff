"""BLEU, ROUGE, accuracy/F1 and win-rate agree with values worked out by hand."""

from __future__ import annotations

import math

import pytest
from finetune_trainer.evaluation.classification import (
    accuracy,
    classification_metrics,
    extract_label,
    macro_f1,
)
from finetune_trainer.evaluation.generation import (
    bleu,
    generation_metrics,
    rouge,
    win_rate,
    win_rate_from_scores,
)

PRED = "the cat sat on the mat"
REF = "the cat is on the mat"


def test_bleu_matches_hand_computation() -> None:
    # 1-grams: 5 of 6 match (clipped "the" x2, cat, on, mat); 2-grams: "the cat", "on the",
    # "the mat" = 3 of 5; 3-grams: "on the mat" = 1 of 4; 4-grams: none of 3 ("cat sat on the"...)
    # -> sacrebleu's default exp smoothing gives the 4-gram precision 1/(2*3) = 1/6.
    # Same length, so no brevity penalty.
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu([PRED], [REF]) == pytest.approx(expected, abs=1e-6)
    assert bleu([REF], [REF]) == pytest.approx(100.0)


def test_bleu_brevity_penalty() -> None:
    # Every n-gram of "the cat is on" is in the reference (precisions 1), but it is 4 tokens
    # against 6: BP = exp(1 - 6/4).
    assert bleu(["the cat is on"], ["the cat is on the mat"]) == pytest.approx(100 * math.exp(-0.5), abs=1e-6)


def test_rouge_matches_hand_computation() -> None:
    scores = rouge([PRED, "a b c d"], [REF, "a x c y"])
    # Example 1: unigrams overlap 5/6 both ways -> F 5/6; bigrams 3/5 -> 3/5; LCS "the cat on the
    # mat" = 5 -> 5/6. Example 2: unigrams 2/4 -> 1/2; bigrams 0; LCS "a c" = 2 -> 1/2.
    assert scores["rouge1"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert scores["rouge2"] == pytest.approx((3 / 5 + 0) / 2)
    assert scores["rougeL"] == pytest.approx((5 / 6 + 1 / 2) / 2)


def test_accuracy_and_macro_f1() -> None:
    gold = ["pos", "pos", "neg", "neg", "neu"]
    pred = ["pos", "neg", "neg", "neg", "pos"]
    # pos: tp1 fp1 fn1 -> F 2/4; neg: tp2 fp1 fn0 -> 4/5; neu: tp0 fn1 -> 0.
    assert accuracy(pred, gold) == pytest.approx(3 / 5)
    assert macro_f1(pred, gold) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_labels_are_read_from_free_text() -> None:
    labels = ["positive", "negative"]
    assert extract_label("Negative.", labels) == "negative"
    assert extract_label("I think it is positive, not negative", labels) == "positive"
    assert extract_label("no idea", labels) == "no idea"
    # "not positive" names positive first; "nonpositive" is no whole-word mention.
    metrics = classification_metrics(["Positive!", "nonpositive", "negative"], ["positive", "negative", "negative"])
    # predictions: positive, "nonpositive" (wrong), negative -> accuracy 2/3; classes
    # negative (tp1 fn1 -> 2/3), nonpositive (fp1 -> 0), positive (tp1 -> 1) -> F1 (2/3 + 0 + 1) / 3.
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_win_rate_counts_ties_as_half() -> None:
    result = win_rate_from_scores([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.0], judge="reward_model")
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.win_rate == pytest.approx((2 + 0.5) / 4)


def test_win_rate_by_reward_model_judge() -> None:
    def judge(prompts: list[str], answers: list[str]) -> list[float]:
        return [float(len(a)) for a in answers]  # longer is better

    result = win_rate(["p1", "p2", "p3"], ["long", "x", "same"], ["ab", "xyz", "same"], judge=judge)
    assert (result.wins, result.ties, result.losses) == (1, 1, 1)
    assert result.win_rate == pytest.approx(0.5)
    assert result.judge == "reward_model"


def test_win_rate_by_similarity_to_reference() -> None:
    refs = ["the sky is blue", "the grass is green"]
    tuned = ["the sky is blue", "grass"]
    base = ["i do not know", "the grass is green"]
    # Example 1: tuned ROUGE-L 1.0 vs 0 -> win; example 2: tuned F(1/1, 1/4) = 0.4 vs 1.0 -> loss.
    result = win_rate(["a", "b"], tuned, base, references=refs)
    assert (result.wins, result.ties, result.losses) == (1, 0, 1)
    assert result.win_rate == pytest.approx(0.5)
    assert result.judge == "rouge_l_to_reference"
    assert win_rate(["a", "b"], refs, base, references=refs).win_rate == pytest.approx(0.75)


def test_generation_metrics_flat_keys() -> None:
    metrics = generation_metrics(["bleu", "rouge", "win_rate"], ["p"], [REF], [PRED], [REF])
    assert set(metrics) == {"bleu", "rouge1", "rouge2", "rougeL", "win_rate", "win_rate_wins", "win_rate_ties",
                            "win_rate_losses"}
    assert metrics["win_rate"] == 0.0


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"])


def test_recipe_summary_reaches_the_termination_metrics() -> None:
    from finetune_trainer.entrypoint import summary_metrics

    metrics = {"tuned": {"evalLoss": 0.36}, "summary": {"rewardMargin": 0.83, "win_rate": 0.75, "note": "x"}}
    out = summary_metrics(metrics)
    assert out["rewardMargin"] == 0.83 and out["win_rate"] == 0.75 and out["evalLoss"] == 0.36
    assert "note" not in out  # only numbers go into status.metrics
