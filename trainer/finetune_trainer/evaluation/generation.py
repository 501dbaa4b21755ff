"""Metrics on generated answers: BLEU, ROUGE, and win-rate of the tuned model against the base.

BLEU is sacrebleu's corpus BLEU (0-100, its default 13a tokenisation); ROUGE is rouge-score's
F-measure averaged over examples (0-1). Win-rate compares the tuned and the base model's answers
to the same held-out prompts: a reward model judges when one is given, else the answer closer to
the reference (ROUGE-L F) wins. Ties count half, so two identical models score exactly 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_api.status import StatusMetric, StatusMetrics

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

#: Scores answers to prompts; higher is better. Signature: (prompts, answers) -> scores.
Judge = Callable[[Sequence[str], Sequence[str]], list[float]]


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no examples to score")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of predictions against one reference each."""
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0-1) of predictions against one reference each."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        # rouge-score's argument order is (target, prediction).
        scores = scorer.score(ref, pred)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example ROUGE-L F-measure (the default win-rate judge)."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


@dataclass(frozen=True)
class WinRate:
    """Outcome of tuned-vs-base on the same prompts."""

    win_rate: float  # (wins + ties / 2) / n
    wins: int
    ties: int
    losses: int
    judge: str  # "reward_model" or "rouge_l_to_reference"


def win_rate_from_scores(tuned: Sequence[float], base: Sequence[float], *, judge: str, tol: float = 1e-6) -> WinRate:
    """Count wins, ties (|difference| <= tol) and losses of tuned over base."""
    if len(tuned) != len(base):
        raise ValueError(f"{len(tuned)} tuned scores but {len(base)} base scores")
    if not tuned:
        raise ValueError("no examples to compare")
    wins = ties = losses = 0
    for t, b in zip(tuned, base, strict=True):
        if abs(t - b) <= tol:
            ties += 1
        elif t > b:
            wins += 1
        else:
            losses += 1
    return WinRate((wins + 0.5 * ties) / len(tuned), wins, ties, losses, judge)


def win_rate(
    prompts: Sequence[str],
    tuned_answers: Sequence[str],
    base_answers: Sequence[str],
    *,
    references: Sequence[str] | None = None,
    judge: Judge | None = None,
) -> WinRate:
    """Win-rate of tuned over base: judged by `judge` (a reward model) if given, else by ROUGE-L
    similarity to `references`."""
    if len(tuned_answers) != len(prompts) or len(base_answers) != len(prompts):
        raise ValueError("prompts, tuned answers and base answers must have the same length")
    if judge is not None:
        return win_rate_from_scores(judge(prompts, tuned_answers), judge(prompts, base_answers), judge="reward_model")
    if references is None:
        raise ValueError("win-rate needs a reward model or reference answers")
    return win_rate_from_scores(
        rouge_l(tuned_answers, references), rouge_l(base_answers, references), judge="rouge_l_to_reference"
    )


# --- Generation and reward-model judging (torch from here on) ------------------------------


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to `prompts` (already formatted as the model expects), decoded without the
    prompt and without special tokens."""
    import torch

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def reward_model_judge(model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int = 1024) -> Judge:
    """A judge that scores prompt + answer with a sequence-classification reward model (1 label)."""
    import torch

    def score(prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        model.eval()
        device = next(model.parameters()).device
        texts = [p + a for p, a in zip(prompts, answers, strict=True)]
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(device)
            with torch.no_grad():
                logits = model(**enc).logits
            out.extend(float(v) for v in logits[:, 0].float().cpu())
        return out

    return score


def generation_metrics(
    wanted: Sequence[str],
    prompts: Sequence[str],
    references: Sequence[str],
    tuned_answers: Sequence[str],
    base_answers: Sequence[str] | None = None,
    judge: Judge | None = None,
) -> dict[str, float]:
    """The requested generation metrics ("bleu", "rouge", "win_rate") as flat metrics.json keys."""
    metrics: dict[str, float] = {}
    if "bleu" in wanted:
        metrics["bleu"] = bleu(tuned_answers, references)
    if "rouge" in wanted:
        metrics.update(rouge(tuned_answers, references))
    if "win_rate" in wanted:
        if base_answers is None:
            raise ValueError("win_rate needs the base model's answers")
        result = win_rate(prompts, tuned_answers, base_answers, references=references, judge=judge)
        metrics["win_rate"] = result.win_rate
        metrics["win_rate_wins"] = float(result.wins)
        metrics["win_rate_ties"] = float(result.ties)
        metrics["win_rate_losses"] = float(result.losses)
    return metrics


# --- Held-out generation evaluation for a recipe -------------------------------------------

GENERATION_METRICS = ("bleu", "rouge", "win_rate", "accuracy", "f1")
#: metrics.json `generation` keys that are headline numbers (termination message, status.metrics).
HEADLINE = ("bleu", *ROUGE_TYPES, "win_rate", "accuracy", "f1")


def headline(metrics: dict[str, float]) -> StatusMetrics:
    """The headline numbers of a `generation` section, for a recipe's `summary` section."""
    return {StatusMetric(k): float(metrics[k]) for k in HEADLINE if k in metrics}


class GenerationEval:
    """Answers held-out prompts with the base model (before training) and the tuned model (after),
    and scores them as `evaluation.metrics` asks (bleu, rouge, win_rate, accuracy, f1).

    A no-op when the spec asks for none of these or `evaluation.generationSamples` is 0.
    """

    def __init__(
        self,
        spec: Any,
        tokenizer: Any,
        prompts: Sequence[str],
        references: Sequence[str],
        labels: Sequence[str] | None = None,
        judge: Judge | None = None,
    ) -> None:
        ev = spec.evaluation
        self.wanted = [m for m in ev.metrics if m in GENERATION_METRICS]
        n = min(ev.generation_samples, len(prompts))
        if not self.wanted or n == 0:
            self.wanted, n = [], 0
        self.prompts = list(prompts[:n])
        self.references = list(references[:n])
        self.labels = list(labels[:n]) if labels is not None else self.references
        self.tokenizer = tokenizer
        self.max_new_tokens = ev.max_new_tokens
        self.judge = judge
        self.base_answers: list[str] | None = None

    @property
    def active(self) -> bool:
        return bool(self.wanted)

    @classmethod
    def from_preference(cls, spec: Any, tokenizer: Any, data: Any, judge: Judge | None = None) -> GenerationEval:
        """Held-out preference pairs: the prompt, and the chosen answer as the reference."""
        from ..preference import answer_text, prompt_text

        held = data.eval
        return cls(
            spec,
            tokenizer,
            [prompt_text(p, tokenizer) for p in held["prompt"]],
            [answer_text(c) for c in held["chosen"]],
            judge=judge,
        )

    @classmethod
    def from_records(
        cls, spec: Any, tokenizer: Any, records: Sequence[dict[str, Any]], judge: Judge | None = None
    ) -> GenerationEval:
        """Held-out canonical records of an SFT format: the prompt and the reference answer (the
        label column, when the data has one, is the gold label for accuracy/f1)."""
        prompts, refs, labels = [], [], []
        for rec in records:
            pair = prompt_and_reference(rec, spec.dataset.format, tokenizer)
            if pair is None:
                continue
            prompts.append(pair[0])
            refs.append(pair[1])
            labels.append(str(rec.get("label", pair[1])))
        return cls(spec, tokenizer, prompts, refs, labels, judge=judge)

    def _answer(self, model: Any) -> list[str]:
        return generate_answers(model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens)

    def answer_base(self, model: Any) -> None:
        """The base model's answers; call before training (PEFT adapters are disabled)."""
        if not self.active or "win_rate" not in self.wanted:
            return
        import contextlib

        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with ctx:
            self.base_answers = self._answer(model)

    def score_tuned(self, model: Any) -> dict[str, float]:
        """The requested metrics of the tuned model's answers (flat metrics.json keys)."""
        if not self.active:
            return {}
        from .classification import classification_metrics

        answers = self._answer(model)
        metrics = generation_metrics(
            [m for m in self.wanted if m in ("bleu", "rouge", "win_rate")],
            self.prompts,
            self.references,
            answers,
            self.base_answers,
            self.judge,
        )
        if "accuracy" in self.wanted or "f1" in self.wanted:
            cls_metrics = classification_metrics(answers, self.labels)
            metrics.update({k: v for k, v in cls_metrics.items() if k in self.wanted})
        metrics["generationSamples"] = float(len(self.prompts))
        return metrics


def prompt_and_reference(rec: dict[str, Any], fmt: str, tokenizer: Any) -> tuple[str, str] | None:
    """(prompt text, reference answer) of one canonical SFT record; None for format text."""
    if fmt == "prompt_completion":
        return rec["prompt"], rec["completion"]
    if fmt == "alpaca":
        from ..data import alpaca_prompt

        return alpaca_prompt(rec["instruction"], rec.get("input", "")), rec["output"]
    if fmt == "messages":
        messages = rec["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return str(prompt), messages[last]["content"]
    return None
