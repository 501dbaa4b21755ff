"""Accuracy and macro-F1 for classification-style data (a label field).

The model answers in free text; `extract_label` maps an answer to one of the known labels
(exact match after normalisation, else the label mentioned first). F1 follows scikit-learn's
`f1_score(average="macro", zero_division=0)`: the classes are the union of gold and predicted
labels, and a class with no predicted and no gold examples scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SPACE = re.compile(r"\s+")
_EDGE_PUNCT = ".,;:!?\"'()[]{}"


def normalize_label(text: str) -> str:
    """Lower-case, collapse whitespace, drop surrounding punctuation."""
    return _SPACE.sub(" ", str(text)).strip().strip(_EDGE_PUNCT).strip().lower()


def extract_label(answer: str, labels: Sequence[str]) -> str:
    """The label an answer names: exact match, else the label whose whole-word mention comes
    first (longest on a tie); else the normalised answer itself (then it counts as wrong)."""
    norm = normalize_label(answer)
    known = {normalize_label(label) for label in labels}
    if norm in known:
        return norm
    best: tuple[int, int, str] | None = None
    for label in known:
        if not label:
            continue
        match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", norm)
        if match is not None:
            key = (match.start(), -len(label), label)
            if best is None or key < best:
                best = key
    return best[2] if best is not None else norm


def accuracy(predicted: Sequence[str], gold: Sequence[str]) -> float:
    """Fraction of normalised predictions equal to the normalised gold label."""
    _check(predicted, gold)
    hits = sum(normalize_label(p) == normalize_label(g) for p, g in zip(predicted, gold, strict=True))
    return hits / len(gold)


def macro_f1(predicted: Sequence[str], gold: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over the union of gold and predicted classes."""
    _check(predicted, gold)
    preds = [normalize_label(p) for p in predicted]
    golds = [normalize_label(g) for g in gold]
    classes = sorted(set(preds) | set(golds))
    total = 0.0
    for cls in classes:
        tp = sum(p == cls and g == cls for p, g in zip(preds, golds, strict=True))
        fp = sum(p == cls and g != cls for p, g in zip(preds, golds, strict=True))
        fn = sum(p != cls and g == cls for p, g in zip(preds, golds, strict=True))
        denom = 2 * tp + fp + fn
        total += (2 * tp / denom) if denom else 0.0
    return total / len(classes)


def classification_metrics(answers: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """accuracy and f1 of free-text answers against gold labels (labels seen in gold are the classes)."""
    labels = sorted({normalize_label(g) for g in gold})
    predicted = [extract_label(a, labels) for a in answers]
    return {"accuracy": accuracy(predicted, gold), "f1": macro_f1(predicted, gold)}


def _check(predicted: Sequence[str], gold: Sequence[str]) -> None:
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions but {len(gold)} gold labels")
    if not gold:
        raise ValueError("no examples to score")
