"""Datasets: every format and file type loads, loss masks are right, bad data is named precisely."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_api.spec import DatasetSpec
from finetune_trainer import data
from finetune_trainer.errors import DataError
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _ds(**kw: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"maxSeqLength": 128, **kw})


def _trained_text(tokenizer: Any, ex: dict[str, list[int]]) -> str:
    return tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100])


def _masked_text(tokenizer: Any, ex: dict[str, list[int]]) -> str:
    return tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab == -100])


def test_completion_only_masks_the_prompt(tokenizer: Any) -> None:
    ds = _ds(train="/x.jsonl", format="prompt_completion")
    ex = data.tokenize_example({"prompt": "What color is the sky?", "completion": " The sky is blue."}, tokenizer, ds)
    assert _masked_text(tokenizer, ex) == "What color is the sky?"
    assert _trained_text(tokenizer, ex) == " The sky is blue.<|endoftext|>"
    # Labels are the input ids themselves where trained (the model shifts them).
    assert all(lab in (-100, tok) for tok, lab in zip(ex["input_ids"], ex["labels"], strict=True))


def test_loss_masking_all_trains_every_token(tokenizer: Any) -> None:
    ds = _ds(train="/x.jsonl", format="prompt_completion", lossMasking="all")
    ex = data.tokenize_example({"prompt": "What color is the sky?", "completion": " blue"}, tokenizer, ds)
    assert ex["labels"] == ex["input_ids"]


def test_alpaca_masks_instruction_and_input(tokenizer: Any) -> None:
    ds = _ds(train="/x.jsonl", format="alpaca")
    ex = data.tokenize_example({"instruction": "Name the color.", "input": "sky", "output": "blue"}, tokenizer, ds)
    masked = _masked_text(tokenizer, ex)
    assert "### Instruction:\nName the color." in masked and "### Input:\nsky" in masked
    assert masked.endswith("### Response:\n")
    assert _trained_text(tokenizer, ex) == "blue<|endoftext|>"


CONVERSATION = [
    {"role": "system", "content": "You name colors."},
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And the grass?"},
    {"role": "assistant", "content": "The grass is green."},
]


def test_assistant_only_trains_every_assistant_turn_with_chat_template(tokenizer: Any) -> None:
    ds = _ds(train="/x.jsonl", format="messages")
    assert ds.loss_masking == "assistant_only"
    ex = data.tokenize_example({"messages": CONVERSATION}, tokenizer, ds)
    # The ids are exactly the chat template's rendering.
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(ex["input_ids"]) == rendered
    trained = _trained_text(tokenizer, ex)
    # Each answer and its end-of-turn token carry loss (so the model learns to stop) ...
    assert trained == "The sky is blue.<|im_end|>\nThe grass is green.<|im_end|>\n"
    # ... and nothing of the system or user turns, nor the assistant header, does.
    masked = _masked_text(tokenizer, ex)
    for text in ("You name colors.", "What color is the sky?", "And the grass?", "<|im_start|>assistant\n"):
        assert text in masked


def test_completion_only_on_messages_trains_the_last_answer(tokenizer: Any) -> None:
    ds = _ds(train="/x.jsonl", format="messages", lossMasking="completion_only")
    ex = data.tokenize_example({"messages": CONVERSATION}, tokenizer, ds)
    assert _trained_text(tokenizer, ex) == "The grass is green.<|im_end|>\n"


@pytest.mark.parametrize(
    ("fmt", "file", "fields"),
    [
        ("prompt_completion", "prompt_completion.jsonl", {}),
        ("prompt_completion", "prompt_completion.csv", {}),
        ("prompt_completion", "prompt_completion.parquet", {}),
        ("prompt_completion", "renamed.jsonl", {"prompt": "question", "completion": "answer"}),
        ("text", "text.jsonl", {}),
        ("messages", "messages.jsonl", {}),
        ("alpaca", "alpaca.jsonl", {}),
    ],
)
def test_every_format_and_file_type_loads(toy_data_dir: Path, tokenizer: Any, tmp_path: Path,
                                          fmt: str, file: str, fields: dict[str, str]) -> None:
    ds = _ds(train=str(toy_data_dir / file), format=fmt, fields=fields, validationSplit=0.25, maxSamples=30)
    prepared = data.prepare_sft(ds, tokenizer, tmp_path, seed=1)
    assert len(prepared.eval) == 12 and len(prepared.train) == 30  # 48 rows: 12 held out, capped at 30
    for ex in prepared.train:
        assert len(ex["input_ids"]) == len(ex["labels"]) <= 128
        assert any(lab != -100 for lab in ex["labels"])
        if fmt != "text":
            assert ex["labels"][0] == -100


def test_truncation_to_max_seq_length(toy_data_dir: Path, tokenizer: Any, tmp_path: Path) -> None:
    ds = _ds(train=str(toy_data_dir / "text.jsonl"), format="text", maxSeqLength=8)
    prepared = data.prepare_sft(ds, tokenizer, tmp_path, seed=1)
    assert max(len(x) for x in prepared.train["input_ids"]) == 8


def test_packed_sequences_do_not_attend_to_each_other(tiny_model_dir: Path, tokenizer: Any) -> None:
    """Packing (TRL's bfd, padding-free) must give each example the logits it has alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a = tokenizer("What color is the apple? The apple is red.")["input_ids"]
    b = tokenizer("What color is the sky? The sky is blue.")["input_ids"]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collator([{"input_ids": a}, {"input_ids": b}])
    assert "attention_mask" not in batch
    with torch.no_grad():
        # SFTTrainer.compute_loss calls the model with use_cache=False; with a cache, transformers
        # does not derive per-sequence masks from position ids and the examples would attend across.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[: len(a)], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[len(a):], alone_b, atol=1e-5, rtol=0)


# --- bad data ----------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=rf"{f}: line 2, column \d+: invalid JSON"):
        data.load_splits(_ds(train=str(f), format="prompt_completion"), tmp_path, 0)


def test_missing_column_is_named_with_the_mapping_hint(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "answer": "b"}]
    f = _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{f}: line 2: missing column 'completion'.*answer, prompt.*dataset.fields.completion"):
        data.load_splits(_ds(train=str(f), format="prompt_completion"), tmp_path, 0)


def test_mapped_column_missing_names_the_users_column(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.csv", "prompt,completion\na,b\n")
    with pytest.raises(DataError, match=rf"{f}: line 2: missing column 'answer'"):
        data.load_splits(_ds(train=str(f), format="prompt_completion", fields={"completion": "answer"}), tmp_path, 0)


def test_empty_file_is_named(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", "\n")
    with pytest.raises(DataError, match=rf"{f}: empty file"):
        data.load_splits(_ds(train=str(f), format="text"), tmp_path, 0)


def test_wrong_type_and_bad_messages_are_named(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=rf"{f}: line 1: column 'text': expected a string, found int 3"):
        data.load_splits(_ds(train=str(f), format="text"), tmp_path, 0)
    g = _write(tmp_path / "m.jsonl", json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=rf"{g}: line 1: column 'messages': message 0: expected keys 'role'/'content' "
                                        r"or 'from'/'value' .*found an object with keys 'role'"):
        data.load_splits(_ds(train=str(g), format="messages"), tmp_path, 0)


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        data.load_splits(_ds(train=str(tmp_path / "nope.jsonl"), format="text"), tmp_path, 0)
    f = _write(tmp_path / "d.txt", "hello")
    with pytest.raises(DataError, match=r"unsupported file type \.txt"):
        data.load_splits(_ds(train=str(f), format="text"), tmp_path, 0)
