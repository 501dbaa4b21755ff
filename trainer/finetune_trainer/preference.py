"""Preference data (dataset.format preference) for the dpo, reward and ppo recipes.

Rows are read and renamed by data.py (the user's columns via dataset.fields); here they are
checked for what preference training needs, with the file and line of each problem:

- `chosen` and `rejected` present and non-empty (a missing column is data.py's error);
- a non-empty prompt: an explicit `prompt` column, or, without one (the implicit-prompt layout
  of the widely used human-preference sets, where chosen and rejected are whole transcripts), the
  part both share before they differ: the leading messages in the chat form, the leading text
  (cut at a whitespace, so that neither answer starts mid-word) in the string form;
- not every pair identical (chosen == rejected gives DPO and the reward model nothing to learn);
  identical pairs among good ones are dropped with a warning.

Both forms come out as TRL expects them: strings {prompt, chosen, rejected}, or conversations
{prompt: [messages], chosen: [assistant messages], rejected: [...]}.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.spec import DatasetSpec

from . import data
from .errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreferenceData:
    train: Any  # datasets.Dataset of {prompt, chosen, rejected}
    eval: Any
    conversational: bool


def _is_chat(value: Any) -> bool:
    return isinstance(value, list)


def _blank(value: Any) -> bool:
    if isinstance(value, list):
        return not value or all(not str(m.get("content", "")).strip() for m in value)
    return not str(value).strip()


def _as_chat(value: Any, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two transcripts that share their beginning.

    The prompt ends before the last whitespace of the shared text, so each answer keeps its
    leading space or newline and neither starts inside a word both happen to begin alike.
    """
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    cut = max(chosen.rfind(c, 0, n) for c in " \n\t")
    if cut < 0:  # text without whitespace (e.g. Chinese): the shared characters
        cut = n
    return chosen[:cut], chosen[cut:], rejected[cut:]


def normalize_pair(rec: dict[str, Any], where: str, ds: DatasetSpec) -> dict[str, Any]:
    """One canonical preference record -> TRL's explicit-prompt form; DataError names where."""
    col = ds.fields.column
    prompt, chosen, rejected = rec.get("prompt", ""), rec["chosen"], rec["rejected"]
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if _blank(value):
            raise DataError(f"{where}: column {col(field)!r} is empty")
    chat = _is_chat(prompt) or _is_chat(chosen) or _is_chat(rejected)
    if chat:
        chosen, rejected = _as_chat(chosen, "assistant"), _as_chat(rejected, "assistant")
        if _blank(prompt):
            # Implicit prompt: the conversation both answers share before they differ.
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            if _blank(prompt):
                raise DataError(
                    f"{where}: empty prompt: column {col('prompt')!r} is missing or empty and "
                    f"{col('chosen')!r}/{col('rejected')!r} share no leading messages"
                )
        else:
            prompt = _as_chat(prompt, "user")
    elif "prompt" not in rec:
        prompt, chosen, rejected = split_shared_text(chosen, rejected)
        if _blank(prompt) or _blank(chosen) or _blank(rejected):
            raise DataError(
                f"{where}: empty prompt: column {col('prompt')!r} is missing or empty and "
                f"{col('chosen')!r}/{col('rejected')!r} share no leading text (map yours with dataset.fields.prompt)"
            )
    elif _blank(prompt):
        raise DataError(
            f"{where}: empty prompt: column {col('prompt')!r} is missing or empty "
            f"(map yours with dataset.fields.prompt)"
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def check_pairs(rows: list[data.Row], ds: DatasetSpec, uri: str) -> tuple[list[dict[str, Any]], bool]:
    """Checked, normalised pairs and whether they are conversational."""
    records = data.canonical_rows(rows, ds)  # one per row, in order; raises on a missing column
    pairs = [normalize_pair(rec, row.where, ds) for row, rec in zip(rows, records, strict=True)]
    kinds = {_is_chat(p["chosen"]) for p in pairs}
    if len(kinds) > 1:
        raise DataError(f"{uri}: mixes plain-text and chat (message list) preference rows; use one form")
    distinct = [p for p in pairs if p["chosen"] != p["rejected"]]
    if not distinct:
        col = ds.fields.column
        raise DataError(
            f"{uri}: column {col('chosen')!r} equals column {col('rejected')!r} in every row: "
            "there is no preference to learn"
        )
    if len(distinct) < len(pairs):
        log.warning("%s: dropped %d rows whose chosen and rejected are identical", uri, len(pairs) - len(distinct))
    return distinct, kinds == {True}


def load_preference(ds: DatasetSpec, workdir: Path, seed: int) -> PreferenceData:
    """Train and held-out preference pairs (held out as data.load_splits does: seeded split)."""
    import datasets

    if ds.format != "preference":
        raise DataError(f"dataset.format is {ds.format}; this objective needs dataset.format preference")
    train, chat = check_pairs(data.read_rows(ds.train, workdir), ds, ds.train)
    held: list[dict[str, Any]] | None = None
    if ds.validation is not None:
        held, held_chat = check_pairs(data.read_rows(ds.validation, workdir), ds, ds.validation)
        if held_chat != chat:
            raise DataError(f"{ds.validation}: held-out rows are not in the same form as {ds.train}")
    train, held = data.split_held_out(train, held, ds, seed, what="usable pairs")
    return PreferenceData(datasets.Dataset.from_list(train), datasets.Dataset.from_list(held), chat)


def prompt_text(prompt: Any, tokenizer: Any) -> str:
    """A prompt as the text a model continues: the chat template with the generation prompt for
    conversations, the string itself otherwise."""
    if isinstance(prompt, list):
        return str(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    return str(prompt)


def answer_text(answer: Any) -> str:
    if isinstance(answer, list):
        return "".join(m["content"] for m in answer if m.get("role") == "assistant")
    return str(answer)
